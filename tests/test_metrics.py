"""Formula tests: every expected figure below is worked out by hand in the comments."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.catalogue import CatalogueError, catalogue_from_dict, load_catalogue
from pipeline.metrics import (
    Bucket,
    affected_window_ends,
    csi,
    factor_index,
    figures,
    merged,
    nps,
    nps_standard_error,
    rescale_to_10,
    window_days,
)

CATALOGUE = load_catalogue()


@dataclass
class Scale:
    min: int = 1
    max: int = 10


@dataclass
class Survey:
    ratings: dict[str, float]
    recommend: int | None = None
    scale: Scale = field(default_factory=Scale)


def test_default_catalogue_is_domain_md() -> None:
    assert CATALOGUE.factor_weights == {
        "service_initiation": 15,
        "service_advisor": 19,
        "service_facility": 15,
        "vehicle_pickup": 19,
        "service_quality": 32,
    }
    assert len(CATALOGUE.attribute_factor) == 21
    assert CATALOGUE.attribute_factor["promises_kept"] == "service_advisor"
    assert CATALOGUE.attribute_dimension["promises_kept"] == "reliability"


def test_rescale_to_10() -> None:
    assert rescale_to_10(1, 1, 5) == 1.0
    assert rescale_to_10(5, 1, 5) == 10.0
    assert rescale_to_10(3, 1, 5) == 5.5  # 1 + 9·2/4
    assert rescale_to_10(4, 1, 5) == 7.75  # 1 + 9·3/4
    assert rescale_to_10(7, 1, 10) == 7.0  # 1–10 is the identity
    assert rescale_to_10(4, 1, 7) == 5.5  # 1 + 9·3/6


def test_factor_index_and_csi_by_hand() -> None:
    assert factor_index(16.5, 3) == 550.0
    assert factor_index(0.0, 0) is None
    # One 1–10 survey: initiation 8 → 800; advisor (9 + 7)/2 = 8 → 800;
    # facility 10 → 1000; pickup 6 → 600; quality 9 → 900.
    # CSI = (15·800 + 19·800 + 15·1000 + 19·600 + 32·900) / 100 = 82400 / 100
    bucket = Bucket()
    bucket.add_survey(
        Survey(
            {
                "booking_ease": 8,
                "advisor_courtesy": 9,
                "advisor_honesty": 7,
                "waiting_clean": 10,
                "on_time": 6,
                "work_quality": 9,
                "not_in_catalogue": 1,  # stored raw, counts toward no factor
            },
            recommend=9,
        ),
        CATALOGUE,
    )
    result = figures(bucket, CATALOGUE)
    assert result.factors == {
        "service_initiation": 800.0,
        "service_advisor": 800.0,
        "service_facility": 1000.0,
        "vehicle_pickup": 600.0,
        "service_quality": 900.0,
    }
    assert result.csi == pytest.approx(824.0, abs=1e-9)
    assert result.factor_n["service_advisor"] == 2
    assert result.n_responses == 1
    assert result.weights_version == CATALOGUE.version


def test_csi_pools_scales_and_skips_factors_without_data() -> None:
    # booking_ease 8 on 1–10 and 4 on 1–5 (x10 = 7.75): mean 7.875 → 787.5
    bucket = Bucket()
    bucket.add_survey(Survey({"booking_ease": 8}), CATALOGUE)
    bucket.add_survey(Survey({"booking_ease": 4}, scale=Scale(1, 5)), CATALOGUE)
    result = figures(bucket, CATALOGUE)
    assert result.factors == {"service_initiation": 787.5}
    assert result.csi == 787.5  # one factor: CSI is that factor
    # quality 900 and facility 1000 only: (32·900 + 15·1000)/47 = 43800/47
    assert csi(
        {"service_quality": 900.0, "service_facility": 1000.0, "vehicle_pickup": None},
        CATALOGUE.factor_weights,
    ) == pytest.approx(43800 / 47, abs=1e-9)
    assert csi({}, CATALOGUE.factor_weights) is None


def test_nps_by_hand() -> None:
    # recommend 10, 9, 8, 7, 6, 0, 10: promoters 3, passives 2, detractors 2, n 7
    bucket = Bucket()
    for answer in (10, 9, 8, 7, 6, 0, 10):
        bucket.add_survey(Survey({}, recommend=answer), CATALOGUE)
    bucket.add_survey(Survey({"work_quality": 5}), CATALOGUE)  # no recommend: not in NPS n
    result = figures(bucket, CATALOGUE)
    assert (bucket.promoters, bucket.detractors, bucket.nps_n) == (3, 2, 7)
    assert result.nps == pytest.approx(100 / 7, abs=1e-12)  # 100·(3−2)/7 = 14.2857…
    # p = 3/7, d = 2/7: p + d − (p − d)² = 5/7 − 1/49 = 34/49; /n → 34/343
    assert result.nps_se == pytest.approx(100 * math.sqrt(34 / 343), abs=1e-12)
    assert result.n_responses == 8
    assert nps(0, 0, 0) is None and nps_standard_error(0, 0, 0) is None
    assert nps(5, 0, 5) == 100.0 and nps_standard_error(5, 0, 5) == 0.0


def test_windows() -> None:
    assert window_days(date(2026, 3, 2), 3) == [
        date(2026, 2, 28),
        date(2026, 3, 1),
        date(2026, 3, 2),
    ]
    # a late event on 1 March re-opens the 3-day windows ending 1, 2 and 3 March
    assert affected_window_ends(date(2026, 3, 1), 3, date(2026, 3, 10)) == [
        date(2026, 3, 1),
        date(2026, 3, 2),
        date(2026, 3, 3),
    ]
    # …but none beyond the newest date seen
    assert affected_window_ends(date(2026, 3, 1), 30, date(2026, 3, 2)) == [
        date(2026, 3, 1),
        date(2026, 3, 2),
    ]


def test_catalogue_errors_name_the_entry() -> None:
    with pytest.raises(CatalogueError, match="unknown factor 'nope'"):
        catalogue_from_dict(
            {"version": "x", "factors": {"a": 1}, "attributes": {"q": {"factor": "nope"}}}
        )
    with pytest.raises(CatalogueError, match="weights must be > 0"):
        catalogue_from_dict({"version": "x", "factors": {"a": 0}, "attributes": {}})


surveys = st.builds(
    Survey,
    ratings=st.dictionaries(
        st.sampled_from(sorted(CATALOGUE.attribute_factor)), st.integers(1, 10), max_size=6
    ),
    recommend=st.none() | st.integers(0, 10),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(surveys, max_size=5), min_size=1, max_size=6), st.randoms())
def test_merging_buckets_in_any_order_gives_the_same_figures(
    days: list[list[Survey]], rnd: object
) -> None:
    daily = []
    for day in days:
        bucket = Bucket()
        for survey in day:
            bucket.add_survey(survey, CATALOGUE)
        bucket.add_visit()
        daily.append(bucket)
    shuffled = list(daily)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one, other = figures(merged(daily), CATALOGUE), figures(merged(shuffled), CATALOGUE)
    assert one.n_responses == other.n_responses and one.nps == other.nps
    assert (one.csi is None) == (other.csi is None)
    if one.csi is not None and other.csi is not None:
        assert one.csi == pytest.approx(other.csi, abs=1e-9)
    # serialisation round trip (the Faust table stores buckets as JSON dicts)
    assert Bucket.from_dict(merged(daily).to_dict()) == merged(daily)
