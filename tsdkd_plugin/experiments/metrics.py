"""Per-step metrics of a run, read back from the TensorBoard events it wrote.

OpenRLHF's Ray trainers (`train_tsdkd`, `train_ppo_ray`) log every rollout's metrics under
`train/<name>` at the rollout's global step when `--logger.tensorboard_dir` is given; `train_sft`
and `train_dpo` log under `train/<name>` every `--logger.logging_steps` optimizer steps. Reading
the events (rather than the console output) gives the numbers the trainers computed, by name.
TensorBoard stores scalars as float32.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_PREFIX = "train/"


def training_curve(tensorboard_dir: Path) -> list[dict]:
    """One dict per logged step, `{"global_step": n, <metric>: value, ...}`, metric names without the
    `train/` prefix (e.g. `reward`, `policy_loss`, `tsdkd/loss_direct`); [] when nothing was logged."""
    from tsdkd_plugin.testing import tensorboard_scalars

    try:
        scalars = tensorboard_scalars(Path(tensorboard_dir))
    except FileNotFoundError:
        return []
    by_step: dict[int, dict] = {}
    for tag, values in scalars.items():
        if not tag.startswith(TRAIN_PREFIX):
            continue
        for step, value in values.items():
            by_step.setdefault(step, {"global_step": step})[tag[len(TRAIN_PREFIX) :]] = float(value)
    return [by_step[step] for step in sorted(by_step)]


def logged_rollouts(curve: list[dict]) -> int:
    """Rollouts a Ray trainer completed: the steps its TensorBoard events hold."""
    return len(curve)


def logged_samples(curve: list[dict]) -> int:
    """Samples a Ray trainer generated and trained on over all rollouts (`rollout/num_samples`)."""
    return int(sum(point.get("rollout/num_samples", 0.0) for point in curve))
