"""Every satisfaction formula, once, as pure functions over plain data.

The stream (Faust worker) and the batch path (`csi metrics`, tests) both go
through `Bucket` — mergeable sufficient statistics for one unit (dealer,
region, brand or network; one department) and one day — and `figures()`, so
both give identical numbers. A window is the merge of its daily buckets; a
roll-up is the merge of its dealers' buckets.

Conventions (DOMAIN.md, issue 3):
- a rating x on a scale [lo, hi] is rescaled to 1–10: x10 = 1 + 9·(x−lo)/(hi−lo);
- factor index = 100 · mean(x10) pooled over all ratings of the factor's
  attributes in the window; CSI = Σ w_f·index_f / Σ w_f over factors with data;
- NPS = 100·(promoters − detractors)/n over surveys with `recommend`
  (promoters 9–10, detractors 0–6), standard error 100·sqrt((p+d−(p−d)²)/n);
- satisfaction rate: `overall` at or above the middle of its scale;
  CSAT top-2-box: `overall` in the two highest points;
- satisfaction degree = Σ w_f·mean(100·(x−lo)/(hi−lo))_f / Σ w_f; since
  100·(x−lo)/(hi−lo) = 100·(x10−1)/9 it follows from the factor sums;
- ACSI-style index = 100/9 · Σ w_i·(mean_i − 1) over overall satisfaction,
  expectation disconfirmation and comparison to ideal on 1–10 (weights sum to 1);
- CSM: each catalogue rating mapped to −90 + 180·(x−lo)/(hi−lo) = −90 + 20·(x10−1),
  averaged over all of them;
- CSS ratio per response = perception / expectation; exceeded above 1 + ε,
  disappointed below 1 − ε, met otherwise (ε = 0.05);
- SERVQUAL gap per RATER dimension = mean of x10(rating) − x10(expectation);
- mystery-shop score = 100 · Σ w·pass / Σ w·(pass + fail), N/A items leave both;
- response rate = surveys / visits · 100; complaints per 100 visits count
  complaints opened in the window;
- a window of N days ending on D holds events whose UTC date is in
  [D−N+1, D]; a calendar month window ending on D holds the month up to D.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from pipeline.catalogue import RATER_DIMENSIONS, Catalogue
from schemas import (
    AnyEvent,
    AuditItem,
    CallEvent,
    ComplaintEvent,
    MysteryShopEvent,
    Scale,
    SurveyEvent,
    VisitEvent,
)

CSS_EPSILON = 0.05
"""Tolerance around a CSS ratio of 1 within which expectations count as met."""

FOLLOW_UP_DAYS = 3
"""A visit is followed up when a call reaches the customer within this many days of delivery."""
COMEBACK_DAYS = 30
"""A visit is not fixed first time when a comeback visit arrives within this many days."""
SLA_FIRST_RESPONSE_HOURS = {4: 4, 3: 8, 2: 24, 1: 48}
"""Complaint first-response due time by severity (4 = most severe), hours."""
SLA_RESOLUTION_HOURS = {4: 48, 3: 120, 2: 240, 1: 360}
"""Complaint resolution due time by severity, hours."""

WINDOWS: dict[str, int | None] = {"day": 1, "7d": 7, "30d": 30, "90d": 90, "month": None}
"""Window name → length in days; None for the calendar month to date."""


# --- scalar formulas -------------------------------------------------------


def rescale_to_10(x: float, lo: float, hi: float) -> float:
    """A rating on [lo, hi] on the 1–10 scale."""
    return 1.0 + 9.0 * (x - lo) / (hi - lo)


def factor_index(sum_x10: float, n: float) -> float | None:
    """100 · mean rating on the 1–10 scale (100–1000); None without ratings."""
    return 100.0 * sum_x10 / n if n else None


def csi(factor_indices: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """Weighted mean of the factor indices that have data."""
    present = [(weights[f], v) for f, v in factor_indices.items() if v is not None]
    total_weight = sum(w for w, _ in present)
    if not present or total_weight == 0:
        return None
    return sum(w * v for w, v in present) / total_weight


def response_csi(scale: Scale, ratings: Mapping[str, float], catalogue: Catalogue) -> float | None:
    """One response's own CSI (100–1000): its factor means on the 1–10 scale, weighted.

    What the drop detectors follow response by response; the mean of these
    equals a window's CSI when every response rates every factor."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for code, rating in ratings.items():
        factor = catalogue.attribute_factor.get(code)
        if factor is not None:
            sums[factor] = sums.get(factor, 0.0) + rescale_to_10(rating, scale.min, scale.max)
            counts[factor] = counts.get(factor, 0) + 1
    return csi({f: factor_index(sums[f], counts[f]) for f in sums}, catalogue.factor_weights)


def audit_score(items: Iterable[AuditItem]) -> float | None:
    """Mystery-shop score of one audit: 100 · Σ w·pass / Σ w·(pass + fail)."""
    passed = total = 0.0
    for item in items:
        if item.result != "na":
            total += item.weight
            passed += item.weight * (item.result == "pass")
    return 100.0 * passed / total if total else None


def nps(promoters: float, detractors: float, n: float) -> float | None:
    """Net promoter score, −100…100; None without answers."""
    return 100.0 * (promoters - detractors) / n if n else None


def nps_standard_error(promoters: float, detractors: float, n: float) -> float | None:
    """Standard error of NPS in points: 100·sqrt((p + d − (p − d)²)/n)."""
    if n <= 0:  # no answers (or a torn roll-up total, docs/reliability.md): no figure
        return None
    p, d = promoters / n, detractors / n
    return 100.0 * math.sqrt(max(p + d - (p - d) ** 2, 0.0) / n)


def nps_category(recommend: int) -> str:
    return "promoter" if recommend >= 9 else "detractor" if recommend <= 6 else "passive"


def percent(part: float, whole: float) -> float | None:
    """100 · part / whole; None when there is nothing to divide by."""
    return 100.0 * part / whole if whole else None


def mean(total: float, n: float) -> float | None:
    return total / n if n else None


def satisfaction_degree_from_x10(mean_x10: float) -> float:
    """An item's 0–100 satisfaction degree from its mean on the 1–10 scale."""
    return 100.0 * (mean_x10 - 1.0) / 9.0


def csm_from_x10(mean_x10: float) -> float:
    """CSM (−90…+90) from the mean on the 1–10 scale: −90 + 20·(x10 − 1)."""
    return -90.0 + 20.0 * (mean_x10 - 1.0)


def css_verdict(ratio: float, epsilon: float = CSS_EPSILON) -> str:
    if ratio > 1.0 + epsilon:
        return "exceeded"
    return "disappointed" if ratio < 1.0 - epsilon else "met"


def percentile(counts: Mapping[str, float], q: float) -> float | None:
    """Nearest-rank percentile of values stored as {value: count}; None if empty.

    Values are whole minutes as text (mergeable: counts add up), so p50/p90
    of a window are exact at minute resolution."""
    pairs = sorted((float(v), c) for v, c in counts.items() if c > 0)
    total = sum(c for _, c in pairs)
    if not total:
        return None
    rank, seen = math.ceil(q * total), 0.0
    for value, count in pairs:
        seen += count
        if seen >= rank:
            return value
    return pairs[-1][0]


def is_top2(x: float, scale: Scale) -> bool:
    """In the two highest points of the scale."""
    return x >= scale.max - 1


def is_satisfied(x: float, scale: Scale) -> bool:
    """At or above the middle of the scale: (x − min)/(max − min) ≥ 0.5."""
    return (x - scale.min) / (scale.max - scale.min) >= 0.5


# --- mergeable sufficient statistics ----------------------------------------


@dataclass
class Bucket:
    """Sufficient statistics of one unit over some days: named sums and counts.

    Only sums: merging two buckets adds them, so windows and roll-ups are
    sums of daily buckets in any order. Names with a `:` carry a factor,
    RATER dimension or audit section after it.
    """

    stats: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float = 1.0) -> None:
        self.stats[name] = self.stats.get(name, 0.0) + value

    def get(self, name: str) -> float:
        return self.stats.get(name, 0.0)

    def merge(self, other: Bucket) -> None:
        """Add `other` into this bucket (in place)."""
        for name, value in other.stats.items():
            self.stats[name] = self.stats.get(name, 0.0) + value

    def minus(self, other: Bucket) -> Bucket:
        """This bucket less `other` (the change from `other` to this one)."""
        diff = dict(self.stats)
        for name, value in other.stats.items():
            diff[name] = diff.get(name, 0.0) - value
        return Bucket({k: v for k, v in diff.items() if v != 0.0})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.stats)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Bucket:
        return cls({str(k): float(v) for k, v in data.items()})

    # -- events ---------------------------------------------------------------

    def add_event(self, event: AnyEvent, catalogue: Catalogue) -> None:
        if isinstance(event, SurveyEvent):
            self.add("surveys")
            self._add_response(event.scale, event.ratings, event.overall, catalogue)
            self._add_survey_extras(event, catalogue)
        elif isinstance(event, VisitEvent):
            self._add_visit(event)
        elif isinstance(event, CallEvent):
            self._add_call(event, catalogue)
        elif isinstance(event, ComplaintEvent):
            self._add_complaint(event)
        elif isinstance(event, MysteryShopEvent):
            self._add_audit(event)

    def _add_response(
        self,
        scale: Scale,
        ratings: Mapping[str, float],
        overall: float | None,
        catalogue: Catalogue,
    ) -> None:
        """A survey, or a call carrying ratings: both are responses."""
        self.add("responses")
        lo, hi = scale.min, scale.max
        for code, rating in ratings.items():
            factor = catalogue.attribute_factor.get(code)
            if factor is None:  # outside the catalogue: stored raw, counts toward no factor
                continue
            x10 = rescale_to_10(rating, lo, hi)
            self.add(f"factor_n:{factor}")
            self.add(f"factor_sum:{factor}", x10)
            self.add(f"factor_sumsq:{factor}", x10 * x10)
        score = response_csi(scale, ratings, catalogue)
        if score is not None:  # per-response CSI: the region drop detectors' input
            self.add("csi_resp_n")
            self.add("csi_resp_sum", score)
            self.add("csi_resp_sumsq", score * score)
        if overall is not None:
            self.add("overall_n")
            self.add("overall_top2", is_top2(overall, scale))
            self.add("overall_satisfied", is_satisfied(overall, scale))

    def _add_survey_extras(self, survey: SurveyEvent, catalogue: Catalogue) -> None:
        lo, hi = survey.scale.min, survey.scale.max
        acsi_items = (
            ("overall", survey.overall),  # surveys only: one population for all three items
            ("disconfirmation", survey.disconfirmation),
            ("ideal", survey.ideal),
        )
        for item, answer in acsi_items:
            if answer is not None:
                self.add(f"acsi_n:{item}")
                self.add(f"acsi_sum:{item}", rescale_to_10(answer, lo, hi))
        if survey.recommend is not None:
            self.add("nps_n")
            category = nps_category(survey.recommend)
            self.add("promoters", category == "promoter")
            self.add("detractors", category == "detractor")
        # both on the survey's scale; a ratio needs a positive expectation
        if survey.perception is not None and survey.expectation:
            ratio = survey.perception / survey.expectation
            self.add("css_n")
            self.add("css_sum", ratio)
            self.add(f"css_{css_verdict(ratio)}")
        for code, expected in survey.expectations.items():
            dimension = catalogue.attribute_dimension.get(code)
            rating = survey.ratings.get(code)
            if dimension is None or rating is None:
                continue
            gap = rescale_to_10(rating, lo, hi) - rescale_to_10(expected, lo, hi)
            self.add(f"servqual_n:{dimension}")
            self.add(f"servqual_sum:{dimension}", gap)

    def _add_visit(self, visit: VisitEvent) -> None:
        self.add("visits")
        if visit.promised_at is not None and visit.delivered_at is not None:
            self.add("on_time_n")
            self.add("on_time", visit.delivered_at <= visit.promised_at)
        if visit.greeted_at is not None:
            self.add("greet_wait_n")
            self.add("greet_wait_min", (visit.greeted_at - visit.arrived_at).total_seconds() / 60)
        if visit.estimate_amount and visit.invoice_amount is not None:
            self.add("invoice_ratio_n")
            self.add("invoice_ratio_sum", visit.invoice_amount / visit.estimate_amount)
        if visit.comeback_of is not None:
            self.add("comebacks")

    def _add_call(self, call: CallEvent, catalogue: Catalogue) -> None:
        self.add("calls")
        self.add("calls_reached", call.outcome == "reached")
        self.add("calls_issue_reported", bool(call.issue_reported))
        if call.carries_ratings:
            self._add_response(call.scale, call.ratings, call.overall, catalogue)

    def _add_complaint(self, complaint: ComplaintEvent) -> None:
        self.add(f"complaints_{complaint.status}")
        if complaint.status == "closed" and complaint.satisfied_after is not None:
            self.add("recovery_n")
            self.add("recovered", complaint.satisfied_after)

    def _add_audit(self, audit: MysteryShopEvent) -> None:
        self.add("audits")
        for item in audit.items:
            if item.result == "na":
                continue
            self.add(f"audit_total_w:{item.section}", item.weight)
            self.add(f"audit_pass_w:{item.section}", item.weight * (item.result == "pass"))
            self.add("audit_mandatory_failed", item.mandatory and item.result == "fail")

    # -- joined facts (the stream finds them by visit_id / complaint_id) ------

    def add_follow_up(self) -> None:
        """A visit of this day got a reached call within FOLLOW_UP_DAYS."""
        self.add("followed_up")

    def add_comeback_against(self) -> None:
        """A visit of this day came back within COMEBACK_DAYS: not fixed first time."""
        self.add("comebacks_against")

    def add_complaint_duration(self, kind: str, minutes: int, past_due: bool) -> None:
        """`kind` is first_response or resolution, for a complaint opened this day."""
        self.add(f"{kind}_min:{minutes}")
        self.add(f"{kind}_n")
        self.add(f"{kind}_past_due", past_due)

    def add_loyalty(self, sales: str, service: str, high_return_intent: bool) -> None:
        """One service response in the loyalty matrix: cell `sales|service`, where
        sales is satisfied, dissatisfied or none (no sales survey of the customer)."""
        cell = f"{sales}|{service}"
        self.add(f"loyalty_n:{cell}")
        self.add(f"loyalty_high:{cell}", high_return_intent)

    def by_suffix(self, prefix: str) -> dict[str, float]:
        """{suffix: value} of every statistic named `prefix:suffix`."""
        head = prefix + ":"
        return {k[len(head) :]: v for k, v in self.stats.items() if k.startswith(head)}

    def groups(self) -> dict[str, dict[str, float]]:
        """Every `prefix:suffix` statistic as {prefix: {suffix: value}}, in one pass
        (what `by_suffix` gives for one prefix; figures() needs a dozen of them)."""
        out: dict[str, dict[str, float]] = {}
        for name, value in self.stats.items():
            prefix, sep, suffix = name.partition(":")
            if sep:
                group = out.get(prefix)
                if group is None:
                    out[prefix] = group = {}
                group[suffix] = value
        return out


def merged(buckets: Iterable[Bucket]) -> Bucket:
    total = Bucket()
    for bucket in buckets:
        total.merge(bucket)
    return total


# --- the figures of a bucket --------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """Every metric of one bucket (usually a window's merged buckets).

    Percentages are 0–100; a metric without data is None, never 0."""

    n_responses: int
    n_surveys: int
    n_visits: int
    csi: float | None
    factors: dict[str, float]
    factor_n: dict[str, int]
    nps: float | None
    nps_n: int
    nps_se: float | None
    csat_top2: float | None
    satisfaction_rate: float | None
    satisfaction_degree: float | None
    overall_n: int
    acsi: float | None
    csm: float | None
    css_ratio: float | None
    css_exceeded: float | None
    css_met: float | None
    css_disappointed: float | None
    css_n: int
    servqual_gap: dict[str, float]
    servqual_overall: float | None
    response_rate: float | None
    contact_rate: float | None
    n_calls: int
    on_time_rate: float | None
    greet_wait_min: float | None
    invoice_vs_estimate: float | None
    comeback_rate: float | None
    follow_up_rate: float | None
    fixed_first_time: float | None
    complaints_opened: int
    complaints_per_100_visits: float | None
    complaints_backlog: int | None
    recovery_success: float | None
    first_response_p50_h: float | None
    first_response_p90_h: float | None
    first_response_past_sla: float | None
    resolution_p50_h: float | None
    resolution_p90_h: float | None
    resolution_past_sla: float | None
    loyalty_matrix: dict[str, float]
    loyalty_n: dict[str, int]
    mystery_shop_score: float | None
    mystery_shop_sections: dict[str, float]
    n_audits: int
    weights_version: str


def figures(bucket: Bucket, catalogue: Catalogue) -> Figures:
    b = bucket.get
    grouped = bucket.groups()

    def by_suffix(prefix: str) -> dict[str, float]:
        return grouped.get(prefix, {})

    factor_n, factor_sum = by_suffix("factor_n"), by_suffix("factor_sum")
    indices = {
        f: factor_index(factor_sum.get(f, 0.0), factor_n.get(f, 0.0)) for f in catalogue.factors
    }
    degrees = {
        f: satisfaction_degree_from_x10(factor_sum[f] / factor_n[f])
        for f in catalogue.factors
        if factor_n.get(f)
    }
    rated = sum(factor_n.get(f, 0.0) for f in catalogue.factors)
    servqual_n, servqual_sum = by_suffix("servqual_n"), by_suffix("servqual_sum")
    gaps = {
        d: servqual_sum.get(d, 0.0) / servqual_n[d] for d in RATER_DIMENSIONS if servqual_n.get(d)
    }  # a sum may net to 0 and be absent (Bucket.minus drops zeros)
    audit_total, audit_pass = by_suffix("audit_total_w"), by_suffix("audit_pass_w")
    loyalty_n, loyalty_high = by_suffix("loyalty_n"), by_suffix("loyalty_high")
    return Figures(
        n_responses=int(b("responses")),
        n_surveys=int(b("surveys")),
        n_visits=int(b("visits")),
        csi=csi(indices, catalogue.factor_weights),
        factors={f: v for f, v in indices.items() if v is not None},
        factor_n={f: int(n) for f in catalogue.factors if (n := factor_n.get(f, 0.0))},
        nps=nps(b("promoters"), b("detractors"), b("nps_n")),
        nps_n=int(b("nps_n")),
        nps_se=nps_standard_error(b("promoters"), b("detractors"), b("nps_n")),
        csat_top2=percent(b("overall_top2"), b("overall_n")),
        satisfaction_rate=percent(b("overall_satisfied"), b("overall_n")),
        satisfaction_degree=csi(degrees, catalogue.factor_weights),
        overall_n=int(b("overall_n")),
        acsi=acsi_index(bucket, catalogue, grouped),
        csm=(
            csm_from_x10(sum(factor_sum.get(f, 0.0) for f in catalogue.factors) / rated)
            if rated
            else None
        ),
        css_ratio=mean(b("css_sum"), b("css_n")),
        css_exceeded=percent(b("css_exceeded"), b("css_n")),
        css_met=percent(b("css_met"), b("css_n")),
        css_disappointed=percent(b("css_disappointed"), b("css_n")),
        css_n=int(b("css_n")),
        servqual_gap=gaps,
        servqual_overall=sum(gaps.values()) / len(gaps) if gaps else None,
        response_rate=percent(b("surveys"), b("visits")),
        contact_rate=percent(b("calls_reached"), b("calls")),
        n_calls=int(b("calls")),
        on_time_rate=percent(b("on_time"), b("on_time_n")),
        greet_wait_min=mean(b("greet_wait_min"), b("greet_wait_n")),
        invoice_vs_estimate=mean(b("invoice_ratio_sum"), b("invoice_ratio_n")),
        comeback_rate=percent(b("comebacks"), b("visits")),
        follow_up_rate=percent(b("followed_up"), b("visits")),
        fixed_first_time=(
            100.0 - 100.0 * b("comebacks_against") / b("visits") if b("visits") else None
        ),
        complaints_opened=int(b("complaints_opened")),
        complaints_per_100_visits=percent(b("complaints_opened"), b("visits")),
        complaints_backlog=(
            round(b("backlog_carried") + b("backlog_delta"))
            if "backlog_carried" in bucket.stats or "backlog_delta" in bucket.stats
            else None
        ),
        recovery_success=percent(b("recovered"), b("recovery_n")),
        **complaint_durations(bucket, grouped),
        loyalty_matrix={
            cell: 100.0 * loyalty_high.get(cell, 0.0) / n for cell, n in loyalty_n.items() if n
        },
        loyalty_n={cell: int(n) for cell, n in loyalty_n.items() if n},
        mystery_shop_score=percent(sum(audit_pass.values()), sum(audit_total.values())),
        mystery_shop_sections={
            s: 100.0 * audit_pass.get(s, 0.0) / w for s, w in audit_total.items() if w
        },
        n_audits=int(b("audits")),
        weights_version=catalogue.version,
    )


def acsi_index(
    bucket: Bucket, catalogue: Catalogue, grouped: dict[str, dict[str, float]] | None = None
) -> float | None:
    """ACSI-style index (0–100): 100/9 · Σ w_i·(mean_i − 1) over overall
    satisfaction, expectation disconfirmation and comparison to the ideal,
    each on 1–10; None unless all three items have answers."""
    grouped = bucket.groups() if grouped is None else grouped
    n, total = grouped.get("acsi_n", {}), grouped.get("acsi_sum", {})
    if not all(n.get(item) for item in catalogue.acsi_weights):
        return None
    return 100.0 / 9.0 * sum(w * (total[i] / n[i] - 1.0) for i, w in catalogue.acsi_weights.items())


def complaint_durations(
    bucket: Bucket, grouped: dict[str, dict[str, float]] | None = None
) -> dict[str, float | None]:
    grouped = bucket.groups() if grouped is None else grouped
    out: dict[str, float | None] = {}
    for kind in ("first_response", "resolution"):
        minutes = grouped.get(f"{kind}_min", {})
        for q in (50, 90):
            value = percentile(minutes, q / 100)
            out[f"{kind}_p{q}_h"] = None if value is None else value / 60.0
        out[f"{kind}_past_sla"] = percent(bucket.get(f"{kind}_past_due"), bucket.get(f"{kind}_n"))
    return out


# --- windows -----------------------------------------------------------------


def window_start(window: str, window_end: date) -> date:
    """First day of the window `window` ending on `window_end` (inclusive)."""
    length = WINDOWS[window]
    if length is None:  # calendar month to date
        return window_end.replace(day=1)
    return window_end - timedelta(days=length - 1)


def window_days(window: str, window_end: date) -> list[date]:
    """The dates of a window, oldest first."""
    start = window_start(window, window_end)
    return [start + timedelta(days=i) for i in range((window_end - start).days + 1)]


def affected_window_ends(window: str, changed_day: date, latest_day: date) -> list[date]:
    """End dates of the windows of this kind that contain `changed_day`, up to
    `latest_day` (the unit's newest event date): a late event re-opens them all."""
    length = WINDOWS[window]
    if length is None:
        next_month = (changed_day.replace(day=28) + timedelta(days=4)).replace(day=1)
        last = min(next_month - timedelta(days=1), latest_day)
    else:
        last = min(changed_day + timedelta(days=length - 1), latest_day)
    return [changed_day + timedelta(days=i) for i in range((last - changed_day).days + 1)]
