"""Drop detectors: control charts on per-response scores, pure and broker-free.

Issue 4 ("Drop alerts", DOMAIN.md → Alerts). Plain Python over plain data, no
Kafka or ClickHouse: the stream keeps one `AlertPolicy` per unit (dealer or
region), department and metric in a table as `to_dict()`, and `csi alerts
replay` runs the same code over a file. Every update is deterministic in its
inputs.

Items. A chart is fed items of `n` responses with their mean and their sum of
squared deviations `m2`: a single response (n = 1, m2 = 0) at dealer level, a
closed day of a region. For the detractor chart the values are 0/1.

Baseline (the unit's own history, partial pooling). Items enter the baseline
`lag` items after they were monitored, so the start of a fall is not learnt
as normal before the chart can see it; the baseline remembers about `memory`
responses (older ones are down-weighted in proportion), and it is shrunk
toward a network prior with the weight of `prior_strength` responses:

    mean = (n·unit_mean + k·prior_mean) / (n + k)
    var  = (m2 + k·prior_sd²) / ((n − 1) + k)

so a unit with little history sits near the network and a large one near
itself. k = σ²_within / τ²_between is the empirical-Bayes weight: with
per-response CSI sd ≈ 95 and dealers' means spread by ≈ 40 points, k ≈ 6.
Monitoring starts once the baseline holds `warmup` responses. While an alert
is open the baseline learns nothing, and the held items (the fall's start)
are dropped, so a fall never becomes the new normal while it is open.

Charts (one-sided: they signal only on a drop):
- `CusumChart`: lower CUSUM on u = (x − mean)/sd, clipped to ±`clip` for
  single responses (one furious customer is a hot alert, not a trend);
  for an item of n responses S = max(0, S − n·(x̄ − mean)/sd − n·k); S is
  capped at `cap` so a recovery after a long fall is seen in bounded time;
  signals when S > h.
- `EwmaChart`: z = λ·x + (1 − λ)·z, z₀ = baseline mean; signals when
  z < mean − L·σ_z with the steady-state σ_z = sd·√(λ / (2 − λ)).
- `BernoulliCusum`: on a 0/1 indicator of a bad response (a detractor, a
  dissatisfied customer), p0 = the baseline rate, p1 = p0 + delta;
  S = max(0, S + d·log(p1/p0) + (n − d)·log((1−p1)/(1−p0))) for d bad
  responses out of n; signals when S > h.

`AlertPolicy` turns a chart's raw signals into alerts: a minimum sample after
warm-up, a cool-down (responses and/or days) after an alert opens, and
hysteresis — an open alert closes only once the chart is back under its
release level (CUSUM back to `release`, default 0; EWMA back within
`release_sigmas` σ_z of the baseline), so one fall gives one alert.

The defaults the pipeline uses are in `pipeline.alerts.AlertSettings`, tuned
by `benchmarks/evaluate_alerts.py` (docs/alerts.md has the measured table).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    "chance_per_year",
    "chart_from_dict",
]

MIN_SD = 1e-9
"""Floor on a baseline standard deviation (a constant unit would divide by 0)."""
MIN_P = 1e-3
"""Baseline rates are kept within [MIN_P, 1 − MIN_P]."""


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


@dataclass
class AlertSignal:
    """One alert event of a chart: a drop opened ("open") or its recovery ("closed")."""

    metric: str
    method: str
    statistic: float
    threshold: float
    baseline_mean: float
    baseline_sd: float
    current: float
    n: int
    """Responses behind `current`: those since the chart statistic last sat at rest."""
    seen: int
    """Responses the chart has seen in all."""
    message: str
    status: Literal["open", "closed"] = "open"
    run_length: float | None = None
    """Responses the chart takes on average to reach `statistic` with no real change
    (see `false_alarm_run_length`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Baseline:
    """A unit's baseline from its own lagged history, shrunk to a network prior."""

    prior_mean: float
    prior_sd: float
    prior_strength: float = 6.0
    warmup: float = 40.0
    lag: int = 0
    memory: float | None = None
    n: float = 0.0
    unit_mean: float = 0.0
    m2: float = 0.0
    held: list[list[float]] = field(default_factory=list)
    """Items seen but not yet learnt: [n, mean, m2], oldest first."""
    frozen: bool = False

    @property
    def ready(self) -> bool:
        """Enough history to monitor against."""
        return self.n >= self.warmup

    def observe(self, n: float, mean: float, m2: float = 0.0) -> None:
        """An item after it was monitored: it is learnt `lag` items later."""
        if self.frozen or n <= 0:
            return
        self.held.append([n, mean, m2])
        while len(self.held) > self.lag:
            self._learn(*self.held.pop(0))

    def _learn(self, n: float, mean: float, m2: float) -> None:
        total = self.n + n
        delta = mean - self.unit_mean
        self.unit_mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        if self.memory is not None and self.n > self.memory:
            shrink = self.memory / self.n  # forget old history in proportion
            self.n, self.m2 = self.memory, self.m2 * shrink

    def freeze(self) -> None:
        """Stop learning and forget the held items (the start of a fall)."""
        self.frozen = True
        self.held.clear()

    def thaw(self) -> None:
        self.frozen = False

    @property
    def mean(self) -> float:
        k = self.prior_strength
        if self.n + k <= 0:
            return self.prior_mean
        return (self.n * self.unit_mean + k * self.prior_mean) / (self.n + k)

    @property
    def sd(self) -> float:
        k = self.prior_strength
        df = max(self.n - 1, 0.0)
        if df + k <= 0:
            return max(self.prior_sd, MIN_SD)
        var = (self.m2 + k * self.prior_sd**2) / (df + k)
        return max(math.sqrt(var), MIN_SD)

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies `held`, which cost most of
        # the alert engine's time per response
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["held"] = [list(item) for item in self.held]
        return data

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
    """Responses monitored against a ready baseline."""
    run_n: int = 0
    """Responses since the statistic last sat at its in-control value."""
    run_sum: float = 0.0

    method = "chart"

    def _track_run(self, n: int, total: float, at_rest: bool) -> None:
        if at_rest:
            self.run_n, self.run_sum = 0, 0.0
        else:
            self.run_n += n
            self.run_sum += total

    def _run_mean(self) -> float:
        return self.run_sum / self.run_n if self.run_n else self.baseline.mean

    def update(self, x: float) -> AlertSignal | None:
        """Feed one response; an "open" signal whenever the chart signals."""
        return self.update_item(1, float(x), 0.0)

    def update_item(self, n: int, mean: float, m2: float = 0.0) -> AlertSignal | None:
        """Feed an item of n responses (their mean and squared deviations)."""
        if n <= 0:
            return None
        self.seen += n
        if self.baseline.ready:
            self.monitored += n
            self._step(n, mean)
        self.baseline.observe(n, mean, m2)
        return self.signal() if self.signalling() else None

    def _step(self, n: int, mean: float) -> None:
        raise NotImplementedError

    def signalling(self) -> bool:
        raise NotImplementedError

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        raise NotImplementedError

    def run_length(self) -> float | None:
        """In-control average run length to the current statistic (None: unknown)."""
        return None

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

    @property
    def release_level(self) -> float:
        return self.baseline.mean - self.release_sigmas * self.sigma_z

    def signalling(self) -> bool:
        return self.z is not None and self.z < self.threshold

    def released(self) -> bool:
        return self.statistic >= self.release_level

    def _step(self, n: int, mean: float) -> None:
        prev = self.baseline.mean if self.z is None else self.z
        keep = (1.0 - self.lam) ** n  # n responses at their mean
        self.z = keep * prev + (1.0 - keep) * mean
        self._track_run(n, n * mean, self.z >= self.baseline.mean)

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        rel = "<" if status == "open" else ">="
        bound = self.threshold if status == "open" else self.release_level
        return _score_signal(self, self.statistic, bound, rel, status)


class _CusumRule:
    """What both CUSUMs share: statistic S, decision interval h, cap, release.

    A mixin listed before `_ChartBase` (so its rules win), which provides `_run_mean`."""

    s: float
    h: float
    cap: float | None
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
        """Mean since S last left 0 (scores, or the bad-response rate): where the drop began."""
        return self._run_mean()

    def signalling(self) -> bool:
        return self.s > self.h

    def released(self) -> bool:
        return self.s <= self.release

    def _capped(self, s: float) -> float:
        s = max(0.0, s)
        return s if self.cap is None else min(s, self.cap)


@dataclass
class CusumChart(_CusumRule, _ChartBase):
    """One-sided lower CUSUM on standardized per-response scores."""

    k: float = 0.5
    h: float = 5.0
    release: float = 0.0
    cap: float | None = None
    clip: float | None = None
    s: float = 0.0

    method = "CUSUM"

    def _step(self, n: int, mean: float) -> None:
        u = (mean - self.baseline.mean) / self.baseline.sd
        if n == 1 and self.clip is not None:
            u = min(max(u, -self.clip), self.clip)
        self.s = self._capped(self.s - n * (u + self.k))
        self._track_run(n, n * mean, self.s == 0.0)

    def run_length(self) -> float | None:
        """Siegmund's approximation for the standardized CUSUM with reference k:
        ARL₀ ≈ (e^{2kb} − 2kb − 1) / (2k²), b = s + 1.166."""
        if self.k <= 0:
            return None
        a = 2 * self.k * (max(self.s, 0.0) + 1.166)
        return (math.exp(a) - a - 1) / (2 * self.k**2)

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        if status == "open":
            return _score_signal(self, self.s, self.h, ">", status)
        return _score_signal(self, self.s, self.release, "<=", status)


@dataclass
class BernoulliCusum(_CusumRule, _ChartBase):
    """Bernoulli CUSUM on a bad-response indicator (detractor, dissatisfied), p0 → p0 + delta."""

    delta: float = 0.15
    h: float = 4.0
    release: float = 0.0
    cap: float | None = None
    min_p: float = MIN_P
    """Floor on p0: a unit with a spotless history is not held to a rate of zero."""
    s: float = 0.0

    method = "Bernoulli CUSUM"

    @property
    def p0(self) -> float:
        return min(max(self.baseline.mean, self.min_p), 1.0 - MIN_P)

    @property
    def p1(self) -> float:
        return min(self.p0 + self.delta, 1.0 - MIN_P / 2)

    def increment(self, bad: bool) -> float:
        p0, p1 = self.p0, self.p1
        return math.log(p1 / p0) if bad else math.log((1.0 - p1) / (1.0 - p0))

    def update(self, x: float) -> AlertSignal | None:
        """Feed one response: x truthy for a bad one."""
        return self.update_item(1, float(bool(x)), 0.0)

    def update_item(self, n: int, mean: float, m2: float = 0.0) -> AlertSignal | None:
        # the variance of n 0/1 values is fixed by their mean
        return super().update_item(n, mean, n * mean * (1.0 - mean))

    def _step(self, n: int, mean: float) -> None:
        bad = n * mean
        self.s = self._capped(
            self.s + bad * self.increment(True) + (n - bad) * self.increment(False)
        )
        self._track_run(n, bad, self.s == 0.0)

    def run_length(self) -> float | None:
        """Wald's approximation for a likelihood-ratio CUSUM:
        ARL₀ ≈ (e^s − s − 1) / D(p0 ‖ p1), D the Kullback–Leibler divergence."""
        p0, p1, b = self.p0, self.p1, max(self.s, 0.0)
        divergence = p0 * math.log(p0 / p1) + (1 - p0) * math.log((1 - p0) / (1 - p1))
        return (math.exp(b) - b - 1) / divergence if divergence > 0 else None

    def signal(self, status: Literal["open", "closed"] = "open") -> AlertSignal:
        base, cur = self.baseline.mean, self.current
        if status == "open":
            bound, rel = self.h, ">"
            text = f"{self.metric} rose from {base:.0%} to {cur:.0%}"
        else:
            bound, rel = self.release, "<="
            text = f"{self.metric} back near {base:.0%}"
        message = (
            f"{text} on {self.run_n} responses ({self.method} {self.s:.1f} {rel} {_fmt(bound)})"
        )
        return AlertSignal(
            self.metric, self.method, self.s, bound, base, self.baseline.sd, cur,
            self.run_n, self.seen, message, status, self.run_length(),
        )  # fmt: skip


RUN_LENGTH_REALISM = 0.4
"""The textbook run lengths assume a known baseline and normal (or exactly
Bernoulli) data; with a baseline estimated from a few hundred responses and
skewed, discrete scores, `benchmarks/evaluate_alerts.py` measures CSI false
alarms about 2.6 times as often on simulated dealers (0.67 a dealer-year
against 0.25 from the textbook run length), so the stated chance is 2.5 times
the textbook one."""


def chance_per_year(run_length: float | None, responses_per_year: float) -> float | None:
    """How often a chart reaches this statistic by chance in a year: the unit's
    responses a year over the in-control run length to it."""
    if run_length is None or run_length <= 0:
        return None
    return responses_per_year / (run_length * RUN_LENGTH_REALISM)


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
    message = f"{text} on {chart.run_n} responses ({chart.method} {_fmt(stat)} {rel} {_fmt(bound)})"
    return AlertSignal(
        chart.metric, chart.method, stat, bound, base, chart.baseline.sd, cur,
        chart.run_n, chart.seen, message, status, chart.run_length(),
    )  # fmt: skip


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
    `min_sample` responses have been monitored, the chart's current run holds
    at least `min_run` responses, no alert is open and the
    cool-down since the last opened alert is over (`cooldown_responses`
    responses and, when days are given, `cooldown_days` days). It returns a
    "closed" signal when an open alert's chart is back under its release level.
    The dates of the first and the latest response give the unit's response
    rate, which puts a chance figure on an alert.
    """

    chart: Chart
    min_sample: int = 20
    min_run: int = 1
    """Responses the evidence must rest on: an alert needs the chart's run this long."""
    cooldown_responses: int = 50
    cooldown_days: int = 0
    is_open: bool = False
    last_open_seen: int | None = None
    last_open_day: str | None = None
    alerts: int = 0
    first_day: str | None = None
    last_day: str | None = None

    def _cooling(self, day: date | None) -> bool:
        if self.last_open_seen is None:
            return False
        if self.chart.seen - self.last_open_seen < self.cooldown_responses:
            return True
        if day is not None and self.last_open_day is not None:
            last = date.fromisoformat(self.last_open_day)
            return day < last + timedelta(days=self.cooldown_days)
        return False

    def responses_per_year(self) -> float:
        """The unit's response rate so far (at least a 30-day span, to stay sane early on)."""
        if self.first_day is None or self.last_day is None:
            return float(self.chart.seen)
        span = (date.fromisoformat(self.last_day) - date.fromisoformat(self.first_day)).days + 1
        return self.chart.seen * 365.0 / max(span, 30)

    def update(self, x: float, day: date | None = None) -> AlertSignal | None:
        """Feed one response (with its date for a cool-down in days)."""
        return self.update_item(1, float(x), 0.0, day)

    def update_item(
        self, n: int, mean: float, m2: float = 0.0, day: date | None = None
    ) -> AlertSignal | None:
        """Feed an item of n responses (a region's day)."""
        if n <= 0:
            return None
        if day is not None:
            self.first_day = self.first_day or day.isoformat()
            self.last_day = max(self.last_day or "", day.isoformat())
        self.chart.update_item(n, mean, m2)
        if self.is_open:
            if self.chart.released():
                self.is_open = False
                self.chart.baseline.thaw()
                return self.chart.signal("closed")
            return None
        if (
            self.chart.signalling()
            and self.chart.monitored >= self.min_sample
            and self.chart.run_n >= self.min_run
            and not self._cooling(day)
        ):
            self.is_open = True
            self.alerts += 1
            self.last_open_seen = self.chart.seen
            self.last_open_day = day.isoformat() if day is not None else None
            self.chart.baseline.freeze()
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
