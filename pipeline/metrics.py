"""Every satisfaction formula, once, as pure functions over plain data.

The stream (Faust worker) and the batch path (`csi metrics`, tests) both go
through `Bucket` — mergeable sufficient statistics for one dealer, department
and day — and `figures()`, so both give identical numbers. A rolling window
is the merge of its daily buckets.

Conventions (DOMAIN.md, issue 3):
- a rating x on a scale [lo, hi] is rescaled to 1–10: x10 = 1 + 9·(x−lo)/(hi−lo);
- factor index = 100 · mean(x10) pooled over all ratings of the factor's
  attributes in the window; CSI = Σ w_f·index_f / Σ w_f over factors with data;
- NPS = 100·(promoters − detractors)/n over surveys with `recommend`
  (promoters 9–10, detractors 0–6), standard error 100·sqrt((p+d−(p−d)²)/n);
- a window of N days ending on D holds events whose UTC date is in [D−N+1, D].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Protocol

from pipeline.catalogue import Catalogue

WINDOWS: dict[str, int] = {"day": 1, "30d": 30}
"""Window name → length in days, for the snapshots the worker emits."""


# --- scalar formulas -------------------------------------------------------


def rescale_to_10(x: float, lo: float, hi: float) -> float:
    """A rating on [lo, hi] on the 1–10 scale."""
    return 1.0 + 9.0 * (x - lo) / (hi - lo)


def factor_index(sum_x10: float, n: int) -> float | None:
    """100 · mean rating on the 1–10 scale (100–1000); None without ratings."""
    return 100.0 * sum_x10 / n if n else None


def csi(factor_indices: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """Weighted mean of the factor indices that have data."""
    present = [(weights[f], v) for f, v in factor_indices.items() if v is not None]
    total_weight = sum(w for w, _ in present)
    if not present or total_weight == 0:
        return None
    return sum(w * v for w, v in present) / total_weight


def nps(promoters: int, detractors: int, n: int) -> float | None:
    """Net promoter score, −100…100; None without answers."""
    return 100.0 * (promoters - detractors) / n if n else None


def nps_standard_error(promoters: int, detractors: int, n: int) -> float | None:
    """Standard error of NPS in points: 100·sqrt((p + d − (p − d)²)/n)."""
    if not n:
        return None
    p, d = promoters / n, detractors / n
    return 100.0 * math.sqrt(max(p + d - (p - d) ** 2, 0.0) / n)


def nps_category(recommend: int) -> str:
    return "promoter" if recommend >= 9 else "detractor" if recommend <= 6 else "passive"


# --- the events as the formulas see them ------------------------------------


class ScaleLike(Protocol):
    @property
    def min(self) -> int: ...
    @property
    def max(self) -> int: ...


class SurveyLike(Protocol):
    """What the formulas read of a survey (schemas.SurveyEvent satisfies it)."""

    @property
    def scale(self) -> ScaleLike: ...
    @property
    def ratings(self) -> Mapping[str, float]: ...
    @property
    def recommend(self) -> int | None: ...


# --- mergeable sufficient statistics ----------------------------------------


@dataclass
class Bucket:
    """Sufficient statistics of one unit (dealer, department) over some days.

    Only sums and counts: merging two buckets is adding them, so windows and
    roll-ups are sums of daily buckets, in any order.
    """

    n_visits: int = 0
    n_responses: int = 0
    factor_n: dict[str, int] = field(default_factory=dict)
    factor_sum: dict[str, float] = field(default_factory=dict)
    factor_sumsq: dict[str, float] = field(default_factory=dict)
    nps_n: int = 0
    promoters: int = 0
    detractors: int = 0

    def add_visit(self) -> None:
        self.n_visits += 1

    def add_survey(self, survey: SurveyLike, catalogue: Catalogue) -> None:
        self.n_responses += 1
        lo, hi = survey.scale.min, survey.scale.max
        for code, rating in survey.ratings.items():
            factor = catalogue.attribute_factor.get(code)
            if factor is None:  # outside the catalogue: stored raw, counts toward no factor
                continue
            x10 = rescale_to_10(rating, lo, hi)
            self.factor_n[factor] = self.factor_n.get(factor, 0) + 1
            self.factor_sum[factor] = self.factor_sum.get(factor, 0.0) + x10
            self.factor_sumsq[factor] = self.factor_sumsq.get(factor, 0.0) + x10 * x10
        if survey.recommend is not None:
            self.nps_n += 1
            category = nps_category(survey.recommend)
            self.promoters += category == "promoter"
            self.detractors += category == "detractor"

    def merge(self, other: Bucket) -> None:
        """Add `other` into this bucket (in place)."""
        self.n_visits += other.n_visits
        self.n_responses += other.n_responses
        for factor, n in other.factor_n.items():
            self.factor_n[factor] = self.factor_n.get(factor, 0) + n
        for factor, total in other.factor_sum.items():
            self.factor_sum[factor] = self.factor_sum.get(factor, 0.0) + total
        for factor, total in other.factor_sumsq.items():
            self.factor_sumsq[factor] = self.factor_sumsq.get(factor, 0.0) + total
        self.nps_n += other.nps_n
        self.promoters += other.promoters
        self.detractors += other.detractors

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_visits": self.n_visits,
            "n_responses": self.n_responses,
            "factor_n": dict(self.factor_n),
            "factor_sum": dict(self.factor_sum),
            "factor_sumsq": dict(self.factor_sumsq),
            "nps_n": self.nps_n,
            "promoters": self.promoters,
            "detractors": self.detractors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Bucket:
        return cls(
            n_visits=int(data["n_visits"]),
            n_responses=int(data["n_responses"]),
            factor_n={k: int(v) for k, v in data["factor_n"].items()},
            factor_sum={k: float(v) for k, v in data["factor_sum"].items()},
            factor_sumsq={k: float(v) for k, v in data["factor_sumsq"].items()},
            nps_n=int(data["nps_n"]),
            promoters=int(data["promoters"]),
            detractors=int(data["detractors"]),
        )


def merged(buckets: Iterable[Bucket]) -> Bucket:
    total = Bucket()
    for bucket in buckets:
        total.merge(bucket)
    return total


@dataclass(frozen=True)
class Figures:
    """The metrics of one bucket (usually a window's merged buckets)."""

    n_responses: int
    n_visits: int
    csi: float | None
    factors: dict[str, float]
    factor_n: dict[str, int]
    nps: float | None
    nps_n: int
    nps_se: float | None
    weights_version: str


def figures(bucket: Bucket, catalogue: Catalogue) -> Figures:
    indices = {
        f: factor_index(bucket.factor_sum.get(f, 0.0), bucket.factor_n.get(f, 0))
        for f in catalogue.factors
    }
    return Figures(
        n_responses=bucket.n_responses,
        n_visits=bucket.n_visits,
        csi=csi(indices, catalogue.factor_weights),
        factors={f: v for f, v in indices.items() if v is not None},
        factor_n={f: n for f in catalogue.factors if (n := bucket.factor_n.get(f, 0))},
        nps=nps(bucket.promoters, bucket.detractors, bucket.nps_n),
        nps_n=bucket.nps_n,
        nps_se=nps_standard_error(bucket.promoters, bucket.detractors, bucket.nps_n),
        weights_version=catalogue.version,
    )


# --- windows -----------------------------------------------------------------


def window_days(window_end: date, length_days: int) -> list[date]:
    """The dates of a window of `length_days` ending on `window_end` (inclusive)."""
    return [window_end - timedelta(days=i) for i in range(length_days - 1, -1, -1)]


def affected_window_ends(changed_day: date, length_days: int, latest_day: date) -> list[date]:
    """End dates of the windows of this length that contain `changed_day`, up to
    `latest_day` (the unit's newest event date): a late event re-opens them all."""
    last = min(changed_day + timedelta(days=length_days - 1), latest_day)
    return [changed_day + timedelta(days=i) for i in range((last - changed_day).days + 1)]
