"""The comparison's protocol, as plain functions: tuning on validation, then seeds on test.

1. Tuning, on the validation split, one seed (TUNING_SEED, not one of the test seeds):
   every method first gets the same learning-rate grid (LR_GRID) with its default settings; then,
   at its best learning rate, the same number of trials of its own hyperparameter (`Method.grid`:
   GKD's beta, TSD-KD's weights, DPO's beta, ...). So every method gets the same number of trials.
   When that grid moved the choice off the default, the learning rates next to the chosen one in
   the grid are tried once more at the new settings (a 100x smaller TSD-KD weight can move the best
   rate); the same rule for every method, so a method whose own grid changed nothing gets no such
   trials (the report gives every method's count).
   The best validation accuracy wins; ties go to the earlier trial (the default comes first).
2. Test: each method's chosen settings, `seeds` seeds, on the test split. Reported: mean, a 95%
   confidence interval (Student t over seeds), and the per-seed difference against a reference
   method run with the same seed (same prompt order and sampling seed), with its own 95% CI.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# Learning rates every method is tried at (constant after a 5% warm-up). The earlier comparison
# found 1e-3 destroys every on-policy student and 1e-4 the best single value.
LR_GRID = (3e-5, 1e-4, 3e-4)
TUNING_SEED = 100
CONFIDENCE = 0.95


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """{"mean", "half_width", "low", "high", "n", "std"}; half_width is nan for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "n": n, "std": std}


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict | None:
    """Per-seed differences values[s] - reference[s] over the seeds both have, with mean_ci of them;
    None when they share no seed."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    differences = {seed: values[seed] - reference[seed] for seed in seeds}
    return {"per_seed": differences, **mean_ci(list(differences.values()), confidence)}


def intervals_overlap(a: Mapping, b: Mapping) -> bool:
    return not (a["low"] > b["high"] or b["low"] > a["high"])


def best_trial(trials: Sequence[tuple[Mapping, float]]) -> tuple[Mapping, float]:
    """The (settings, validation accuracy) with the highest accuracy; the first one on a tie."""
    if not trials:
        raise ValueError("best_trial of no trials")
    best = trials[0]
    for trial in trials[1:]:
        if trial[1] > best[1]:
            best = trial
    return best
