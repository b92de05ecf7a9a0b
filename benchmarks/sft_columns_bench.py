"""The toy builds' `train_sft` with upstream's lazy dataset columns against lists, side by side (CPU).

Not a test. Each run is `trained_models.run_sft`, the call that builds the comparison's and the
main job's teacher and students (`cpu_launch` + stock `openrlhf.cli.train_sft`), on the paper-like
teacher's recipe cut to `--steps` optimizer steps. Two variants, alternated (lazy, lists, lazy,
lists, ...) so that a drift in the machine's speed falls on both:

- **lazy**: `cpu_launch` with `dataset_columns.hold_columns_as_lists` made a no-op, i.e. upstream's
  `SFTDataset` reading each row from a lazy `datasets` column (patches/README.md, item 8);
- **lists**: `cpu_launch` as it is (the columns held as lists).

It reports each variant's median wall time per run and per step (the step bar's own elapsed time),
their ratios, and whether the two variants' trained weights are byte-identical.

    .venv/bin/python benchmarks/sft_columns_bench.py --steps 150 --repeats 2 [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's tsdkd_plugin, installed or not (as the other benchmarks)

# cpu_launch with the wrap turned off: the benchmark's only departure from the command users run.
LAZY_LAUNCH = (
    "import sys; from tsdkd_plugin.host import dataset_columns; "
    "dataset_columns.hold_columns_as_lists = lambda: []; "
    "from tsdkd_plugin.host.cpu_launch import main; main(sys.argv[1:])"
)
_BAR = re.compile(r"Train step of epoch \d+:\s+100%\|[^|]*\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<")


def step_seconds(log: str) -> float:
    """Seconds per step from the last completed epoch bar of a train_sft log (tqdm's elapsed)."""
    matches = _BAR.findall(log.replace("\r", "\n"))
    if not matches:
        raise ValueError("no completed 'Train step of epoch' bar in the train_sft log")
    steps, hours, minutes, seconds = matches[-1]
    return (int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)) / int(steps)


def lazy_command(command: list[str]) -> list[str]:
    """The cpu_launch command line with `-m tsdkd_plugin.host.cpu_launch` replaced by LAZY_LAUNCH."""
    i = command.index("-m")
    if command[i + 1] != "tsdkd_plugin.host.cpu_launch":
        raise ValueError(f"not a cpu_launch command: {command[:4]}")
    return [*command[:i], "-c", LAZY_LAUNCH, *command[i + 2 :]]


def run_variant(variant: str, recipe, base: Path, data_file: Path, out: Path, timeout_s: float) -> dict:
    from tsdkd_plugin.experiments import trained_models

    upstream_command = trained_models.upstream_command
    if variant == "lazy":
        trained_models.upstream_command = lambda *a, **k: lazy_command(upstream_command(*a, **k))
    try:
        result = trained_models.run_sft(recipe, base, data_file, out / "model", work_dir=out, timeout_s=timeout_s)
    finally:
        trained_models.upstream_command = upstream_command
    if result.returncode != 0:
        raise SystemExit(f"{variant} run failed (exit {result.returncode}); log: {out}")
    weights = hashlib.sha256((out / "model" / "model.safetensors").read_bytes()).hexdigest()
    log = Path(result.log).read_text(errors="replace")
    return {"wall": result.seconds, "step": step_seconds(log), "weights": weights}


def table(runs: dict[str, list[dict]], steps: int) -> str:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall", "step")} for v, rs in runs.items()}
    same = len({r["weights"] for rs in runs.values() for r in rs}) == 1
    lines = [
        "| variant | runs | median wall per run (s) | median time per step (ms) |",
        "|---|---|---|---|",
    ]
    for variant, rs in runs.items():
        lines.append(f"| {variant} | {len(rs)} | {med[variant]['wall']:.1f} | {1000 * med[variant]['step']:.0f} |")
    lines += [
        "",
        f"Lazy columns / lists: **{med['lazy']['step'] / med['lists']['step']:.2f}x** the time per step, "
        f"{med['lazy']['wall'] / med['lists']['wall']:.2f}x the wall time of a {steps}-step run (start-up included).",
        f"Trained weights of every run byte-identical: **{'yes' if same else 'NO'}**.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (batch 32)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--write", action="store_true", help="write benchmarks/SFT_COLUMNS.md")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.repeats < 1:
        parser.error("--steps must be at least 10 and --repeats at least 1")
    os.environ.setdefault("TSDKD_DEVICE", "cpu")
    from tsdkd_plugin.experiments.budgets import BUDGETS, write_task_data
    from tsdkd_plugin.experiments.trained_models import base_model_dir
    from tsdkd_plugin.toy.cache import default_cache_dir

    budget = BUDGETS["paper-like"]
    recipe = dataclasses.replace(budget.teacher, n_train=args.steps * budget.teacher.batch_size, epochs=1)
    base = base_model_dir(recipe.model, default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="tsdkd_sft_columns_bench_"))
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"lazy": [], "lists": []}
    try:
        data = write_task_data(work / "data", budget.difficulty, recipe.n_train, 16, 16)["sft_train"]
        for i in range(args.repeats):
            for variant in runs:
                runs[variant].append(run_variant(variant, recipe, base, data, work / f"{variant}-{i}", args.timeout))
                print(f"{variant} run {i + 1}: {runs[variant][-1]['wall']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = table(runs, args.steps)
    print(report)
    if args.write:
        from tsdkd_plugin.testing import write_benchmark_report

        write_benchmark_report(
            REPO / "benchmarks" / "SFT_COLUMNS.md",
            "A toy build's train_sft: lazy dataset columns against lists (CPU)",
            "sft_columns_bench.py",
            sys.argv[1:] if argv is None else argv,
            {
                "Recipe": f"paper-like teacher ({recipe.model}), {args.steps} steps of batch {recipe.batch_size}",
                "Load average at the start": f"{load:.1f}",
            },
            report,
        )


if __name__ == "__main__":
    main()
