"""Tests for privacy/events.py: validation, JSON round trips, dp_accounting events per mode."""

import dp_accounting
import pytest
from dp_accounting import dp_event

from privacy.events import RoundRelease, SampledGaussian


def release(**overrides):
    fields = {
        "round": 3,
        "noise_multiplier": 1.2,
        "sample_rate": 0.1,
        "sampling": "poisson",
        "population": 50,
        "cohort_size": 6,
        "expected_cohort_size": 5.0,
        "clip": 0.8,
        "mode": "clip",
        "where": "client",
        "participants": (4, 2, 9),
    }
    fields.update(overrides)
    return RoundRelease(**fields)


def test_json_round_trip_is_exact():
    original = release()
    text = original.to_json()
    assert "\n" not in text
    assert RoundRelease.from_json(text) == original
    fixed = release(
        sampling="fixed", sample_rate=0.1, cohort_size=5, expected_cohort_size=5.0, participants=()
    )
    assert RoundRelease.from_json(fixed.to_json()) == fixed


def test_dp_accounting_event_and_adjacency_per_sampling_mode():
    poisson = release().to_dp_accounting_event()
    assert poisson == dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.2))
    assert (
        release().mechanism.neighboring_relation
        == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    fixed = release(sampling="fixed", cohort_size=5, expected_cohort_size=5.0)
    # replace-one doubles the sum's sensitivity, so the Gaussian's multiplier relative to it is z/2
    assert fixed.to_dp_accounting_event() == dp_event.SampledWithoutReplacementDpEvent(
        50, 5, dp_event.GaussianDpEvent(0.6)
    )
    assert fixed.mechanism.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_ONE
    assert fixed.mechanism.adjacency == "replace one client"


def test_mechanism_ignores_fields_that_do_not_affect_privacy():
    a = release(round=1, clip=0.5, cohort_size=3, participants=(1,))
    b = release(round=2, clip=2.0, cohort_size=8, participants=())
    assert a.mechanism == b.mechanism and hash(a.mechanism) == hash(b.mechanism)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"mode": "off"}, "mode"),
        ({"clip": 0.0}, "clip"),
        ({"cohort_size": 51}, "cohort_size"),
        ({"expected_cohort_size": 6.0}, "fixed denominator"),
        (
            {"sampling": "fixed", "cohort_size": 6, "expected_cohort_size": 6.0},
            "sample_size/population",
        ),
    ],
)
def test_invalid_releases_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        release(**overrides)


def test_malformed_json_records_are_rejected():
    good = release().to_json()
    with pytest.raises(ValueError, match="unknown keys"):
        RoundRelease.from_json(good.replace('"clip"', '"clip_norm"'))
    with pytest.raises(ValueError, match="not a round_release"):
        RoundRelease.from_json('{"round": 1}')
    with pytest.raises(ValueError, match="version"):
        RoundRelease.from_json(good.replace('"version":1', '"version":2'))
    with pytest.raises(ValueError, match="population and sample_size"):
        SampledGaussian(1.0, 0.1, "poisson", population=10)
    assert SampledGaussian.from_dict(
        SampledGaussian.fixed(1.0, 20, 4).to_dict()
    ) == SampledGaussian.fixed(1.0, 20, 4)
