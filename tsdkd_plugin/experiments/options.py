"""The command-line options the entry points share (task, difficulty, budget and its overrides,
cache, verbosity), declared and checked in one place.

Bad input gets one sentence (JobError, exit status 2) before anything is trained. No argparse
`choices` for task/difficulty/budget: an unknown value gets this sentence naming the valid ones,
as every other bad input does.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from tsdkd_plugin.experiments.budgets import BUDGETS, DEFAULT_BUDGET, Budget, check_budget, with_difficulty_lengths
from tsdkd_plugin.experiments.flags import DATASET_PATH_SEPARATORS
from tsdkd_plugin.experiments.runner import JobError
from tsdkd_plugin.toy import arith_task

# Overrides of the named budget's distillation settings: option name -> DistillBudget field.
_DISTILL_OVERRIDES = {
    "n_prompts": "n_prompts",
    "rollout_batch_size": "rollout_batch_size",
    "train_batch_size": "train_batch_size",
    "lr": "lr",
}


def add_common_arguments(parser: argparse.ArgumentParser, *, default_run_dir: str) -> None:
    parser.add_argument(
        "--budget", default=DEFAULT_BUDGET, help=f"one of {', '.join(BUDGETS)} (default: {DEFAULT_BUDGET})"
    )
    parser.add_argument("--task", default="arith", help=f"built-in task: {', '.join(arith_task.TASK_NAMES)}")
    parser.add_argument(
        "--difficulty", default=None, help=f"one of {', '.join(arith_task.DIFFICULTIES)} (default: the budget's)"
    )
    parser.add_argument("--run-dir", default=default_run_dir, help="where data, logs, models and results go")
    parser.add_argument(
        "--cache-dir", default=None, help="fixture cache root (default: $TSDKD_CACHE or ~/.cache/tsdkd_plugin)"
    )
    parser.add_argument(
        "--n-prompts", type=int, default=None, help="override: distillation prompts from the train split"
    )
    parser.add_argument("--n-test", type=int, default=None, help="override: size of the test split")
    parser.add_argument("--rollout-batch-size", type=int, default=None, help="override: prompts per rollout")
    parser.add_argument("--train-batch-size", type=int, default=None, help="override: sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="override: distillation learning rate of every method")
    parser.add_argument("--verbose", action="store_true", help="stream every subprocess's full output")


def resolve_budget(options: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides and the difficulty's sequence lengths;
    raises JobError with one sentence for anything that cannot run."""
    if options.budget not in BUDGETS:
        raise JobError(f"unknown budget {options.budget!r}; valid budgets: {', '.join(BUDGETS)}")
    options.difficulty = options.difficulty or BUDGETS[options.budget].difficulty
    try:
        arith_task.check_task_name(options.task)
        arith_task.get_difficulty(options.difficulty)
    except ValueError as error:
        raise JobError(str(error)) from None
    for name in (*_DISTILL_OVERRIDES, "n_test"):
        value = getattr(options, name)
        if value is not None and value <= 0:
            kind = "a positive number" if name == "lr" else "a positive integer"
            raise JobError(f"--{name.replace('_', '-')} must be {kind}, got {value}")
    budget = BUDGETS[options.budget]
    distill = replace(
        budget.distill,
        **{
            field: getattr(options, name)
            for name, field in _DISTILL_OVERRIDES.items()
            if getattr(options, name) is not None
        },
    )
    if options.train_batch_size is not None and options.train_batch_size < distill.micro_batch_size:
        distill = replace(distill, micro_batch_size=options.train_batch_size)
    budget = replace(budget, distill=distill)
    if options.n_test is not None:
        budget = replace(budget, n_test=options.n_test)
    budget = with_difficulty_lengths(budget, options.difficulty)
    check_budget(budget)
    return budget


def check_work_dirs(options: argparse.Namespace) -> None:
    """--run-dir and --cache-dir hold data files that the trainers read through OpenRLHF's
    --data.dataset, which splits a path at ',' and '@' (flags.dataset_flag_value): one sentence
    now instead of a failed stage after the teacher's build."""
    for name in ("run_dir", "cache_dir"):
        value = getattr(options, name, None)
        if value and any(mark in str(Path(value).expanduser().resolve()) for mark in DATASET_PATH_SEPARATORS):
            raise JobError(
                f"--{name.replace('_', '-')} {value}: OpenRLHF's --data.dataset reads ',' and '@' in a data "
                "file's path as a list separator and a split name; choose a directory without them"
            )


def cache_dir_of(options: argparse.Namespace) -> Path | None:
    return Path(options.cache_dir).expanduser().resolve() if options.cache_dir else None
