"""Drop detectors: control charts on per-response scores, pure and broker-free.

Issue 4 ("Drop alerts", DOMAIN.md → Alerts). Plain Python over plain data, no
Kafka or ClickHouse: the stream keeps one detector per unit (dealer or region,
one metric) in a table as `to_dict()`, the batch replay runs the same code.
Every update is deterministic in its inputs.

Baseline (partial pooling). A unit's baseline comes from its first `warmup`
responses, shrunk toward a network prior with the weight of `prior_strength`
responses:

    mean = (n·unit_mean + k·prior_mean) / (n + k)
    var  = (SS + k·prior_sd²) / ((n − 1) + k)     SS = Σ(x − unit_mean)²

so a unit with few responses sits near the network, a large one near itself.
With n = 0 (or `warmup=0`) the baseline is the prior. The baseline is frozen
once warm-up ends; monitoring starts with the next response.

Charts (all one-sided: they signal only on a drop):
- `EwmaChart`: z = λ·x + (1 − λ)·z, z₀ = baseline mean; signals when
  z < mean − L·σ_z with the steady-state σ_z = sd·√(λ / (2 − λ)).
- `CusumChart`: lower CUSUM on u = (x − mean)/sd: S = max(0, S − u − k);
  signals when S > h.
- `BernoulliCusum`: on the detractor indicator (`nps_category(r) == "detractor"`),
  p0 = shrunk baseline detractor rate, p1 = p0 + delta;
  S = max(0, S + w), w = log(p1/p0) for a detractor, log((1−p1)/(1−p0)) otherwise;
  signals when S > h (a rise in detractors is a drop in NPS).

`AlertPolicy` turns a chart's raw signals into alerts: a minimum sample after
warm-up, a cool-down (responses and/or days) after an alert opens, and
hysteresis — an open alert closes only once the chart is back under its
release level (CUSUM back to `release`, default 0; EWMA back within
`release_sigmas` σ_z of the baseline), so one fall gives one alert.

False alarms. The defaults (CUSUM k = 0.5, h = 5; EWMA λ = 0.1, L = 3;
Bernoulli h = 4) have an in-control run length of the order of 10³ responses
per unit, shorter with a baseline estimated from 30 responses (simulated, 200
seeds, 2,000 in-control responses after a 30-response warm-up: a false alarm
in about 78 % of runs for the CUSUM, 63 % for the EWMA, 65 % for the Bernoulli
CUSUM). Raise h / L where a unit sees thousands of responses or many units
are watched at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

__all__ = [
    "AlertPolicy",
    "AlertSignal",
    "Baseline",
    "BernoulliCusum",
    "Chart",
    "CusumChart",
    "EwmaChart",
    "chart_from_dict",
]

MIN_SD = 1e-9
"""Floor on a baseline standard deviation (a constant unit would divide by 0)."""
MIN_P = 1e-3
"""Baseline detractor rates are kept within [MIN_P, 1 − MIN_P]."""


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


@dataclass
class AlertSignal:
    """One alert event: a drop opened ("open") or its recovery ("closed")."""

    metric: str
    method: str
    statistic: float
    threshold: float
    baseline_mean: float
    current: float
    n: int
    message: str
    status: Literal["open", "closed"] = "open"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Baseline:
    """A unit's baseline from its first `warmup` values, shrunk to a network prior."""

    prior_mean: float
    prior_sd: float
    prior_strength: float = 20.0
    warmup: int = 30
    n: int = 0
    unit_mean: float = 0.0
    m2: float = 0.0

    @property
    def ready(self) -> bool:
        """Warm-up is over; the baseline is frozen."""
        return self.n >= self.warmup

    def add(self, x: float) -> bool:
        """Take x into the baseline while warming up; False once it is frozen."""
        if self.ready:
            return False
        self.n += 1
        delta = x - self.unit_mean
        self.unit_mean += delta / self.n
        self.m2 += delta * (x - self.unit_mean)
        return True

    @property
    def mean(self) -> float:
        k = self.prior_strength
        if self.n + k <= 0:
            return self.prior_mean
        return (self.n * self.unit_mean + k * self.prior_mean) / (self.n + k)

    @property
    def sd(self) -> float:
        k = self.prior_strength
        df = max(self.n - 1, 0)
        if df + k <= 0:
            return max(self.prior_sd, MIN_SD)
        var = (self.m2 + k * self.prior_sd**2) / (df + k)
        return max(math.sqrt(var), MIN_SD)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(**data)


@dataclass
class _ChartBase:
    """What every chart shares: a metric name, a baseline, counters."""

    metric: str
    baseline: Baseline
    seen: int = 0
    """Responses seen, warm-up included."""
    monitored: int = 0
    """Responses seen after warm-up."""
    run_n: int = 0
    """Responses since the statistic last sat at its in-control value."""
    run_sum: float = 0.0

    method = "chart"

    def _track_run(self, x: float, at_rest: bool) -> None:
        if at_rest:
            self.run_n, self.run_sum = 0, 0.0
        else:
            self.run_n += 1
            self.run_sum += x

    def _run_mean(self) -> float:
        return self.run_sum / self.run_n if self.run_n else self.baseline.mean

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["baseline"] = self.baseline.to_dict()
        data["type"] = self.method
        return data


@dataclass
class EwmaChart(_ChartBase):
    """One-sided (lower) EWMA chart on per-response scores."""

    lam: float = 0.1
    limit: float = 3.0
    release_sigmas: float = 1.0
    z: float | None = None

    method = "EWMA"

    @property
    def sigma_z(self) -> float:
        return self.baseline.sd * math.sqrt(self.lam / (2.0 - self.lam))

    @property
    def threshold(self) -> float:
        """Lower control limit."""
        return self.baseline.mean - self.limit * self.sigma_z

    @property
    def statistic(self) -> float:
        return self.baseline.mean if self.z is None else self.z

    @property
    def current(self) -> float:
        return self.statistic

    def signalling(self) -> bool:
        return self.z is not None and self.z < self.threshold

    def released(self) -> bool:
        return self.statistic >= self.baseline.mean - self.release_sigmas * self.sigma_z

    def update(self, x: float) -> AlertSignal | None:
        """Feed one score; an "open" signal whenever the EWMA is below its limit."""
        self.seen += 1
        if self.baseline.add(x):
            return None
        self.monitored += 1
        prev = self.baseline.mean if self.z is None else self.z
        self.z = self.lam * x + (1.0 - self.lam) * prev
        return self.signal() if self.signalling() else None

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        rel = "<" if status == "open" else ">="
        bound = self.threshold if status == "open" else self.release_level
        return _score_signal(self, self.statistic, bound, rel, status)

    @property
    def release_level(self) -> float:
        return self.baseline.mean - self.release_sigmas * self.sigma_z


class _CusumRule:
    """What both CUSUMs share: statistic S, decision interval h, release level.

    A mixin listed after `_ChartBase`, which provides `_run_mean`."""

    s: float
    h: float
    release: float
    _run_mean: Callable[[], float]

    @property
    def threshold(self) -> float:
        return self.h

    @property
    def statistic(self) -> float:
        return self.s

    @property
    def release_level(self) -> float:
        return self.release

    @property
    def current(self) -> float:
        """Mean since S last left 0 (scores, or the detractor rate): where the drop began."""
        return self._run_mean()

    def signalling(self) -> bool:
        return self.s > self.h

    def released(self) -> bool:
        return self.s <= self.release


@dataclass
class CusumChart(_ChartBase, _CusumRule):
    """One-sided lower CUSUM on standardized per-response scores."""

    k: float = 0.5
    h: float = 5.0
    release: float = 0.0
    s: float = 0.0

    method = "CUSUM"

    def update(self, x: float) -> AlertSignal | None:
        """Feed one score; an "open" signal whenever S > h."""
        self.seen += 1
        if self.baseline.add(x):
            return None
        self.monitored += 1
        u = (x - self.baseline.mean) / self.baseline.sd
        self.s = max(0.0, self.s - u - self.k)
        self._track_run(x, self.s == 0.0)
        return self.signal() if self.signalling() else None

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        if status == "open":
            return _score_signal(self, self.s, self.h, ">", status)
        return _score_signal(self, self.s, self.release, "<=", status)


@dataclass
class BernoulliCusum(_ChartBase, _CusumRule):
    """Bernoulli CUSUM on the detractor indicator, p0 → p1 = p0 + delta."""

    delta: float = 0.15
    h: float = 4.0
    release: float = 0.0
    s: float = 0.0

    method = "Bernoulli CUSUM"

    @property
    def p0(self) -> float:
        return min(max(self.baseline.mean, MIN_P), 1.0 - MIN_P)

    @property
    def p1(self) -> float:
        return min(self.p0 + self.delta, 1.0 - MIN_P / 2)

    def increment(self, detractor: bool) -> float:
        p0, p1 = self.p0, self.p1
        return math.log(p1 / p0) if detractor else math.log((1.0 - p1) / (1.0 - p0))

    def update(self, x: float) -> AlertSignal | None:
        """Feed one response: x truthy for a detractor."""
        detractor = bool(x)
        self.seen += 1
        if self.baseline.add(float(detractor)):
            return None
        self.monitored += 1
        self.s = max(0.0, self.s + self.increment(detractor))
        self._track_run(float(detractor), self.s == 0.0)
        return self.signal() if self.signalling() else None

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        base, cur = self.baseline.mean, self.current
        if status == "open":
            bound, rel = self.h, ">"
            text = f"{self.metric} rose from {base:.0%} to {cur:.0%}"
        else:
            bound, rel = self.release, "<="
            text = f"{self.metric} back near {base:.0%}"
        message = (
            f"{text} on {self.seen} responses ({self.method} {self.s:.1f} {rel} {_fmt(bound)})"
        )
        return AlertSignal(
            self.metric, self.method, self.s, bound, base, cur, self.seen, message, status
        )


Chart = EwmaChart | CusumChart | BernoulliCusum
_CHARTS: dict[str, type[EwmaChart] | type[CusumChart] | type[BernoulliCusum]] = {
    c.method: c for c in (EwmaChart, CusumChart, BernoulliCusum)
}


def _score_signal(
    chart: EwmaChart | CusumChart,
    stat: float,
    bound: float,
    rel: str,
    status: Literal["open", "closed"],
) -> AlertSignal:
    base, cur = chart.baseline.mean, chart.current
    if status == "open":
        text = f"{chart.metric} fell from {_fmt(base)} to {_fmt(cur)}"
    else:
        text = f"{chart.metric} recovered to {_fmt(cur)} (baseline {_fmt(base)})"
    message = f"{text} on {chart.seen} responses ({chart.method} {_fmt(stat)} {rel} {_fmt(bound)})"
    return AlertSignal(
        chart.metric, chart.method, stat, bound, base, cur, chart.seen, message, status
    )


def chart_from_dict(data: dict[str, Any]) -> Chart:
    """Rebuild a chart from `to_dict()` output."""
    data = dict(data)
    cls = _CHARTS[data.pop("type")]
    data["baseline"] = Baseline.from_dict(data["baseline"])
    return cls(**data)


@dataclass
class AlertPolicy:
    """Minimum sample, cool-down and hysteresis around one chart.

    `update` returns an "open" signal when the chart signals, at least
    `min_sample` responses have been monitored after warm-up, no alert is open
    and the cool-down since the last opened alert is over (`cooldown_responses`
    responses and, when days are given, `cooldown_days` days). It returns a
    "closed" signal when an open alert's chart is back under its release level.
    """

    chart: Chart
    min_sample: int = 20
    cooldown_responses: int = 50
    cooldown_days: int = 0
    is_open: bool = False
    last_open_seen: int | None = None
    last_open_day: str | None = None
    alerts: int = 0

    def _cooling(self, day: date | None) -> bool:
        if self.last_open_seen is None:
            return False
        if self.chart.seen - self.last_open_seen < self.cooldown_responses:
            return True
        if day is not None and self.last_open_day is not None:
            last = date.fromisoformat(self.last_open_day)
            return day < last + timedelta(days=self.cooldown_days)
        return False

    def update(self, x: float, day: date | None = None) -> AlertSignal | None:
        """Feed one response (with its date for a cool-down in days)."""
        self.chart.update(x)
        if self.is_open:
            if self.chart.released():
                self.is_open = False
                return self.chart.signal("closed")
            return None
        if (
            self.chart.signalling()
            and self.chart.monitored >= self.min_sample
            and not self._cooling(day)
        ):
            self.is_open = True
            self.alerts += 1
            self.last_open_seen = self.chart.seen
            self.last_open_day = day.isoformat() if day is not None else None
            return self.chart.signal("open")
        return None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["chart"] = self.chart.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlertPolicy:
        data = dict(data)
        data["chart"] = chart_from_dict(data["chart"])
        return cls(**data)
