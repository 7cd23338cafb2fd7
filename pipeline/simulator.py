"""Synthetic feedback events for a dealer network: visits and surveys.

Pure and deterministic: the same arguments (and seed) give byte-identical
output, and nothing here touches Kafka. The events are the exact JSON-ready
dicts the producer sends, ordered by ``occurred_at``.

The rating model, on a latent 1-10 scale before rounding to the survey's own
scale, is built so that the downstream indices have something real to find:

* a network mean, plus a dealer quality effect (most dealers near the mean,
  some strong, a few weak) and a dealer-by-factor effect;
* a customer temperament (generous or harsh raters, stable across visits,
  derived from the customer hash) and a response-level mood, so one response's
  ratings move together;
* a response-by-factor effect, so e.g. the ``service_quality`` attributes of
  one response move together, plus per-attribute noise;
* visit facts feeding the ratings: late delivery lowers ``on_time`` and
  ``promises_kept``, a comeback lowers ``service_quality``, an invoice well
  above the estimate lowers ``value_for_money``;
* ``overall`` follows the weighted factors (so key-driver analysis recovers
  the factor weights roughly), ``recommend`` and ``return_intent`` follow
  ``overall``.

A :class:`Drop` subtracts ``size / 100`` from the latent 1-10 score of every
attribute, ``overall``, ``perception``, ``return_intent`` and (on its 0-10
scale) ``recommend`` of the dealer's surveys dated on or after ``start``,
before rounding and clipping. Only clipping at the top and bottom of the scale
makes the realised fall a little smaller than ``size``.

Every random draw comes from a per-dealer stream seeded by (seed, dealer_id),
and no draw is conditional on a latent score. Hence a dealer's events do not
depend on how many other dealers are simulated, and a run with a drop differs
from the same run without it only in that dealer's survey scores and comments.

The simulated network runs on the UTC wall clock (opening hours are UTC), so
day buckets line up with the pipeline's UTC days.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import math
import os
import random
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from statistics import NormalDist
from typing import IO, Any, TypeVar, cast

import orjson

from pipeline.catalogue import load_catalogue

SCHEMA_VERSION = 1

_T = TypeVar("_T")

# The questionnaire the pipeline scores (pipeline.catalogue, one place):
# factor -> its attribute codes, and the factor weights.
_CATALOGUE = load_catalogue()
SERVICE_FACTORS: dict[str, tuple[str, ...]] = {
    factor: tuple(c for c, f in _CATALOGUE.attribute_factor.items() if f == factor)
    for factor in _CATALOGUE.factors
}
FACTOR_WEIGHTS: dict[str, float] = dict(_CATALOGUE.factor_weights)
# Sales surveys rate the sales experience; these codes are outside the
# after-sales catalogue on purpose (DOMAIN.md: stored, counted toward no
# factor), while their overall/recommend feed NPS and the loyalty matrix.
SALES_ATTRIBUTES: tuple[str, ...] = (
    "salesperson_courtesy",
    "salesperson_knowledge",
    "test_drive",
    "price_negotiation",
    "paperwork_ease",
    "delivery_explained",
    "vehicle_condition",
)

# Where the network sits on the latent 1-10 scale: about CSI 840 and NPS 40-50,
# typical of after-sales service, while leaving most scores below the ceiling
# so that a drop shows almost in full.
_NETWORK_MEAN = 8.4
# Some attributes are harder to satisfy than others (price, amenities).
_ATTRIBUTE_OFFSET: dict[str, float] = {
    "booking_ease": 0.2,
    "appointment_time": 0.0,
    "greeted_promptly": 0.1,
    "advisor_courtesy": 0.35,
    "advisor_honesty": 0.1,
    "advisor_knowledge": 0.1,
    "promises_kept": -0.1,
    "listened": 0.15,
    "work_explained": -0.15,
    "waiting_clean": 0.1,
    "waiting_comfort": -0.2,
    "amenities": -0.4,
    "location_hours": -0.1,
    "on_time": -0.05,
    "charges_explained": -0.1,
    "vehicle_clean": -0.25,
    "easy_payment": 0.35,
    "diagnosis_correct": 0.05,
    "fixed_first_time": 0.0,
    "work_quality": 0.05,
    "value_for_money": -0.7,
    "salesperson_courtesy": 0.3,
    "salesperson_knowledge": 0.1,
    "test_drive": 0.2,
    "price_negotiation": -0.6,
    "paperwork_ease": -0.2,
    "delivery_explained": 0.0,
    "vehicle_condition": 0.25,
}
_ATTRIBUTE_FACTOR: dict[str, str] = {
    code: factor for factor, codes in SERVICE_FACTORS.items() for code in codes
}
_WEIGHT_TOTAL = sum(FACTOR_WEIGHTS.values())

# Relative visit volume by weekday (Mon..Sun), normalised to a weekly mean of 1
# so that visits_per_dealer_day stays the long-run average.
_WEEKDAY_RAW = (1.1, 1.05, 1.05, 1.05, 1.1, 0.85, 0.4)
_WEEKDAY_FACTOR = tuple(w * 7 / sum(_WEEKDAY_RAW) for w in _WEEKDAY_RAW)

# Survey channels: (channel, cumulative probability, scale max, source).
# SMS questionnaires are short, hence their 1-5 scale (about 20% of surveys).
_CHANNELS: tuple[tuple[str, float, int, str], ...] = (
    ("web", 0.30, 10, "survey_vendor"),
    ("sms", 0.50, 5, "survey_vendor"),
    ("email", 0.65, 10, "survey_vendor"),
    ("app", 0.80, 10, "web"),
    ("phone", 1.00, 10, "call_centre"),
)

_POSITIVE_COMMENTS: tuple[str, ...] = (
    "Quick and friendly service, car was ready on time.",
    "Advisor explained everything clearly.",
    "Very happy with the repair, thank you.",
    "Clean waiting area and good coffee.",
    "Great experience as always.",
    "服务很周到,车辆按时交付。",
    "服务顾问很专业,解释得很清楚。",
    "维修质量很好,非常满意。",
    "接待热情,休息区干净舒适。",
)
_NEUTRAL_COMMENTS: tuple[str, ...] = (
    "OK overall, but the wait was a bit long.",
    "Fine, though the price was higher than I expected.",
    "Service was alright, booking could be easier.",
    "总体还可以,等待时间有点长。",
    "价格偏高,其他还行。",
    "还行,希望预约更方便一些。",
)
_NEGATIVE_COMMENTS: tuple[str, ...] = (
    "Car was not ready when promised.",
    "Same problem came back after the repair.",
    "Charged more than the estimate without asking.",
    "Nobody greeted me for a long time.",
    "Car was returned dirty.",
    "交车时间一再拖延,很不满意。",
    "问题没有修好,又要回厂。",
    "收费比报价高,没有事先说明。",
    "等了很久都没人接待。",
)

_TEMPERAMENT = NormalDist(0.0, 0.45)
_OPEN = time(7, 30)
_DAY = timedelta(days=1)
_COMEBACK_WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class Drop:
    """Lower ``dealer_id``'s survey scores from ``start`` on by ``size`` CSI points.

    ``size`` is on the 1000-point CSI scale: 50 lowers the dealer's mean latent
    rating on the 1-10 scale by 0.5 (before clipping to the scale). A negative
    size simulates an improvement. Several drops on one dealer add up.
    """

    dealer_id: str
    start: date
    size: float


def parse_drop(text: str) -> Drop:
    """Parse ``DEALER:YYYY-MM-DD:SIZE`` (e.g. ``D003:2024-05-01:80``) into a :class:`Drop`."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError(f"drop {text!r}: expected DEALER:YYYY-MM-DD:SIZE, e.g. D003:2024-05-01:80")
    dealer_id, start_text, size_text = (p.strip() for p in parts)
    if not dealer_id or any(c.isspace() for c in dealer_id):
        raise ValueError(f"drop {text!r}: dealer id must be non-empty without spaces")
    try:
        start = date.fromisoformat(start_text)
    except ValueError:
        raise ValueError(f"drop {text!r}: start {start_text!r} is not a YYYY-MM-DD date") from None
    try:
        size = float(size_text)
    except ValueError:
        raise ValueError(f"drop {text!r}: size {size_text!r} is not a number") from None
    if not math.isfinite(size):
        raise ValueError(f"drop {text!r}: size must be finite")
    return Drop(dealer_id, start, size)


def dealer_ids(n: int) -> list[str]:
    """Dealer codes ``D001``, ``D002``, ...; zero-padded to at least 3 digits."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    width = max(3, len(str(n)))
    return [f"D{i:0{width}d}" for i in range(1, n + 1)]


def simulate(
    n_dealers: int,
    days: int,
    *,
    end: date | None = None,
    seed: int = 0,
    drops: Sequence[Drop] = (),
    visits_per_dealer_day: float = 6.0,
    survey_share: float = 0.25,
    sales_surveys_per_dealer_day: float = 0.1,
) -> Iterator[dict[str, Any]]:
    """Visit and survey events for the ``days`` days ending on ``end`` (inclusive).

    ``end`` defaults to today (UTC); then events later than the current time
    are left out too, since a live feed cannot hold them yet. Events whose time
    would fall after the simulated range (surveys 1-3 days after delivery,
    repairs delivered the next day) are dropped. The stream is sorted by
    ``occurred_at`` and generated day by day, so memory stays flat however
    long the run. ``sales_surveys_per_dealer_day`` adds a few sales-department
    surveys (0 for a service-only stream).
    """
    if n_dealers < 1:
        raise ValueError(f"n_dealers must be >= 1, got {n_dealers}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    for name, rate in (
        ("visits_per_dealer_day", visits_per_dealer_day),
        ("sales_surveys_per_dealer_day", sales_surveys_per_dealer_day),
    ):
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {rate}")
    if not 0.0 <= survey_share <= 1.0:
        raise ValueError(f"survey_share must be within [0, 1], got {survey_share}")
    ids = dealer_ids(n_dealers)
    known = set(ids)
    unknown = sorted({d.dealer_id for d in drops} - known)
    if unknown:
        raise ValueError(
            f"drops name dealers outside the simulation ({ids[0]}..{ids[-1]}): {unknown}"
        )
    if end is None:
        now = datetime.now(UTC)
        end_day, cutoff = now.date(), now
    else:
        end_day, cutoff = end, None
    sim = _Simulation(
        ids,
        end_day - timedelta(days=days - 1),
        days,
        seed=seed,
        drops=drops,
        cutoff=cutoff,
        visits_per_dealer_day=visits_per_dealer_day,
        survey_share=survey_share,
        sales_per_dealer_day=sales_surveys_per_dealer_day,
    )
    return sim.run()


def write_jsonl(
    events: Iterable[dict[str, Any]], path_or_stream: str | os.PathLike[str] | IO[bytes] | IO[str]
) -> int:
    """Write one JSON object per line (the bytes the producer would send); return the count."""
    if isinstance(path_or_stream, str | os.PathLike):
        with open(path_or_stream, "wb") as fh:
            return _write_lines(events, fh)
    return _write_lines(events, path_or_stream)


def _write_lines(events: Iterable[dict[str, Any]], stream: IO[bytes] | IO[str]) -> int:
    count = 0
    if isinstance(stream, io.TextIOBase):
        text_stream = cast(IO[str], stream)
        for event in events:
            text_stream.write(orjson.dumps(event).decode() + "\n")
            count += 1
    else:
        byte_stream = cast(IO[bytes], stream)
        for event in events:
            byte_stream.write(orjson.dumps(event) + b"\n")
            count += 1
    return count


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method, in chunks of at most 25 so exp(-lam) never underflows;
    # a sum of Poisson variables is Poisson with the summed mean.
    total = 0
    while lam > 0:
        chunk = min(lam, 25.0)
        lam -= chunk
        limit, k, p = math.exp(-chunk), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        total += k
    return total


def _choose(u: float, options: Sequence[_T]) -> _T:
    """The option a uniform draw ``u`` in [0, 1) falls on.

    Draws are taken before it is known which list they pick from (unlike
    rng.choice, whose rejection sampling uses a length-dependent number of
    draws), so the stream stays aligned when the list depends on a score.
    """
    return options[min(int(u * len(options)), len(options) - 1)]


def _to_scale(latent10: float, high: int) -> int:
    """Latent 1-10 value -> integer point on a 1..high scale (round half up, clip)."""
    y = 1 + (high - 1) * (latent10 - 1) / 9
    return max(1, min(high, math.floor(y + 0.5)))


def _temperament(customer_ref: str) -> float:
    # Derived from the hash itself, so a returning customer keeps the same
    # rating style without the simulator remembering every customer.
    u = (int(customer_ref[:12], 16) + 0.5) / 16**12
    return _TEMPERAMENT.inv_cdf(u)


@dataclass
class _Dealer:
    dealer_id: str
    rng: random.Random
    quality: float
    size: float
    factor_effect: dict[str, float]
    attribute_effect: dict[str, float]
    late_p: float
    comeback_p: float
    response_p: float
    appointment_p: float
    greet_mean_min: float
    drops: tuple[Drop, ...]
    customers: int = 0
    # (delivered_at, visit_id, customer number) of visits that comebacks may repeat
    recent: deque[tuple[datetime, str, int]] = field(default_factory=deque)


@dataclass
class _VisitFacts:
    late: bool
    slow_greeting: bool
    comeback: bool
    overrun: bool


class _Simulation:
    def __init__(
        self,
        ids: list[str],
        start: date,
        days: int,
        *,
        seed: int,
        drops: Sequence[Drop],
        cutoff: datetime | None,
        visits_per_dealer_day: float,
        survey_share: float,
        sales_per_dealer_day: float,
    ) -> None:
        self.seed = seed
        self.start = start
        self.days = days
        range_end = datetime.combine(start + timedelta(days=days), time(), UTC)
        self.limit = range_end if cutoff is None else min(range_end, cutoff)
        self.visits_per_day = visits_per_dealer_day
        self.survey_share = survey_share
        self.sales_per_day = sales_per_dealer_day
        self.dealers = [self._dealer(d, tuple(x for x in drops if x.dealer_id == d)) for d in ids]
        self.heap: list[tuple[datetime, int, dict[str, Any]]] = []
        self.seq = 0

    def _dealer(self, dealer_id: str, drops: tuple[Drop, ...]) -> _Dealer:
        rng = random.Random(f"dealer-csi:{self.seed}:{dealer_id}")
        kind = rng.random()
        quality = rng.gauss(0.0, 0.3)
        if kind < 0.08:
            quality -= rng.uniform(0.8, 1.6)  # a few weak dealers
        elif kind < 0.28:
            quality += rng.uniform(0.3, 0.6)  # some strong ones
        # Operations follow quality: weak dealers are late, slow and redo more work.
        return _Dealer(
            dealer_id=dealer_id,
            rng=rng,
            quality=quality,
            size=math.exp(rng.gauss(-0.125, 0.5)),  # lognormal with mean 1
            factor_effect={f: rng.gauss(0.0, 0.25) for f in SERVICE_FACTORS},
            attribute_effect={a: rng.gauss(0.0, 0.12) for a in _ATTRIBUTE_OFFSET},
            late_p=min(0.4, max(0.03, 0.12 - 0.08 * quality + rng.gauss(0.0, 0.02))),
            comeback_p=min(0.08, max(0.01, 0.03 - 0.015 * quality)),
            response_p=min(1.0, self.survey_share * rng.uniform(0.7, 1.3)),
            appointment_p=min(0.9, max(0.3, 0.65 + 0.1 * quality + rng.gauss(0.0, 0.08))),
            greet_mean_min=max(1.5, 4.0 - 2.0 * quality + rng.gauss(0.0, 0.5)),
            drops=drops,
        )

    def run(self) -> Iterator[dict[str, Any]]:
        for offset in range(self.days):
            day = self.start + timedelta(days=offset)
            for dealer in self.dealers:
                self._dealer_day(dealer, day)
            # Everything generated later occurs on a later day, so all events
            # before the next midnight are final and can go out in order.
            horizon = datetime.combine(day + _DAY, time(), UTC)
            while self.heap and self.heap[0][0] < horizon:
                yield heapq.heappop(self.heap)[2]
        while self.heap:
            yield heapq.heappop(self.heap)[2]

    def _push(self, moment: datetime, event: dict[str, Any]) -> bool:
        if moment >= self.limit:
            return False
        heapq.heappush(self.heap, (moment, self.seq, event))
        self.seq += 1
        return True

    def _envelope(
        self,
        dealer: _Dealer,
        event_type: str,
        department: str,
        moment: datetime,
        customer: int,
        source: str,
    ) -> dict[str, Any]:
        return {
            "event_id": str(uuid.UUID(int=dealer.rng.getrandbits(128), version=4)),
            "event_type": event_type,
            "schema_version": SCHEMA_VERSION,
            "dealer_id": dealer.dealer_id,
            "department": department,
            "occurred_at": _iso(moment),
            "customer_ref": self._customer_ref(dealer, customer),
            "source": source,
        }

    def _customer_ref(self, dealer: _Dealer, customer: int) -> str:
        raw = f"{self.seed}:{dealer.dealer_id}:{customer}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]

    def _customer(self, dealer: _Dealer) -> int:
        # About a third of customers have been here before (regular servicing).
        rng = dealer.rng
        returning, which = rng.random(), rng.random()
        if returning < 0.35 and dealer.customers > 0:
            return int(which * dealer.customers)
        dealer.customers += 1
        return dealer.customers - 1

    def _dealer_day(self, dealer: _Dealer, day: date) -> None:
        rng = dealer.rng
        weekday = _WEEKDAY_FACTOR[day.weekday()]
        n_visits = _poisson(rng, self.visits_per_day * dealer.size * weekday)
        opening = datetime.combine(day, _OPEN, UTC)
        arrivals = sorted(
            opening + timedelta(seconds=self._arrival_offset(rng)) for _ in range(n_visits)
        )
        for number, arrived in enumerate(arrivals, start=1):
            self._visit(dealer, day, number, arrived)
        n_sales = _poisson(rng, self.sales_per_day * dealer.size * weekday)
        for _ in range(n_sales):
            seconds = int(rng.uniform(0, 12 * 3600))
            moment = datetime.combine(day, time(9), UTC) + timedelta(seconds=seconds)
            customer = self._customer(dealer)
            survey = self._survey(dealer, moment, customer, None, "sales", None)
            self._push(moment, survey)

    @staticmethod
    def _arrival_offset(rng: random.Random) -> int:
        # Seconds after 07:30: a morning drop-off peak, then walk-ins until 17:00.
        if rng.random() < 0.6:
            return int(rng.uniform(0, 2.5 * 3600))
        return int(rng.uniform(2.5 * 3600, 9.5 * 3600))

    def _visit(self, dealer: _Dealer, day: date, number: int, arrived: datetime) -> None:
        rng = dealer.rng
        appointment = rng.random() < dealer.appointment_p
        wait_min = rng.expovariate(1.0 / (dealer.greet_mean_min * (1.0 if appointment else 2.2)))
        greeted = arrived + timedelta(seconds=int(20 + wait_min * 60))

        job, hours = rng.random(), rng.uniform(0.0, 1.0)
        if job < 0.35:  # quick job, customer waits
            promised = greeted + timedelta(hours=1 + 1.5 * hours)
        elif job < 0.9:
            promised = greeted + timedelta(hours=2.5 + 4.5 * hours)
        else:  # parts or long job: promised the next day
            promised = datetime.combine(day + _DAY, time(10), UTC) + timedelta(hours=7 * hours)
        if promised.time() > time(18, 30):
            promised = datetime.combine(day + _DAY, time(9), UTC) + timedelta(hours=8 * hours)
        promised = promised.replace(minute=promised.minute - promised.minute % 15, second=0)
        promised = max(promised, greeted + timedelta(minutes=30))
        late = rng.random() < dealer.late_p
        early_min, late_min = rng.uniform(0, 50), 10 + rng.expovariate(1 / 50)
        if late:
            delivered = promised + timedelta(minutes=late_min)
        else:
            delivered = max(
                promised - timedelta(minutes=early_min), greeted + timedelta(minutes=20)
            )
        delivered = delivered.replace(microsecond=0)

        comeback_draw, comeback_pick = rng.random(), rng.random()
        comeback_of: str | None = None
        customer = -1
        if comeback_draw < dealer.comeback_p:
            while dealer.recent and dealer.recent[0][0] < arrived - _COMEBACK_WINDOW:
                dealer.recent.popleft()
            eligible = [r for r in dealer.recent if r[0] <= arrived]
            if eligible:
                _, comeback_of, customer = _choose(comeback_pick, eligible)
        if customer < 0:
            customer = self._customer(dealer)

        estimate = round(math.exp(rng.gauss(math.log(900.0), 0.75)), 2)
        overrun_draw = rng.random()
        overrun_size, drift = rng.uniform(1.15, 1.45), rng.gauss(1.0, 0.04)
        overrun = overrun_draw < 0.12
        invoice = round(estimate * (overrun_size if overrun else min(1.12, max(0.85, drift))), 2)
        if comeback_of is not None and overrun_draw < 0.7:
            # Rework of a failed repair is mostly done free of charge.
            estimate = invoice = 0.0
            overrun = False

        visit_id = f"{dealer.dealer_id}-{day:%Y%m%d}-{number:04d}"
        visit = self._envelope(dealer, "visit", "service", delivered, customer, "dms")
        visit.update(
            visit_id=visit_id,
            appointment=appointment,
            arrived_at=_iso(arrived),
            greeted_at=_iso(greeted),
            promised_at=_iso(promised),
            delivered_at=_iso(delivered),
            estimate_amount=estimate,
            invoice_amount=invoice,
            comeback_of=comeback_of,
        )
        if not self._push(delivered, visit):
            return
        dealer.recent.append((delivered, visit_id, customer))

        if rng.random() >= dealer.response_p:
            return
        lag_days = 1 + min(int(rng.random() * 3), 2)
        answered = datetime.combine(delivered.date() + timedelta(days=lag_days), time(8), UTC)
        answered += timedelta(seconds=int(rng.uniform(0, 13.5 * 3600)))
        facts = _VisitFacts(
            late=late,
            slow_greeting=wait_min > 12,
            comeback=comeback_of is not None,
            overrun=overrun,
        )
        survey = self._survey(dealer, answered, customer, visit_id, "service", facts)
        self._push(answered, survey)

    def _survey(
        self,
        dealer: _Dealer,
        moment: datetime,
        customer: int,
        visit_id: str | None,
        department: str,
        facts: _VisitFacts | None,
    ) -> dict[str, Any]:
        rng = dealer.rng
        channel_draw = rng.random()
        channel, _, high, source = next(c for c in _CHANNELS if channel_draw < c[1])
        event = self._envelope(dealer, "survey", department, moment, customer, source)
        shift = sum(d.size for d in dealer.drops if moment.date() >= d.start) / 100.0
        base = (
            _NETWORK_MEAN
            + dealer.quality
            + _temperament(event["customer_ref"])
            + rng.gauss(0.0, 0.8)  # this response's mood
            - shift
        )
        attribute_latent: dict[str, float] = {}
        if department == "service":
            factor_latent = {
                f: base + dealer.factor_effect[f] + rng.gauss(0.0, 0.45) for f in SERVICE_FACTORS
            }
            if facts is not None:
                _apply_visit_facts(factor_latent, facts)
            for code, factor in _ATTRIBUTE_FACTOR.items():
                attribute_latent[code] = (
                    factor_latent[factor]
                    + _ATTRIBUTE_OFFSET.get(code, 0.0)
                    + dealer.attribute_effect[code]
                    + rng.gauss(0.0, 0.5)
                )
            if facts is not None:
                _apply_attribute_facts(attribute_latent, facts)
            overall_latent = sum(
                FACTOR_WEIGHTS[f] * v for f, v in factor_latent.items()
            ) / _WEIGHT_TOTAL + rng.gauss(0.0, 0.35)
        else:
            for code in SALES_ATTRIBUTES:
                attribute_latent[code] = (
                    base
                    + _ATTRIBUTE_OFFSET.get(code, 0.0)
                    + dealer.attribute_effect[code]
                    + rng.gauss(0, 0.6)
                )
            overall_latent = base + rng.gauss(0.0, 0.4)

        ratings: dict[str, int] = {}
        for code, latent in attribute_latent.items():
            if rng.random() >= 0.15:  # not every attribute gets an answer
                ratings[code] = _to_scale(latent, high)
        if not ratings:
            # A questionnaire with no rated item is not a response; keep one.
            code = _choose(rng.random(), tuple(attribute_latent))
            ratings[code] = _to_scale(attribute_latent[code], high)

        recommend_latent = overall_latent + 0.25 + rng.gauss(0.0, 0.7)
        return_latent = overall_latent + rng.gauss(0.0, 0.8)
        long_form = rng.random() < 0.5
        expectation: int | None = None
        perception: int | None = None
        expectations: dict[str, int] = {}  # the schema's "not asked", not null
        if long_form:
            # Expectations are formed before the visit: a drop does not move them.
            expectation = _to_scale(8.6 + rng.gauss(0.0, 0.9), high)
            perception = _to_scale(overall_latent + rng.gauss(0.0, 0.5), high)
            expectations = {
                code: _to_scale(
                    8.7 - 0.5 * _ATTRIBUTE_OFFSET.get(code, 0.0) + rng.gauss(0.0, 0.7), high
                )
                for code in ratings
            }

        overall = _to_scale(overall_latent, high)
        has_comment, comment_draw = rng.random() < 0.3, rng.random()
        comment: str | None = None
        if has_comment:
            x10 = 1 + 9 * (overall - 1) / (high - 1)
            if x10 >= 8.5:
                pool = _POSITIVE_COMMENTS
            elif x10 >= 6:
                pool = _NEUTRAL_COMMENTS
            else:
                pool = _NEGATIVE_COMMENTS
            comment = _choose(comment_draw, pool)

        event.update(
            visit_id=visit_id,
            channel=channel,
            scale={"min": 1, "max": high},
            ratings=ratings,
            overall=overall,
            expectation=expectation,
            perception=perception,
            expectations=expectations,
            recommend=max(0, min(10, math.floor(recommend_latent + 0.5))),
            return_intent=_to_scale(return_latent, high),
            comment=comment,
        )
        return event


def _apply_visit_facts(factor_latent: dict[str, float], facts: _VisitFacts) -> None:
    if facts.comeback:
        factor_latent["service_quality"] -= 1.5
        factor_latent["service_advisor"] -= 0.4
    if facts.late:
        factor_latent["vehicle_pickup"] -= 0.6
    if facts.slow_greeting:
        factor_latent["service_initiation"] -= 0.5


def _apply_attribute_facts(attribute_latent: dict[str, float], facts: _VisitFacts) -> None:
    if facts.late:
        attribute_latent["on_time"] -= 2.0
        attribute_latent["promises_kept"] -= 1.0
    if facts.slow_greeting:
        attribute_latent["greeted_promptly"] -= 1.5
    if facts.comeback:
        attribute_latent["fixed_first_time"] -= 1.5
    if facts.overrun:
        attribute_latent["value_for_money"] -= 1.5
        attribute_latent["charges_explained"] -= 1.0
