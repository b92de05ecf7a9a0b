"""Does TSD-KD work? TSD-KD against baselines and its own ablations, in two regimes, by a fixed protocol.

    python -m tsdkd_plugin.experiments.compare [--regimes paper-like,weak-student] [--seeds 5]
                                               [--run-dir runs/compare] [--out benchmarks/toy_results]

Regimes (`budgets.BUDGETS`): "paper-like", a student that starts near its teacher as in the paper,
"weak-student", the earlier setting with a student far below its teacher, and "paper-like-long",
the paper-like one with 3x the distillation budget (96 optimizer steps, where the best baseline's
validation accuracy flattens). In each, every
method starts from the same initial student and gets the same distillation budget (prompts,
samples, optimizer steps of the same size); only the training signal differs (`methods`).

Protocol (`protocol`): tuning on the validation split with one seed (the same learning-rate grid
for every method, then the same number of trials of each method's own hyperparameters; in the
weak-student and paper-like-long regimes only the learning rate is tuned, at the rate chosen in the
paper-like regime and the grid's rates next to it, the rest taken from the paper-like regime),
then `--seeds` seeds of each method's chosen settings on the test split, reported with 95%
confidence intervals and per-seed differences against GKD. At 32 steps (paper-like) the test split
gets GKD, TSD-KD (paper preset) and its ablations and remedies; every method is tested at 96 steps
(paper-like-long) and in the weak-student regime. Ablations (the paper's ladder by default;
--methods design-ablations adds the reference code's prefix ListMLE, the hard gate and sequence
ranking) take TSD-KD's (paper preset) chosen settings and switch one part off. Remedies (opt-in
objective options) take the same settings, are tried on validation, and run on test only when they
beat TSD-KD's chosen validation accuracy.
Tuning runs keep evenly spaced checkpoints whose validation accuracy shows whether the budget is
long enough (the curves in the report).

Each method's tuning is a chain of runs, but the methods are independent: with --jobs N, N runs
go on side by side (run_pool), each method's tuning and then its test seeds beside the others'.
Every invocation's wall time is recorded under <run-dir>/invocations/ (the report sums them).

Every finished run is a JSON file under <run-dir>/<regime>/results/ (what it ran, what it logged,
its evaluation), so an interrupted comparison resumes where it stopped; the report in --out is
written from those files at the end (--report-only: only that). A failed run is recorded and the
comparison goes on; the report lists it. The machinery is in `comparison`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tsdkd_plugin.experiments.comparison import (
    REGIMES,
    collect,
    record_invocation,
    run_regime,
)
from tsdkd_plugin.experiments.methods import METHOD_GROUPS, METHODS, parse_methods
from tsdkd_plugin.experiments.options import check_work_dirs
from tsdkd_plugin.experiments.protocol import LR_GRID
from tsdkd_plugin.experiments.run_pool import RunPool
from tsdkd_plugin.experiments.runner import JobError, banner, run_entry_point

PROG = "python -m tsdkd_plugin.experiments.compare"


def run_comparison(options: argparse.Namespace) -> int:
    started = time.time()
    if options.seeds < 1:
        raise JobError(f"--seeds must be at least 1, got {options.seeds}")
    if options.jobs < 1:
        raise JobError(f"--jobs must be at least 1, got {options.jobs}")
    if options.grid_trials is not None and options.grid_trials < 0:
        raise JobError(f"--grid-trials must be 0 or more, got {options.grid_trials}")
    options.lr_grid = parse_lr_grid(options.lr_grid)
    check_work_dirs(options)
    if options.restore_from and not Path(options.restore_from).is_file():
        # Checked here, not only when the runs are restored: that comes after the teacher and student builds.
        raise JobError(f"--restore-from: no such file {options.restore_from} (give an earlier comparison.json)")
    regimes = [r.strip() for r in options.regimes.split(",") if r.strip()]
    for name in regimes:
        if name not in REGIMES:
            raise JobError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    methods = parse_methods(options.methods)
    options.seed_list = list(range(options.first_seed, options.first_seed + options.seeds))
    if not options.report_only:
        with record_invocation(Path(options.run_dir), options) as add_phase_seconds, RunPool(options.jobs) as pool:
            for name in regimes:
                run_regime(REGIMES[name], options, methods, pool, add_phase_seconds)
    from tsdkd_plugin.experiments.report import write_comparison_report

    command = [PROG, *(a for a in options.argv if a != "--report-only")]
    data = collect(options, regimes, methods, time.time() - started, command)
    written = write_comparison_report(data, Path(options.out))
    banner("comparison written")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    return 0


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """--lr-grid "3e-5,1e-4" -> (3e-05, 0.0001); JobError naming the option for anything else."""
    try:
        grid = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        grid = ()
    if not grid or any(not lr > 0 for lr in grid):
        raise JobError(f"--lr-grid must be comma-separated positive learning rates (e.g. 3e-5,1e-4), got {text!r}")
    return grid


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated: {', '.join(REGIMES)}")
    parser.add_argument("--seeds", type=int, default=5, help="test seeds per method (default 5)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        default="tuned,ablations,remedies",
        help=f"comma-separated: {', '.join(METHODS)}; or {', '.join(METHOD_GROUPS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--lr-grid",
        default=",".join(f"{lr:g}" for lr in LR_GRID),
        help="learning rates every method is tuned at, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--grid-trials",
        type=int,
        default=None,
        help="trials of each method's own grid after the learning rate, the first N entries for "
        "every method alike (default: the whole grid)",
    )
    parser.add_argument("--run-dir", default="runs/compare", help="work directory (resumable)")
    parser.add_argument("--out", default="benchmarks/toy_results", help="where the report goes")
    parser.add_argument("--cache-dir", default=None, help="fixture cache root")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side, each in its own worker process (default 1; 2 on a 2-core machine keeps both "
        "cores busy and changes no result: each run pins its threads)",
    )
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is stopped")
    parser.add_argument(
        "--stop-after",
        choices=("tune", "test"),
        default="test",
        help="tune: stop each regime after tuning (default: run the test seeds too)",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    parser.add_argument(
        "--restore-from",
        default=None,
        metavar="COMPARISON_JSON",
        help="an earlier comparison.json whose runs are written back as run files (after checking that the "
        "teacher and student built here score what it recorded), so that it resumes and extends",
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(
        PROG,
        build_arg_parser().parse_args,
        run_comparison,
        argv,
        interrupted="interrupted; finished runs are kept and a rerun resumes.",
    )


if __name__ == "__main__":
    sys.exit(main())
