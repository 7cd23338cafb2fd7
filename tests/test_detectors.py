"""Drop detectors (issue 4): every expected number is reasoned out by hand in comments.

Scores are on the CSI scale (100–1000); the baseline is 800 ± 100 unless said
otherwise. `known()` is a prior worth a billion responses with no warm-up, so
the baseline stays the prior whatever the data and the charts' behaviour can
be worked out without an estimated baseline in the way.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detectors import (
    AlertPolicy,
    AlertSignal,
    Baseline,
    BernoulliCusum,
    Chart,
    CusumChart,
    EwmaChart,
    chart_from_dict,
)
from pipeline.metrics import nps_category

MEAN, SD = 800.0, 100.0
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def known(mean: float = MEAN, sd: float = SD) -> Baseline:
    return Baseline(prior_mean=mean, prior_sd=sd, prior_strength=1e9, warmup=0)


def first_signal(chart: Chart, values: Iterable[float]) -> int | None:
    """1-based index of the first value on which the raw chart signals."""
    for i, x in enumerate(values, start=1):
        if chart.update(x) is not None:
            return i
    return None


def feed(policy: AlertPolicy, values: Iterable[float]) -> list[AlertSignal]:
    return [s for x in values if (s := policy.update(x)) is not None]


# --- baseline shrinkage ------------------------------------------------------


def test_shrinkage_small_unit_sits_near_the_prior() -> None:
    b = Baseline(prior_mean=800, prior_sd=100, prior_strength=20, warmup=30)
    for x in (600, 620, 580, 610, 590):
        b.observe(1, x)
    # unit mean 600, SS = 0 + 400 + 400 + 100 + 100 = 1000
    # mean = (5·600 + 20·800) / 25 = 19000 / 25 = 760
    # var = (1000 + 20·100²) / (4 + 20) = 201000 / 24 = 8375
    assert not b.ready
    assert b.mean == pytest.approx(760.0)
    assert b.sd == pytest.approx(math.sqrt(8375.0))


def test_shrinkage_large_unit_sits_near_itself() -> None:
    b = Baseline(prior_mean=800, prior_sd=100, prior_strength=20, warmup=180)
    for _ in range(180):
        b.observe(1, 700)
    # (180·700 + 20·800) / 200 = 710; SS = 0 → var = 20·100² / (179 + 20)
    assert b.ready
    assert b.mean == pytest.approx(710.0)
    assert b.sd == pytest.approx(math.sqrt(200000 / 199))


def test_items_of_many_responses_merge_like_single_ones() -> None:
    one, grouped = Baseline(800, 100), Baseline(800, 100)
    for x in (600, 620, 580, 610, 590):
        one.observe(1, x)
    # the same five as one item: mean 600, squared deviations 1000
    grouped.observe(5, 600, 1000)
    assert (grouped.n, grouped.mean, grouped.sd) == pytest.approx((one.n, one.mean, one.sd))


def test_lag_holds_items_back_and_freeze_drops_them() -> None:
    b = Baseline(800, 100, prior_strength=0, warmup=0, lag=2)
    b.observe(1, 500)
    b.observe(1, 600)
    assert b.n == 0 and b.mean == 800  # both held: the prior (k = 0 and n = 0 → prior)
    b.observe(1, 700)  # the 500 leaves the lag and is learnt
    assert (b.n, b.mean) == (1, 500)
    b.freeze()  # an alert opened: the held 600 and 700 are the fall's start
    b.observe(1, 100)
    assert (b.n, b.mean, b.held) == (1, 500, [])
    b.thaw()
    for x in (900, 900, 900):
        b.observe(1, x)
    assert (b.n, b.mean) == (2, 700)  # (500 + 900) / 2; two 900s still held


def test_memory_forgets_old_history_in_proportion() -> None:
    b = Baseline(800, 100, prior_strength=0, warmup=0, memory=10)
    for _ in range(10):
        b.observe(1, 500)
    for _ in range(10):
        b.observe(1, 900)
    # past 10 responses each new one enters with weight 1/11 and the total is
    # scaled back to 10: m ← m + (x − m)/11, so after ten 900s
    # m = 900 − 400·(10/11)^10 = 900 − 154.2 = 745.8 (not the plain mean 700)
    assert b.n == pytest.approx(10)
    assert b.mean == pytest.approx(900 - 400 * (10 / 11) ** 10)


def test_no_data_baseline_is_the_prior() -> None:
    assert known().mean == MEAN and known().sd == SD


# --- step changes are detected -------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_cusum_detects_a_two_sd_step_within_20(seed: int) -> None:
    # After a −2 sd step u ~ N(−2, 1), so S grows by −u − k ~ N(1.5, 1) a response:
    # about 4 responses to pass h = 5; after 20 the sum alone is ~N(30, 4.5²),
    # more than 5 sd above h, so "within 20" cannot fail by chance.
    rng = random.Random(seed)
    chart = CusumChart("CSI", known(), k=0.5, h=5.0)
    assert first_signal(chart, [MEAN - 2 * SD + rng.gauss(0, SD) for _ in range(20)])


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_ewma_detects_a_two_sd_step_within_20(seed: int) -> None:
    # σ_z = sd·√(0.1/1.9) = 0.229 sd, LCL = mean − 3σ_z = mean − 0.688 sd.
    # E z_t = mean − 2 sd·(1 − 0.9^t): past the limit from t = 4 on; at t = 20 it is
    # mean − 1.76 sd, 4.7 σ_z under the limit.
    rng = random.Random(seed)
    chart = EwmaChart("CSI", known(), lam=0.1, limit=3.0)
    assert first_signal(chart, [MEAN - 2 * SD + rng.gauss(0, SD) for _ in range(20)])


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_bernoulli_cusum_detects_detractors_rising_within_60(seed: int) -> None:
    # p0 = 0.2, p1 = 0.4: +0.693 per detractor, −0.288 otherwise. At a true rate
    # of 0.6 the drift is 0.6·0.693 − 0.4·0.288 = 0.30 a response with sd 0.48:
    # after 60 the sum is ~N(18, 3.7²), 3.8 sd above h = 4.
    rng = random.Random(seed)
    chart = BernoulliCusum("Detractors", known(0.2, 0.4), delta=0.2, h=4.0)
    assert first_signal(chart, [rng.random() < 0.6 for _ in range(60)])


def test_signal_fields_and_message() -> None:
    chart = CusumChart("CSI", known(), k=0.5, h=5.0)
    # each 600 is u = −2: S = 1.5, 3.0, 4.5, 6.0 → the 4th signals
    signals = [chart.update(600) for _ in range(4)]
    assert signals[:3] == [None, None, None]
    s = signals[3]
    assert s is not None
    assert (s.metric, s.method, s.status, s.n, s.seen) == ("CSI", "CUSUM", "open", 4, 4)
    assert (s.statistic, s.threshold, s.baseline_mean, s.current) == pytest.approx(
        (6.0, 5.0, 800.0, 600.0)
    )
    assert s.message == "CSI fell from 800 to 600 on 4 responses (CUSUM 6.0 > 5.0)"


# --- a stable series raises nothing ---------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "make",
    [
        # Limits for a 2,000-response horizon: at the defaults (h = 5, L = 3) the
        # in-control run length is of the order of 10³ responses, so 2,000 in-control
        # responses would be expected to raise a false alarm.
        lambda: CusumChart("CSI", known(), k=0.5, h=10.0),
        lambda: EwmaChart("CSI", known(), lam=0.1, limit=4.0),
    ],
    ids=["cusum", "ewma"],
)
def test_stable_noisy_series_gives_no_alert(seed: int, make: Callable[[], Chart]) -> None:
    rng = random.Random(seed)
    policy = AlertPolicy(make())
    assert feed(policy, [rng.gauss(MEAN, SD) for _ in range(2000)]) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stable_detractor_rate_gives_no_alert(seed: int) -> None:
    rng = random.Random(seed)
    recommends = [rng.choice(range(11)) if rng.random() < 0.3 else 9 for _ in range(2000)]
    # detractor rate 0.3·7/11 = 0.19 against a prior of 0.2
    policy = AlertPolicy(BernoulliCusum("Detractors", known(0.2, 0.4), delta=0.2, h=9.0))
    flags = [nps_category(r) == "detractor" for r in recommends]
    assert feed(policy, flags) == []


# --- hysteresis, minimum sample, cool-down ---------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: CusumChart("CSI", known(), k=0.5, h=5.0),
        lambda: EwmaChart("CSI", known(), lam=0.1, limit=3.0),
    ],
    ids=["cusum", "ewma"],
)
def test_one_fall_one_alert_and_recovery_closes_it(make: Callable[[], Chart]) -> None:
    # 40 at the mean (stat stays at rest), 60 at −2 sd (the chart signals on most
    # of them), then 60 at +1 sd (CUSUM falls 1.5 a response back to 0; the EWMA
    # climbs back within 1 σ_z of the mean).
    policy = AlertPolicy(make(), min_sample=20, cooldown_responses=0)
    values = [MEAN] * 40 + [MEAN - 2 * SD] * 60 + [MEAN + SD] * 60
    out = feed(policy, values)
    assert [s.status for s in out] == ["open", "closed"]
    assert 40 < out[0].seen <= 50 and 100 < out[1].seen <= 160
    assert 0 < out[0].n <= out[0].seen - 40  # the run behind `current` began with the fall
    assert out[0].current < MEAN and not policy.is_open


def test_minimum_sample_holds_back_an_early_signal() -> None:
    # the drop starts at once; the chart signals from response 4 (S = 6 > 5), but
    # the policy waits for 20 monitored responses and opens on the 20th
    policy = AlertPolicy(CusumChart("CSI", known(), k=0.5, h=5.0), min_sample=20)
    out = feed(policy, [600.0] * 25)
    assert [(s.status, s.seen) for s in out] == [("open", 20)]


def test_cooldown_suppresses_a_second_drop_then_lets_a_third_through() -> None:
    policy = AlertPolicy(CusumChart("CSI", known(), k=0.5, h=5.0), cooldown_responses=200)
    fall, recover = [600.0] * 10, [900.0] * 20  # u = −2 / +1: S += 1.5 / −= 1.5
    values = [MEAN] * 30 + fall + recover + [MEAN] * 20 + fall + recover + [MEAN] * 200 + fall
    out = feed(policy, values)
    # first fall opens on response 34 (S = 6 > 5); S peaks at 15 on response 40 and
    # is back to 0 ten 900s later, closing it on response 50; the second
    # fall (responses 81–90, signalling from 84) is inside 34 + 200 and raises nothing;
    # the third (responses 311–320) is past it and opens on response 314
    assert [(s.status, s.seen) for s in out] == [("open", 34), ("closed", 50), ("open", 314)]


def test_cooldown_in_days() -> None:
    policy = AlertPolicy(
        CusumChart("CSI", known(), k=0.5, h=5.0),
        min_sample=0,
        cooldown_responses=0,
        cooldown_days=30,
    )
    start = date(2026, 1, 1)
    drop = [600.0] * 10 + [900.0] * 20
    out = []
    for i, x in enumerate(drop * 3):  # two responses a day
        s = policy.update(x, day=start + timedelta(days=i // 2))
        if s is not None:
            out.append((s.status, s.seen))
    # falls start on responses 1, 31, 61 (days 0, 15, 30) and signal on their 4th
    # response (days 1, 16, 31); S peaks at 15 and is back to 0 after 10 of the 900s.
    # Day 16 is inside 30 days of the alert on day 1; day 31 is not.
    assert out == [("open", 4), ("closed", 20), ("open", 64), ("closed", 80)]


# --- Bernoulli CUSUM by hand --------------------------------------------------


def test_bernoulli_increments_by_hand() -> None:
    chart = BernoulliCusum("Detractors", known(0.2, 0.4), delta=0.2, h=4.0)
    assert (chart.p0, chart.p1) == pytest.approx((0.2, 0.4))
    up, down = math.log(0.4 / 0.2), math.log(0.6 / 0.8)  # +0.6931, −0.2877
    assert chart.increment(True) == pytest.approx(up)
    assert chart.increment(False) == pytest.approx(down)
    expected = [up, up + down, up + 2 * down, 0.0]  # 0.693, 0.405, 0.118, max(0, −0.17)
    for flag, s in zip([True, False, False, False], expected, strict=True):
        chart.update(flag)
        assert chart.s == pytest.approx(s)
    # six detractors in a row: 6·0.693 = 4.16 > 4 signals on the sixth
    sigs = [chart.update(True) for _ in range(6)]
    assert sigs[:5] == [None] * 5 and sigs[5] is not None
    assert (
        sigs[5].message
        == "Detractors rose from 20% to 100% on 6 responses (Bernoulli CUSUM 4.2 > 4.0)"
    )


# --- serialisation ------------------------------------------------------------


def _stream(seed: int) -> list[float]:
    rng = random.Random(seed)
    return (
        [rng.gauss(MEAN, SD) for _ in range(60)]
        + [rng.gauss(MEAN - 1.5 * SD, SD) for _ in range(60)]
        + [rng.gauss(MEAN, SD) for _ in range(80)]
    )


def _make(kind: str) -> AlertPolicy:
    base = Baseline(prior_mean=MEAN, prior_sd=SD, prior_strength=20, warmup=30)
    chart: Chart
    if kind == "cusum":
        chart = CusumChart("CSI", base)
    elif kind == "ewma":
        chart = EwmaChart("CSI", base)
    else:
        base = Baseline(prior_mean=0.2, prior_sd=0.4, prior_strength=20, warmup=30)
        chart = BernoulliCusum("Detractors", base)
    return AlertPolicy(chart, cooldown_responses=30)


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    cut=st.integers(min_value=0, max_value=200),
    kind=st.sampled_from(["cusum", "ewma", "bernoulli"]),
)
def test_round_trip_mid_stream_gives_identical_decisions(seed: int, cut: int, kind: str) -> None:
    values = _stream(seed)
    if kind == "bernoulli":
        values = [float(x < MEAN - 0.8 * SD) for x in values]
    whole = _make(kind)
    expected = [whole.update(x) for x in values]
    split = _make(kind)
    got = [split.update(x) for x in values[:cut]]
    state = json.loads(json.dumps(split.to_dict()))  # plain data, as a table would keep it
    resumed = AlertPolicy.from_dict(state)
    assert resumed == split
    got += [resumed.update(x) for x in values[cut:]]
    assert got == expected
    assert resumed.to_dict() == whole.to_dict()


def test_chart_round_trip() -> None:
    chart = EwmaChart("CSI", known(), lam=0.2)
    chart.update(700)
    again = chart_from_dict(json.loads(json.dumps(chart.to_dict())))
    assert again == chart and isinstance(again, EwmaChart)


# --- grouped items, cap, clip, run lengths, minimum run -----------------------


def test_a_day_of_responses_moves_the_cusum_like_its_responses() -> None:
    single, grouped = (CusumChart("CSI", known(), k=0.5, h=50.0) for _ in range(2))
    for x in (700, 650, 600):  # u = −1, −1.5, −2: S = 0.5, 1.5, 3.0
        single.update(x)
    grouped.update_item(3, 650.0)  # S = −3·((650 − 800)/100 + 0.5) = 3.0
    assert single.s == pytest.approx(3.0) and grouped.s == pytest.approx(3.0)
    assert grouped.run_n == 3 and grouped.current == pytest.approx(650.0)


def test_cap_bounds_the_statistic_and_clip_bounds_one_response() -> None:
    capped = CusumChart("CSI", known(), k=0.5, h=5.0, cap=10.0)
    for _ in range(20):
        capped.update(600)  # +1.5 a response, held at 10
    assert capped.s == 10.0
    clipped = CusumChart("CSI", known(), k=0.5, h=5.0, clip=3.0)
    clipped.update(100)  # u = −7 clipped to −3: S = 3 − 0.5 = 2.5
    assert clipped.s == pytest.approx(2.5)


def test_run_lengths_by_hand() -> None:
    chart = CusumChart("CSI", known(), k=0.25, h=11.0)
    chart.s = 11.0
    # Siegmund: a = 2·0.25·(11 + 1.166) = 6.083; (438.3 − 6.083 − 1) / (2·0.25²) = 3,450
    a = 0.5 * 12.166
    assert chart.run_length() == pytest.approx((math.exp(a) - a - 1) / 0.125)
    assert chart.run_length() == pytest.approx(3450, rel=1e-3)
    bern = BernoulliCusum("Detractors", known(0.2, 0.4), delta=0.2, h=4.0)
    bern.s = 4.0
    # D(0.2 ‖ 0.4) = 0.2·ln 0.5 + 0.8·ln(0.8/0.6) = −0.1386 + 0.2301 = 0.0915
    # Wald: (e⁴ − 4 − 1) / 0.0915 = 49.6 / 0.0915 = 542
    assert bern.run_length() == pytest.approx(542, rel=2e-3)


def test_minimum_run_waits_for_evidence_on_enough_responses() -> None:
    # p0 = 0.2 → 0.4: each detractor adds 0.693; six in a row pass h = 4 (4.16),
    # but the policy wants the evidence to rest on 10 responses
    chart = BernoulliCusum("Detractors", known(0.2, 0.4), delta=0.2, h=4.0)
    policy = AlertPolicy(chart, min_sample=0, min_run=10)
    out = feed(policy, [1.0] * 12)
    assert [(s.status, s.seen, s.n) for s in out] == [("open", 10, 10)]
