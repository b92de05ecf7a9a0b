"""Where one comparison run's time goes: start-up, the first rollout, the steady steps.

Not a test. One on-policy TSD-KD run through the code the comparison itself runs
(`tsdkd_plugin.experiments.methods.run_on_policy`: the same `train_tsdkd` command, flags, child
environment and log handling as every GKD / TSD-KD run of `python -m tsdkd_plugin.experiments.compare`),
with the paper-like regime's budget per rollout (64 prompts x 4 samples drawn at temperature 1 with
per-sample seeds, 64 new tokens, a colocated teacher), for `--rollouts` rollouts.

The time the driver's local Ray instance came up is read from that log line's own timestamp; each
step's rollout time and total from the per-rollout curve `run_on_policy` already reads from the
run's TensorBoard (`timing/generation`, `timing/step_total`), when the first step began and the
last one ended from those events' wall times, and vLLM's log gives the seconds of its engine
initialisation. Printed: a
table of the phases, the first rollout's time as a ratio to the median later rollout (both measured
in this run), and the share of the run's wall time that is fixed cost rather than per-step work.
`--write` stores it in benchmarks/RUN_TIME.md.

The first rollout includes vLLM's engine start (in this stack the engine initialises at the first
generate call: its log lines follow the trainer's first progress bar) and the seeded-sampling join
actor's start; the later rollouts are the steady state. Before the seeded rollouts' join became one
actor (82e90b5) the first rollout of a 128-prompt run took 240 s against 3 s for the second (an
ad-hoc side-by-side run of the two revisions); that revision is not benchmarked here.

    .venv/bin/python benchmarks/run_time_bench.py                      # untrained toy models (built here)
    .venv/bin/python benchmarks/run_time_bench.py --student S --teacher T --write   # e.g. the comparison's
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The driver's own line (not relayed by Ray), stamped with local time to the millisecond.
RAY_UP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO \S+ -- Started a local Ray instance", re.M)
ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")


def ray_up_time(log: str) -> float:
    """Unix time of the driver's "Started a local Ray instance" line."""
    match = RAY_UP.search(log)
    if match is None:
        raise SystemExit("run_time_bench: the run's log has no 'Started a local Ray instance' line")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def default_models(cache_dir: Path) -> tuple[Path, Path]:
    """The paper-like regime's teacher and student architectures, untrained (built in seconds)."""
    from tsdkd_plugin.experiments.budgets import BUDGETS
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import get_model_recipe

    budget = BUDGETS["paper-like"]
    return (
        toy_model_dir(get_model_recipe(budget.student.model), cache_dir),
        toy_model_dir(get_model_recipe(budget.teacher.model), cache_dir),
    )


def measure(student: Path, teacher: Path, rollouts: int, work: Path, timeout_s: float) -> dict:
    from tsdkd_plugin.experiments.budgets import BUDGETS
    from tsdkd_plugin.experiments.flags import tsdkd_flags
    from tsdkd_plugin.experiments.methods import METHODS, run_on_policy
    from tsdkd_plugin.testing import tensorboard_wall_times
    from tsdkd_plugin.toy.arith_task import write_task_files

    distill = BUDGETS["paper-like"].distill
    budget = replace(distill, n_prompts=distill.rollout_batch_size * rollouts)
    files = write_task_files(work / "data", n_train=budget.n_prompts, n_val=1, n_test=1)
    method = METHODS["tsdkd-paper"]
    flags = tsdkd_flags(method.objective_for({"lr": budget.lr}), teacher_dir=teacher)
    stage = work / "run"
    stage.mkdir()
    started, started_epoch = time.monotonic(), time.time()
    _, _, notes = run_on_policy(
        budget,
        trainer="tsdkd",
        method_flags=flags,
        student_dir=student,
        prompts_file=files["prompts_train"],
        stage_dir=stage,
        seed=0,
        timeout_s=timeout_s,
        desc="run_time_bench",
    )
    wall = time.monotonic() - started
    log = (stage / "train.log").read_text(errors="replace")
    curve = notes["training_curve"]  # one entry per rollout, in order
    generation = [point["timing/generation"] for point in curve]
    step_total = [point["timing/step_total"] for point in curve]
    written = tensorboard_wall_times(stage / "tensorboard", "train/timing/step_total")
    engine = ENGINE_INIT.search(log)
    if len(generation) != rollouts:
        raise SystemExit(f"run_time_bench: the run logged {len(generation)} rollouts, not {rollouts}")
    return {
        "wall": wall,
        "ray_up": ray_up_time(log) - started_epoch,
        "loop_start": written[min(written)] - step_total[0] - started_epoch,
        "loop_end": written[max(written)] - started_epoch,
        "engine_init": float(engine.group(1)) if engine else float("nan"),
        "generation": generation,
        "step_total": step_total,
        "rollouts": rollouts,
    }


def table(m: dict) -> str:
    later_generation = statistics.median(m["generation"][1:])
    later_step = statistics.median(m["step_total"][1:])
    steps_after_first = m["loop_end"] - m["loop_start"] - m["step_total"][0]
    rows = [
        ("start -> local Ray instance up (imports, ray.init)", m["ray_up"]),
        ("Ray up -> first step starts (actors, models, DeepSpeed)", m["loop_start"] - m["ray_up"]),
        ("first step (its rollout starts vLLM's engine)", m["step_total"][0]),
        (f"  of which its rollout; vLLM's own engine initialisation {m['engine_init']:.1f} s", m["generation"][0]),
        (f"later steps ({m['rollouts'] - 1}), in all", steps_after_first),
        ("  median later step", later_step),
        ("  median later rollout", later_generation),
        ("after the last step (save the model, stop Ray)", m["wall"] - m["loop_end"]),
        ("wall", m["wall"]),
    ]
    lines = ["| phase | seconds | share of wall |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {100 * seconds / m['wall']:.0f}% |" for name, seconds in rows]
    fixed = m["wall"] - later_step * m["rollouts"]
    lines += [
        "",
        f"First rollout / median later rollout: **{m['generation'][0] / later_generation:.1f}x** "
        f"({m['generation'][0]:.1f} s vs {later_generation:.1f} s, same run).",
        f"Fixed cost of a run (wall minus {m['rollouts']} steady steps): {fixed:.0f} s, "
        f"{100 * fixed / m['wall']:.0f}% of its wall time; a comparison run has 8 rollouts.",
    ]
    return "\n".join(lines)


def run_bench_parser(description: str, rollouts_help: str, report_name: str) -> argparse.ArgumentParser:
    """The options every run benchmark here takes: --rollouts, --student, --teacher, --timeout and
    --write (which writes benchmarks/<report_name>)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rollouts", type=int, default=4, help=rollouts_help)
    parser.add_argument("--student", type=Path, help="student HF directory (default: untrained toy model)")
    parser.add_argument("--teacher", type=Path, help="teacher HF directory (default: untrained toy model)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--write", action="store_true", help=f"write benchmarks/{report_name}")
    return parser


def resolve_models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(student, teacher, how the report names them) in CPU mode; the untrained toy models by default."""
    if (args.student is None) != (args.teacher is None):
        parser.error("--student and --teacher go together")
    os.environ.setdefault("TSDKD_DEVICE", "cpu")
    from tsdkd_plugin.toy.cache import default_cache_dir

    if args.student is None:
        return *default_models(default_cache_dir()), "untrained toy models (paper-like sizes)"
    return args.student, args.teacher, f"student {args.student}, teacher {args.teacher}"


def main(argv=None) -> None:
    parser = run_bench_parser(
        __doc__.split("\n\n")[0], "rollouts of 64 prompts (>= 2; the comparison: 8)", "RUN_TIME.md"
    )
    args = parser.parse_args(argv)
    if args.rollouts < 2:
        parser.error("--rollouts must be at least 2 (the first rollout is compared with the later ones)")
    student, teacher, models = resolve_models(parser, args)
    work = Path(tempfile.mkdtemp(prefix="tsdkd_run_time_bench_"))
    try:
        load = os.getloadavg()[0]
        report = table(measure(student, teacher, args.rollouts, work, args.timeout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    if args.write:
        from tsdkd_plugin.testing import write_benchmark_report

        write_benchmark_report(
            REPO / "benchmarks" / "RUN_TIME.md",
            "One comparison run: where its time goes (CPU)",
            "run_time_bench.py",
            sys.argv[1:] if argv is None else argv,
            {"Models": models, "Load average at the start": f"{load:.1f}"},
            report,
        )


if __name__ == "__main__":
    main()
