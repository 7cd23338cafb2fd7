"""Alerts managers can trust, and the cases they open — pure and broker-free.

Issue 4 (DOMAIN.md → Alerts). Four kinds, all decided by event time:

- ``drop``: a dealer's (per response) or a region's (per closed day) CSI,
  NPS or satisfaction rate has really fallen — `pipeline.detectors` charts
  against the unit's own lagged baseline, shrunk toward the network, with a
  minimum sample, a cool-down and hysteresis (one fall, one alert; the
  recovery closes it). NPS is watched through its detractor share and the
  satisfaction rate through its dissatisfied share (Bernoulli CUSUMs).
- ``hot``: one response bad enough to act on opens a **case** (contact due
  within 24 h); a case moves open → contacted → resolved → closed by case
  actions, escalates when overdue (a case change, level 1 for contact and 2
  for resolution: the case itself is what managers chase), and records
  whether the customer's next survey or call shows recovery.
- ``complaint_sla``: a complaint's first response or resolution is past due.
- ``mystery_shop``: an audit below the pass mark or with a failed mandatory item.

`AlertEngine` keeps its state in the same `StateStore` as the buckets (a
Faust table in the worker, a dict in `csi alerts replay` and in tests), so
the stream and the replay run this very code. Every alert and case change
carries a deterministic id, so a replayed batch produces the same records
and the warehouse, the topic consumer and the webhook drop the repeats.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pipeline.catalogue import Catalogue
from pipeline.detectors import (
    AlertPolicy,
    AlertSignal,
    Baseline,
    BernoulliCusum,
    CusumChart,
    chance_per_year,
)
from pipeline.metrics import (
    SLA_FIRST_RESPONSE_HOURS,
    SLA_RESOLUTION_HOURS,
    Bucket,
    audit_score,
    is_satisfied,
    nps_category,
    response_csi,
)
from schemas import (
    AnyEvent,
    CallEvent,
    ComplaintEvent,
    InvalidEvent,
    MysteryShopEvent,
    SurveyEvent,
)
from schemas.cases import CaseAction

DROP_METRICS = ("csi", "nps", "satisfaction_rate")
METRIC_LABELS = {"csi": "CSI", "nps": "NPS", "satisfaction_rate": "satisfaction rate"}


# --- settings ------------------------------------------------------------------


@dataclass(frozen=True)
class AlertSettings:
    """Every alert default, in one place; a TOML file (CSI_ALERTS) may override any.

    The drop defaults are tuned by `benchmarks/evaluate_alerts.py` on simulated
    dealers (4–72 responses a week): a 50-point CSI fall is caught in a median
    36 responses at 0.70 false alarms per dealer-year, all three metrics
    together — the table is in docs/alerts.md.
    """

    # drop detectors: CUSUM on per-response CSI (k and h in baseline sds)
    cusum_k: float = 0.25
    cusum_h: float = 11.0
    cusum_clip: float = 3.0
    """A single response moves the CSI chart by at most this many sds."""
    bernoulli_h: float = 7.0
    detractor_delta: float = 0.10
    """The rise in detractor share the NPS chart is tuned to catch."""
    dissatisfied_delta: float = 0.08
    # baselines
    prior_csi: tuple[float, float] = (820.0, 95.0)
    """Network prior for a response's CSI: mean and sd."""
    prior_detractor_share: float = 0.12
    prior_dissatisfied_share: float = 0.04
    prior_strength: float = 6.0
    warmup: int = 40
    lag: int = 60
    memory: float = 500.0
    min_rate: float = 0.01
    """Floor on a unit's baseline detractor / dissatisfied share."""
    # policy
    min_sample: int = 20
    min_run: int = 10
    cooldown_responses: int = 50
    cooldown_days: int = 14
    # regions: one item per closed day; a region sees many times a dealer's
    # responses, so its charts need a longer in-control run length for about
    # one false alarm a region-year (Siegmund: h = 14 gives 14,000 responses)
    region_cusum_h: float = 14.0
    region_bernoulli_h: float = 9.0
    region_lag_days: int = 14
    region_close_after_days: int = 2
    """A region's day is fed to its charts once each of its active dealers has events
    this many days later."""
    # hot alerts and cases
    hot_bottom_points: int = 2
    case_contact_hours: float = 24.0
    case_resolve_hours: float = 168.0
    # complaints and audits
    sla_first_response_hours: dict[int, float] = field(
        default_factory=lambda: {k: float(v) for k, v in SLA_FIRST_RESPONSE_HOURS.items()}
    )
    sla_resolution_hours: dict[int, float] = field(
        default_factory=lambda: {k: float(v) for k, v in SLA_RESOLUTION_HOURS.items()}
    )
    mystery_pass_mark: float = 80.0
    """Used when an audit does not state its own pass mark."""

    def policy(self, metric: str, scope: str = "dealer") -> AlertPolicy:
        """A fresh detector for one unit, department and metric."""
        region = scope == "region"
        lag = self.region_lag_days if region else self.lag
        cusum_h = self.region_cusum_h if region else self.cusum_h
        bernoulli_h = self.region_bernoulli_h if region else self.bernoulli_h

        def baseline(mean: float, sd: float) -> Baseline:
            return Baseline(
                mean, sd, prior_strength=self.prior_strength, warmup=self.warmup,
                lag=lag, memory=self.memory,
            )  # fmt: skip

        chart: CusumChart | BernoulliCusum
        if metric == "csi":
            chart = CusumChart(
                "CSI", baseline(*self.prior_csi), k=self.cusum_k, h=cusum_h,
                cap=2 * cusum_h, clip=self.cusum_clip,
            )  # fmt: skip
        else:
            share, delta = (
                (self.prior_detractor_share, self.detractor_delta)
                if metric == "nps"
                else (self.prior_dissatisfied_share, self.dissatisfied_delta)
            )
            sd = (share * (1 - share)) ** 0.5
            chart = BernoulliCusum(
                metric, baseline(share, sd), delta=delta, h=bernoulli_h,
                cap=2 * bernoulli_h, min_p=self.min_rate,
            )  # fmt: skip
        return AlertPolicy(
            chart, min_sample=self.min_sample, min_run=self.min_run,
            cooldown_responses=self.cooldown_responses,
            cooldown_days=self.cooldown_days,
        )  # fmt: skip


def load_alert_settings(path: Path | None) -> AlertSettings:
    """Defaults, overridden by the keys of a TOML file; unknown keys are an error."""
    if path is None:
        return AlertSettings()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(AlertSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown alert settings {unknown}; known: {sorted(known)}")
    defaults = AlertSettings()
    for name in ("sla_first_response_hours", "sla_resolution_hours"):
        if name in data:  # severities not in the file keep their defaults
            data[name] = {
                **getattr(defaults, name),
                **{int(k): float(v) for k, v in data[name].items()},
            }
    if "prior_csi" in data:
        data["prior_csi"] = tuple(data["prior_csi"])
    return replace(defaults, **data)


# --- records -------------------------------------------------------------------

AlertKind = Literal["drop", "hot", "complaint_sla", "mystery_shop"]


def stable_id(*parts: object) -> str:
    """A short deterministic id: the same inputs give the same id in every replay."""
    return hashlib.sha1("|".join(map(str, parts)).encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class Alert:
    """One alert, as opened or as closed (same `alert_id`, higher `version`)."""

    alert_id: str
    kind: str
    status: str  # open, closed
    scope: str  # dealer, region
    key: str
    region: str
    brand: str
    department: str
    metric: str
    detected_at: datetime  # event time the alert opened
    updated_at: datetime  # event time of this record (= detected_at when opening)
    baseline: float | None
    current: float | None
    n: int
    method: str
    statistic: float | None
    threshold: float | None
    chance_per_year: float | None
    """How often a chart reaches this height by chance in a year at this unit's
    response rate (drops only)."""
    message: str
    case_id: str = ""
    event_id: str = ""

    @property
    def version(self) -> int:
        return 2 if self.status == "closed" else 1

    @property
    def delivery_id(self) -> str:
        return f"alert:{self.alert_id}:{self.status}"

    def to_message(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("detected_at", "updated_at"):
            data[name] = data[name].isoformat()
        return {"record": "alert", "delivery_id": self.delivery_id, **data}


CaseStatus = Literal["open", "contacted", "resolved", "closed"]


@dataclass
class Case:
    """A hot alert's case; every change bumps `seq` (the warehouse version)."""

    case_id: str
    dealer_id: str
    region: str
    brand: str
    department: str
    customer_ref: str
    reasons: list[str]
    source_event_id: str
    opened_at: datetime
    contact_due_at: datetime
    resolve_due_at: datetime
    status: str = "open"
    contacted_at: datetime | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    close_reason: str = ""
    comment: str = ""
    escalation_level: int = 0
    recovery: str = "pending"  # pending, recovered, not_recovered
    recovery_event_id: str = ""
    updated_at: datetime | None = None
    change: str = "opened"
    seq: int = 1
    action_ids: list[str] = field(default_factory=list)
    open_hot_alerts: list[dict[str, str]] = field(default_factory=list)
    """Hot alerts of this case not closed yet: {alert_id, detected_at, event_id}."""
    hot_events: int = 1

    _TIMES = (
        "opened_at", "contact_due_at", "resolve_due_at", "contacted_at", "resolved_at",
        "closed_at", "updated_at",
    )  # fmt: skip

    @property
    def delivery_id(self) -> str:
        return f"case:{self.case_id}:{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        # shallow copies by hand (asdict deep-copies, a cost on every event)
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("reasons", "action_ids"):
            data[name] = list(data[name])
        data["open_hot_alerts"] = [dict(h) for h in self.open_hot_alerts]
        for name in self._TIMES:
            if data[name] is not None:
                data[name] = data[name].isoformat()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        data = dict(data)
        for name in cls._TIMES:
            if data.get(name) is not None:
                data[name] = datetime.fromisoformat(data[name])
        return cls(**data)

    def to_message(self) -> dict[str, Any]:
        data = self.to_dict()
        del data["action_ids"], data["open_hot_alerts"]
        return {"record": "case", "delivery_id": self.delivery_id, **data}

    def snapshot(self) -> Case:
        """A frozen copy to emit (the live case keeps changing within a batch)."""
        return Case.from_dict(self.to_dict())


Record = Alert | Case


# --- the rules for single events (pure) -----------------------------------------


def hot_reasons(event: AnyEvent, settings: AlertSettings) -> list[str]:
    """Why one response needs a call back today; empty when it does not."""
    reasons: list[str] = []
    if not isinstance(event, SurveyEvent | CallEvent):
        return reasons
    if event.overall is not None and event.overall < event.scale.min + settings.hot_bottom_points:
        reasons.append(f"overall {event.overall:g} of {event.scale.min}–{event.scale.max}")
    if (
        isinstance(event, SurveyEvent)
        and event.recommend is not None
        and event.comment
        and nps_category(event.recommend) == "detractor"
    ):
        reasons.append(f"detractor ({event.recommend}/10) with a comment")
    if isinstance(event, CallEvent) and event.issue_reported:
        reasons.append("issue reported on the follow-up call")
    return reasons


def shows_recovery(event: SurveyEvent | CallEvent, settings: AlertSettings) -> bool | None:
    """Whether a customer's response after a case shows recovery; None if it says nothing."""
    if hot_reasons(event, settings):
        return False
    if event.overall is not None:
        return is_satisfied(event.overall, event.scale)
    if isinstance(event, SurveyEvent) and event.recommend is not None:
        return nps_category(event.recommend) != "detractor"
    if isinstance(event, CallEvent) and event.outcome == "reached":
        return (
            bool(event.satisfaction_confirmed) if event.satisfaction_confirmed is not None else None
        )
    return None


def drop_inputs(event: AnyEvent, catalogue: Catalogue) -> dict[str, float]:
    """The values one response feeds to the drop charts: its CSI, whether it is
    a detractor (surveys only) and whether it is dissatisfied."""
    out: dict[str, float] = {}
    if isinstance(event, SurveyEvent | CallEvent):
        if isinstance(event, CallEvent) and not event.carries_ratings:
            return out
        score = response_csi(event.scale, event.ratings, catalogue)
        if score is not None:
            out["csi"] = score
        if isinstance(event, SurveyEvent) and event.recommend is not None:
            out["nps"] = float(nps_category(event.recommend) == "detractor")
        if event.overall is not None:
            out["satisfaction_rate"] = float(not is_satisfied(event.overall, event.scale))
    return out


def region_day_inputs(bucket: Bucket) -> dict[str, tuple[int, float, float]]:
    """A region's closed day as (n, mean, m2) items for the same three charts."""
    items: dict[str, tuple[int, float, float]] = {}
    n = bucket.get("csi_resp_n")
    if n:
        total, squares = bucket.get("csi_resp_sum"), bucket.get("csi_resp_sumsq")
        items["csi"] = (int(n), total / n, max(squares - total * total / n, 0.0))
    if bucket.get("nps_n"):
        items["nps"] = (
            int(bucket.get("nps_n")),
            bucket.get("detractors") / bucket.get("nps_n"),
            0.0,
        )
    if bucket.get("overall_n"):
        n_overall = bucket.get("overall_n")
        unsatisfied = n_overall - bucket.get("overall_satisfied")
        items["satisfaction_rate"] = (int(n_overall), unsatisfied / n_overall, 0.0)
    return items


# --- sentences -----------------------------------------------------------------


def _chance_text(per_year: float | None) -> str:
    if per_year is None:
        return "with an unknown frequency"
    if per_year <= 0.01:
        return "less than once a century"
    if per_year < 0.5:
        return f"about once in {1 / per_year:.0f} years"
    if per_year < 1.5:
        return "about once a year"
    return f"about {per_year:.0f} times a year"


def _value_text(metric: str, value: float) -> str:
    return f"{value:.0f}" if metric == "csi" else f"{value:.0f}%"


def drop_values(metric: str, signal: AlertSignal) -> tuple[float, float]:
    """Baseline and current in the metric's own terms: CSI points, the
    detractor share for NPS (%), the satisfaction rate (%)."""
    if metric == "csi":
        return signal.baseline_mean, signal.current
    if metric == "nps":
        return 100 * signal.baseline_mean, 100 * signal.current
    return 100 * (1 - signal.baseline_mean), 100 * (1 - signal.current)


def drop_message(
    scope: str, key: str, department: str, metric: str, signal: AlertSignal, per_year: float | None
) -> str:
    unit = f"{scope.capitalize()} {key}'s {department} {METRIC_LABELS[metric]}"
    base, cur = drop_values(metric, signal)
    if signal.status == "closed":
        return (
            f"{unit} has recovered: {_value_text(metric, cur)} against its baseline "
            f"{_value_text(metric, base)} ({signal.method} back to {signal.statistic:.1f})."
        )
    what = {
        "csi": f"fell from {base:.0f} to {cur:.0f}",
        "nps": f"fell: detractors rose from {base:.0f}% to {cur:.0f}%",
        "satisfaction_rate": f"fell from {base:.0f}% to {cur:.0f}%",
    }[metric]
    return (
        f"{unit} {what} over its last {signal.n} responses; at this {scope}'s response rate "
        f"a fall this size happens by chance {_chance_text(per_year)} "
        f"({signal.method} {signal.statistic:.1f} > {signal.threshold:.1f})."
    )


def _fmt_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- the engine ------------------------------------------------------------------


class _Cache:
    """Per-batch read-through cache over the store; `flush` writes what changed."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.values: dict[str, dict[str, Any] | None] = {}
        self.dirty: dict[str, int] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self.values:
            self.values[key] = self.store.get(key)
        return self.values[key]

    def put(self, key: str, value: dict[str, Any], partition: int) -> None:
        self.values[key] = value
        self.dirty[key] = partition

    def flush(self) -> None:
        for key, partition in self.dirty.items():
            value = self.values[key]
            assert value is not None
            self.store.put(key, value, partition)
        self.dirty.clear()
        self.values.clear()


Labels = Callable[[str], tuple[str, str]]


class AlertEngine:
    """Alerts and cases for the dealers of one partition's events, in arrival order."""

    def __init__(
        self, store: Any, catalogue: Catalogue, settings: AlertSettings, labels: Labels
    ) -> None:
        self.cache = _Cache(store)
        self.catalogue = catalogue
        self.settings = settings
        self.labels = labels
        # a dealer's charts are loaded once per batch and written back by flush()
        self.watches: dict[str, tuple[DropWatch, int]] = {}

    # -- state ------------------------------------------------------------------

    def _dealer_state(self, dealer: str) -> dict[str, Any]:
        state = self.cache.get(f"alerting|{dealer}")
        if state is None:
            # due: the next escalation time of each case that can still escalate;
            # open: the customer's case not closed yet; awaiting: cases waiting for
            # the customer's next response ([case_id, opened_at]) — small indexes,
            # so an event never has to read every case of its dealer
            return {"clock": None, "due": {}, "open": {}, "awaiting": {}, "sla": {}, "audits": {}}
        return state

    def _case(self, case_id: str) -> Case | None:
        stored = self.cache.get(f"case|{case_id}")
        return Case.from_dict(stored) if stored else None

    def _save_case(self, case: Case, partition: int) -> None:
        self.cache.put(f"case|{case.case_id}", case.to_dict(), partition)

    def flush(self) -> None:
        """Write every state change of this batch to the store."""
        for key, (watch, partition) in self.watches.items():
            self.cache.put(key, watch.dump(), partition)
        self.watches.clear()
        self.cache.flush()

    # -- events -------------------------------------------------------------------

    def on_event(self, event: AnyEvent, partition: int) -> list[Record]:
        """Everything one accepted event changes; call in arrival order."""
        dealer = event.dealer_id
        state = self._dealer_state(dealer)
        out: list[Record] = []
        # The dealer's clock moves first, so what fell due before this event is
        # seen as overdue even when this event is the late response itself.
        out += self._advance_clock(dealer, state, event.occurred_at.astimezone(UTC), partition)
        if isinstance(event, SurveyEvent | CallEvent):
            out += self._drops(event, partition)
            out += self._recovery(event, state, partition)
            out += self._hot(event, state, partition)
        elif isinstance(event, ComplaintEvent):
            out += self._complaint(event, state)
        elif isinstance(event, MysteryShopEvent):
            out += self._audit(event, state)
        self.cache.put(f"alerting|{dealer}", state, partition)
        return out

    def _advance_clock(
        self, dealer: str, state: dict[str, Any], clock: datetime, partition: int
    ) -> list[Record]:
        """Move the dealer's event clock forward; what fell due before it shows now."""
        if state["clock"] is not None and clock <= datetime.fromisoformat(state["clock"]):
            return []
        state["clock"] = clock.isoformat()
        return [
            *self._overdue(dealer, state, clock, partition),
            *self._sla_overdue(dealer, state, clock),
        ]

    def _alert(self, dealer: str, **values: Any) -> Alert:
        region, brand = self.labels(dealer)
        values.setdefault("scope", "dealer")
        values.setdefault("key", dealer)
        values.setdefault("updated_at", values["detected_at"])
        for name in ("baseline", "current", "statistic", "threshold", "chance_per_year"):
            values.setdefault(name, None)
        values.setdefault("n", 0)
        values.setdefault("method", "rule")
        return Alert(region=region, brand=brand, **values)

    # -- drops ----------------------------------------------------------------------

    def _drops(self, event: SurveyEvent | CallEvent, partition: int) -> list[Record]:
        inputs = drop_inputs(event, self.catalogue)
        if not inputs:
            return []
        key = f"drops|dealer|{event.dealer_id}|{event.department}"
        if key in self.watches:
            watch = self.watches[key][0]
        else:
            region, brand = self.labels(event.dealer_id)
            watch = DropWatch(
                "dealer", event.dealer_id, region, brand, event.department, self.settings
            )
            watch.load(self.cache.get(key))
        self.watches[key] = (watch, partition)
        items = {m: (1, x, 0.0) for m, x in inputs.items()}
        return list(watch.feed(items, event.occurred_at.astimezone(UTC), str(event.event_id)))

    # -- hot alerts and cases -------------------------------------------------------

    def _hot(
        self, event: SurveyEvent | CallEvent, state: dict[str, Any], partition: int
    ) -> list[Record]:
        reasons = hot_reasons(event, self.settings)
        if not reasons:
            return []
        dealer, at = event.dealer_id, event.occurred_at.astimezone(UTC)
        open_id = state["open"].get(event.customer_ref)
        existing = self._case(open_id) if open_id is not None else None
        out: list[Record] = []
        if existing is not None:
            # the same customer again: one case, not two calls to one person
            case = existing
            case.hot_events += 1
            case.reasons = [*case.reasons, *reasons]
            self._change(case, "hot_again", at, partition, out)
        else:
            region, brand = self.labels(dealer)
            case = Case(
                case_id=f"{dealer}/{stable_id('case', event.event_id)[:10]}",
                dealer_id=dealer, region=region, brand=brand, department=event.department,
                customer_ref=event.customer_ref, reasons=reasons,
                source_event_id=str(event.event_id), opened_at=at,
                contact_due_at=at + timedelta(hours=self.settings.case_contact_hours),
                resolve_due_at=at + timedelta(hours=self.settings.case_resolve_hours),
                updated_at=at,
            )  # fmt: skip
            state["awaiting"][event.customer_ref] = [case.case_id, at.isoformat()]
            self._index(case, state)
            self._save_case(case, partition)
            out.append(case.snapshot())
        alert_id = stable_id("hot", event.event_id)
        case.open_hot_alerts = [
            *case.open_hot_alerts,
            {"alert_id": alert_id, "detected_at": at.isoformat(), "event_id": str(event.event_id)},
        ]
        self._save_case(case, partition)
        comment = getattr(event, "comment", None)
        said = f' They wrote: "{comment[:140]}".' if comment else ""
        source = "survey" if isinstance(event, SurveyEvent) else "follow-up call"
        out.insert(
            0,
            self._alert(
                dealer, alert_id=alert_id, kind="hot", status="open",
                department=event.department, metric="response", detected_at=at,
                current=float(event.overall) if event.overall is not None else None, n=1,
                message=(
                    f"Dealer {dealer}: a {source} needs a call back — {'; '.join(reasons)}."
                    f"{said} Contact the customer by {_fmt_time(case.contact_due_at)} "
                    f"(case {case.case_id})."
                ),
                case_id=case.case_id, event_id=str(event.event_id),
            ),
        )  # fmt: skip
        return out

    def _change(
        self, case: Case, change: str, at: datetime, partition: int, out: list[Record]
    ) -> None:
        case.change, case.seq = change, case.seq + 1
        case.updated_at = max(at, case.updated_at or at)
        self._save_case(case, partition)
        out.append(case.snapshot())

    def _recovery(
        self, event: SurveyEvent | CallEvent, state: dict[str, Any], partition: int
    ) -> list[Record]:
        waiting = state["awaiting"].get(event.customer_ref)
        if waiting is None:
            return []
        case = self._case(waiting[0])
        if case is None or case.source_event_id == str(event.event_id):
            return []
        if event.occurred_at <= case.opened_at:
            return []
        verdict = shows_recovery(event, self.settings)
        if verdict is None:
            return []
        del state["awaiting"][event.customer_ref]
        case.recovery = "recovered" if verdict else "not_recovered"
        case.recovery_event_id = str(event.event_id)
        out: list[Record] = []
        self._change(case, "recovery", event.occurred_at.astimezone(UTC), partition, out)
        return out

    def _overdue(
        self, dealer: str, state: dict[str, Any], clock: datetime, partition: int
    ) -> list[Record]:
        out: list[Record] = []
        for case_id, due in list(state["due"].items()):
            if clock <= datetime.fromisoformat(due):
                continue
            case = self._case(case_id)
            if case is None:
                del state["due"][case_id]
                continue
            stages = (
                (1, "contact", case.contact_due_at, case.status == "open"),
                (2, "resolution", case.resolve_due_at, case.status in ("open", "contacted")),
            )
            for level, stage, stage_due, pending in stages:
                if pending and clock > stage_due and case.escalation_level < level:
                    case.escalation_level = level
                    self._change(case, f"escalated_{stage}", clock, partition, out)
            self._index(case, state)
        for ref, (_, opened) in list(state["awaiting"].items()):
            # stop waiting for a recovery signal 90 days after the case opened
            if clock - datetime.fromisoformat(opened) > timedelta(days=90):
                del state["awaiting"][ref]
        return out

    @staticmethod
    def _index(case: Case, state: dict[str, Any]) -> None:
        """Keep the dealer's small indexes in step with one case."""
        if case.status == "open" and case.escalation_level < 1:
            state["due"][case.case_id] = case.contact_due_at.isoformat()
        elif case.status in ("open", "contacted") and case.escalation_level < 2:
            state["due"][case.case_id] = case.resolve_due_at.isoformat()
        else:
            state["due"].pop(case.case_id, None)
        if case.status == "closed":
            if state["open"].get(case.customer_ref) == case.case_id:
                del state["open"][case.customer_ref]
        else:
            state["open"][case.customer_ref] = case.case_id

    def on_case_action(self, action: CaseAction, partition: int) -> list[Record]:
        """Apply one case action; InvalidEvent (a dead letter) when the case cannot take it."""
        case = self._case(action.case_id)
        if case is None:
            raise InvalidEvent(f"case_id: no case {action.case_id!r} is known")
        if str(action.action_id) in case.action_ids:
            return []  # a replayed action
        at = action.occurred_at.astimezone(UTC)
        allowed = {
            "contact": ("open",),
            "resolve": ("contacted",),
            "close": ("open", "contacted", "resolved"),
            "reopen": ("resolved", "closed"),
        }[action.action]
        if case.status not in allowed:
            raise InvalidEvent(
                f"action: cannot {action.action} case {case.case_id} while it is {case.status}"
                f" (allowed from {', '.join(allowed)})"
            )
        if action.action == "close" and action.reason == "resolved" and case.status != "resolved":
            raise InvalidEvent(
                f"reason: case {case.case_id} is {case.status}, not resolved; "
                "close it with another reason or resolve it first"
            )
        state = self._dealer_state(action.dealer_id)
        out = self._advance_clock(action.dealer_id, state, at, partition)
        case = self._case(action.case_id)  # an escalation may have changed it
        assert case is not None
        if action.action == "contact":
            case.status, case.contacted_at = "contacted", at
        elif action.action == "resolve":
            case.status, case.resolved_at = "resolved", at
        elif action.action == "close":
            case.status, case.closed_at = "closed", at
            case.close_reason, case.comment = action.reason or "", action.comment or ""
        else:
            case.status = "contacted" if case.contacted_at else "open"
            case.resolved_at = case.closed_at = None
        self._index(case, state)
        case.action_ids = [*case.action_ids, str(action.action_id)]
        closing = case.open_hot_alerts if case.status == "closed" else []
        case.open_hot_alerts = [] if closing else case.open_hot_alerts
        self._change(case, action.action, at, partition, out)
        out += [self._close_hot(case, hot, at) for hot in closing]
        self.cache.put(f"alerting|{action.dealer_id}", state, partition)
        return out

    def _close_hot(self, case: Case, hot: dict[str, str], at: datetime) -> Alert:
        """Closing a case closes each hot alert it raised (a reopened case's
        alerts stay closed; a new hot response on it raises a new one)."""
        return self._alert(
            case.dealer_id, alert_id=hot["alert_id"], kind="hot",
            status="closed", department=case.department, metric="response",
            detected_at=datetime.fromisoformat(hot["detected_at"]), updated_at=at,
            message=f"Case {case.case_id} closed ({case.close_reason}): {case.comment}",
            case_id=case.case_id, event_id=hot["event_id"],
        )  # fmt: skip

    # -- complaints -----------------------------------------------------------------

    def _complaint(self, event: ComplaintEvent, state: dict[str, Any]) -> list[Record]:
        """SLA alerts by event time. `state["sla"]` keeps the dealer's open
        complaints' due times; the overdue check runs in `_sla_overdue`."""
        sla: dict[str, Any] = state["sla"]
        at = event.occurred_at.astimezone(UTC)
        out: list[Record] = []
        cid = event.complaint_id
        if event.status == "opened" and cid not in sla:
            severity = event.severity
            first_due = at + timedelta(hours=self.settings.sla_first_response_hours[severity])
            resolve_due = at + timedelta(hours=self.settings.sla_resolution_hours[severity])
            sla[cid] = {
                "opened_at": at.isoformat(), "severity": severity,
                "department": event.department,
                "first_due": first_due.isoformat(), "resolve_due": resolve_due.isoformat(),
                "responded": False, "resolved": False, "alerted": [],
            }  # fmt: skip
            return out
        entry = sla.get(cid)
        if entry is None:
            return out
        out += self._sla_overdue(event.dealer_id, state, at)  # the late answer itself is seen late
        stage = None
        if event.status == "responded" and not entry["responded"]:
            entry["responded"], stage = True, "first_response"
        if event.status in ("resolved", "closed") and not entry["resolved"]:
            if not entry["responded"]:  # resolved without a separate first response
                entry["responded"] = True
                if "first_response" in entry["alerted"]:
                    out.append(self._sla_closed(event.dealer_id, cid, entry, "first_response", at))
            entry["resolved"], stage = True, "resolution"
        if stage is not None and stage in entry["alerted"]:
            out.append(self._sla_closed(event.dealer_id, cid, entry, stage, at))
        if entry["resolved"]:
            del sla[cid]
        return out

    def _sla_closed(
        self, dealer: str, cid: str, entry: dict[str, Any], stage: str, at: datetime
    ) -> Alert:
        opened = datetime.fromisoformat(entry["opened_at"])
        hours = (at - opened).total_seconds() / 3600
        label = "first response" if stage == "first_response" else "resolution"
        due = entry["first_due" if stage == "first_response" else "resolve_due"]
        return self._alert(
            dealer, alert_id=stable_id("sla", dealer, cid, stage), kind="complaint_sla",
            status="closed", department=entry["department"], metric=stage,
            detected_at=datetime.fromisoformat(due), updated_at=at, current=hours, n=1,
            message=f"Complaint {cid} at dealer {dealer}: {label} after {hours:.0f} h.",
        )  # fmt: skip

    def _sla_overdue(self, dealer: str, state: dict[str, Any], clock: datetime) -> list[Record]:
        out: list[Record] = []
        for cid, entry in state["sla"].items():
            for stage, due_key, done in (
                ("first_response", "first_due", entry["responded"]),
                ("resolution", "resolve_due", entry["resolved"]),
            ):
                due = datetime.fromisoformat(entry[due_key])
                if done or stage in entry["alerted"] or clock <= due:
                    continue
                entry["alerted"].append(stage)
                opened = datetime.fromisoformat(entry["opened_at"])
                allowed = (due - opened).total_seconds() / 3600
                label = "no first response" if stage == "first_response" else "not resolved"
                out.append(
                    self._alert(
                        dealer, alert_id=stable_id("sla", dealer, cid, stage),
                        kind="complaint_sla", status="open", department=entry["department"],
                        metric=stage, detected_at=due, baseline=allowed,
                        current=(clock - opened).total_seconds() / 3600, n=1,
                        message=(
                            f"Complaint {cid} (severity {entry['severity']}) at dealer {dealer}: "
                            f"{label} {allowed:.0f} h after it was opened "
                            f"(due {_fmt_time(due)})."
                        ),
                    )
                )  # fmt: skip
        return out

    # -- mystery shop -----------------------------------------------------------------

    def _audit(self, event: MysteryShopEvent, state: dict[str, Any]) -> list[Record]:
        dealer, at = event.dealer_id, event.occurred_at.astimezone(UTC)
        score = audit_score(event.items)
        mark = event.pass_mark if event.pass_mark is not None else self.settings.mystery_pass_mark
        failed = [i.code for i in event.items if i.mandatory and i.result == "fail"]
        slot = f"{event.department}|{event.scenario}"
        out: list[Record] = []
        below = score is not None and score < mark
        previous: dict[str, str] | None = state["audits"].get(slot)
        if not below and not failed:
            if previous is not None:
                del state["audits"][slot]
                out.append(
                    self._alert(
                        dealer, alert_id=previous["alert_id"], kind="mystery_shop",
                        status="closed", department=event.department, metric=previous["metric"],
                        detected_at=datetime.fromisoformat(previous["detected_at"]),
                        updated_at=at, baseline=mark, current=score, n=1,
                        message=(
                            f"Dealer {dealer} passed its next {event.scenario} mystery shop "
                            f"({score:.0f}% against {mark:.0f}%)."
                        ),
                        event_id=str(event.event_id),
                    )
                )  # fmt: skip
            return out
        parts = []
        if below:
            parts.append(f"scored {score:.0f}% against a pass mark of {mark:.0f}%")
        if failed:
            parts.append(
                f"failed mandatory item{'s' if len(failed) > 1 else ''} {', '.join(failed)}"
            )
        alert_id = stable_id("audit", event.event_id)
        if previous is not None:  # the earlier failed audit's alert gives way to this one
            out.append(
                self._alert(
                    dealer, alert_id=previous["alert_id"], kind="mystery_shop", status="closed",
                    department=event.department, metric=previous["metric"],
                    detected_at=datetime.fromisoformat(previous["detected_at"]), updated_at=at,
                    message=f"Superseded by audit {event.audit_id}.",
                )
            )  # fmt: skip
        metric = "audit_score" if below else "mandatory_item"
        state["audits"][slot] = {
            "alert_id": alert_id,
            "metric": metric,
            "detected_at": at.isoformat(),
        }
        out.append(
            self._alert(
                dealer, alert_id=alert_id, kind="mystery_shop", status="open",
                department=event.department, metric=metric, detected_at=at,
                baseline=mark, current=score, n=1,
                message=(
                    f"Dealer {dealer}'s {event.scenario} mystery shop (audit {event.audit_id}) "
                    f"{' and '.join(parts)}."
                ),
                event_id=str(event.event_id),
            )
        )  # fmt: skip
        return out


# --- drop watches (dealer per response, region per closed day) -----------------------


class DropWatch:
    """The three drop charts of one unit and department, and their open alerts."""

    def __init__(
        self,
        scope: str,
        key: str,
        region: str,
        brand: str,
        department: str,
        settings: AlertSettings,
    ) -> None:
        self.scope, self.key, self.region, self.brand = scope, key, region, brand
        self.department = department
        self.settings = settings
        self.policies: dict[str, AlertPolicy] = {}
        self.open: dict[str, dict[str, Any]] = {}
        self.closed_through: str | None = None
        self.members: dict[str, dict[str, Any]] = {}
        """Regions: each dealer's newest day (`day`) and when it was last heard
        from (`heard_at`, processing time, epoch seconds), which hold back closing
        a day while a dealer (on a partition that lags) has not reported up to it."""
        self.first_heard_at: float | None = None
        """Regions: when the region was first heard from (processing time)."""

    @property
    def state_key(self) -> str:
        return f"drops|{self.scope}|{self.key}|{self.department}"  # as AlertEngine._drops

    def load(self, stored: dict[str, Any] | None) -> None:
        if stored:
            self.policies = {m: AlertPolicy.from_dict(p) for m, p in stored["policies"].items()}
            self.open = dict(stored["open"])
            self.closed_through = stored.get("closed_through")
            self.members = {
                dealer: m if isinstance(m, dict) else {"day": m, "heard_at": 0.0}
                for dealer, m in stored.get("members", {}).items()
            }  # (state from before heard_at: a bare day)
            self.first_heard_at = stored.get("first_heard_at")

    def dump(self) -> dict[str, Any]:
        return {
            "policies": {m: p.to_dict() for m, p in self.policies.items()},
            "open": self.open,
            "closed_through": self.closed_through,
            "members": self.members,
            "first_heard_at": self.first_heard_at,
        }

    def feed(
        self, items: dict[str, tuple[int, float, float]], at: datetime, event_id: str = ""
    ) -> list[Alert]:
        """Feed one item per metric; the alerts that opened or closed."""
        alerts: list[Alert] = []
        for metric in DROP_METRICS:
            if metric not in items:
                continue
            if metric not in self.policies:
                self.policies[metric] = self.settings.policy(metric, self.scope)
            policy = self.policies[metric]
            n, mean, m2 = items[metric]
            signal = policy.update_item(n, mean, m2, at.date())
            if signal is None:
                continue
            if signal.status == "open":
                alert_id = stable_id(
                    "drop", self.scope, self.key, self.department, metric, policy.alerts
                )
                self.open[metric] = {"alert_id": alert_id, "detected_at": at.isoformat()}
                detected = at
            else:
                opened = self.open.pop(metric, None)
                if opened is None:
                    continue
                alert_id = opened["alert_id"]
                detected = datetime.fromisoformat(opened["detected_at"])
            per_year = chance_per_year(signal.run_length, policy.responses_per_year())
            base, cur = drop_values(metric, signal)
            alerts.append(Alert(
                alert_id=alert_id, kind="drop", status=signal.status, scope=self.scope,
                key=self.key, region=self.region, brand=self.brand,
                department=self.department, metric=metric, detected_at=detected,
                updated_at=at, baseline=round(base, 2), current=round(cur, 2), n=signal.n,
                method=signal.method, statistic=round(signal.statistic, 3),
                threshold=signal.threshold,
                chance_per_year=None if per_year is None else round(per_year, 4),
                message=drop_message(
                    self.scope, self.key, self.department, metric, signal, per_year
                ),
                event_id=event_id,
            ))  # fmt: skip
        return alerts


def region_watch_days(
    closed_through: date | None, first_changed: date, latest: date, grace: int
) -> list[date]:
    """The region days to feed now: after the last fed day, up to `latest − grace`."""
    start = closed_through + timedelta(days=1) if closed_through else first_changed
    end = latest - timedelta(days=grace)
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]
