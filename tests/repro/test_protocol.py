"""The comparison's statistics: confidence intervals, paired differences, choosing a trial."""

import math

import pytest

from tsdkd_plugin.experiments.protocol import best_trial, intervals_overlap, mean_ci, paired_difference


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([0.50, 0.52, 0.54, 0.56, 0.58])
    # mean 0.54, sample sd 0.0316228, t(0.975, 4) = 2.776445
    assert ci["mean"] == pytest.approx(0.54)
    assert ci["half_width"] == pytest.approx(2.776445 * 0.0316228 / math.sqrt(5), rel=1e-5)
    assert (ci["low"], ci["high"]) == pytest.approx((0.54 - ci["half_width"], 0.54 + ci["half_width"]))
    single = mean_ci([0.3])
    assert single["mean"] == 0.3 and math.isnan(single["half_width"])
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_uses_the_seeds_both_have():
    method = {0: 0.60, 1: 0.58, 2: 0.62, 3: 0.61}
    reference = {0: 0.55, 1: 0.55, 2: 0.58, 4: 0.9}
    diff = paired_difference(method, reference)
    assert diff["per_seed"] == pytest.approx({0: 0.05, 1: 0.03, 2: 0.04})
    assert diff["mean"] == pytest.approx(0.04) and diff["n"] == 3
    # A paired interval is narrower than the difference of the two unpaired ones would suggest.
    assert diff["low"] > 0
    assert paired_difference({0: 0.5}, {1: 0.5}) is None


def test_overlap_and_choice():
    assert intervals_overlap({"low": 0.1, "high": 0.3}, {"low": 0.25, "high": 0.4})
    assert not intervals_overlap({"low": 0.1, "high": 0.2}, {"low": 0.25, "high": 0.4})
    assert best_trial([({"lr": 1}, 0.5), ({"lr": 2}, 0.7), ({"lr": 3}, 0.7)]) == ({"lr": 2}, 0.7)
    assert best_trial([({"lr": 1}, float("-inf")), ({"lr": 2}, 0.0)]) == ({"lr": 2}, 0.0)
