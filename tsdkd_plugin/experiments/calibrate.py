"""Accuracy against SFT steps for one toy model: what the regimes' teachers and students are sized from.

    python -m tsdkd_plugin.experiments.calibrate --model student-medium --role student --n-train 48000 \
        --epochs 1 --lr 3e-3 --seed 2 --every 250 --out runs/calibration/student-medium

    python -m tsdkd_plugin.experiments.calibrate --summarize runs/calibration --report-dir benchmarks/toy_results

One OpenRLHF `train_sft` run (the same command, flags and thread count as a cached teacher or
student build) that also saves an HF copy of the model every `--every` steps; each copy is then
evaluated on the validation split, greedy and with one temperature-1 sample per problem (the
on-policy methods train on such samples, so how often they end in a well-formed `#### n` matters).
Note that a checkpoint at step s of an n-step cosine schedule is not the model an s-step run would
give. The curve goes to <out>/curve.json (rewritten after every checkpoint: a rerun resumes).
`--summarize` gathers every curve.json under a directory into calibration.md/.json/.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tsdkd_plugin.experiments.budgets import MAX_NEW_TOKENS_BY_DIFFICULTY, SFTRecipe, write_task_data
from tsdkd_plugin.experiments.evaluate import evaluate_model
from tsdkd_plugin.experiments.runner import (
    JobError,
    banner,
    machine_info,
    run_entry_point,
    write_json_atomic,
    write_text_atomic,
)
from tsdkd_plugin.experiments.trained_models import base_model_dir, hf_copies, hf_copy_flags, run_sft

PROG = "python -m tsdkd_plugin.experiments.calibrate"


def evaluate_checkpoints(
    models: dict[int, Path], prompts_file: Path, max_new_tokens: int, curve_file: Path, header: dict
) -> list[dict]:
    """Greedy and sampled accuracy and answered rate of every model; resumes from curve_file."""
    done = {}
    if curve_file.is_file():
        done = {point["step"]: point for point in json.loads(curve_file.read_text())["curve"]}
    for step, model_dir in models.items():
        if step in done:
            continue
        greedy = evaluate_model(model_dir, prompts_file, max_new_tokens=max_new_tokens, desc=f"step {step} greedy")
        sampled = evaluate_model(
            model_dir, prompts_file, max_new_tokens=max_new_tokens, sampled=True, seed=0, desc=f"step {step} sampled"
        )
        done[step] = {
            "step": step,
            "model": str(model_dir),
            "greedy_accuracy": greedy.accuracy,
            "greedy_answered": greedy.answered / greedy.n,
            "sampled_accuracy": sampled.accuracy,
            "sampled_answered": sampled.answered / sampled.n,
            "greedy_by_num_ops": greedy.to_dict()["by_num_ops"],
        }
        print(
            f"  step {step:5d}: greedy {greedy.accuracy:6.1%} (answered {greedy.answered / greedy.n:6.1%}), "
            f"sampled {sampled.accuracy:6.1%} (answered {sampled.answered / sampled.n:6.1%})",
            flush=True,
        )
        write_json_atomic(curve_file, {**header, "curve": [done[s] for s in sorted(done)]})
    return [done[s] for s in sorted(done)]


def run_calibration(options: argparse.Namespace) -> int:
    if options.summarize:
        written = write_calibration_summary(Path(options.summarize), Path(options.report_dir))
        for path in written.values():
            print(f"  {path}")
        return 0
    missing = [
        flag
        for flag, value in (
            ("--model", options.model),
            ("--n-train", options.n_train),
            ("--lr", options.lr),
            ("--out", options.out),
        )
        if value is None
    ]
    if missing:
        raise JobError(f"a calibration run needs {', '.join(missing)} (or --summarize DIR)")
    out = Path(options.out).resolve()
    recipe = SFTRecipe(
        role=options.role,
        model=options.model,
        n_train=options.n_train,
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        seed=options.seed,
        warmup_ratio=options.warmup_ratio,
        lr_scheduler=options.lr_scheduler,
    )
    banner(f"calibration: {options.model} on {options.difficulty}, {recipe.steps} SFT steps, lr {recipe.lr}")
    files = write_task_data(out / "data", options.difficulty, options.n_train, options.n_val, 16)
    model_dir, ckpt_dir = out / "model", out / "checkpoints"
    if not (model_dir / "config.json").is_file():
        run_sft(
            recipe,
            base_model_dir(options.model, options.cache_dir),
            files["sft_train"],
            model_dir,
            work_dir=out,
            timeout_s=6 * 3600,
            verbose=options.verbose,
            extra_flags=hf_copy_flags(ckpt_dir, options.every),
        )
    models = {**hf_copies(ckpt_dir), recipe.steps: model_dir}
    header = {
        "command": [PROG, *options.argv],
        "difficulty": options.difficulty,
        "recipe": asdict(recipe),
        "steps": recipe.steps,
        "n_val": options.n_val,
        "machine": machine_info(),
    }
    evaluate_checkpoints(
        models, files["prompts_val"], MAX_NEW_TOKENS_BY_DIFFICULTY[options.difficulty], out / "curve.json", header
    )
    return 0


def write_calibration_summary(runs_dir: Path, report_dir: Path) -> dict[str, Path]:
    """calibration.md (one row per run and checkpoint), calibration.json (the curves, with the run
    files they came from) and calibration.png (greedy validation accuracy against SFT steps)."""
    from tsdkd_plugin.experiments.report import _pyplot, _save

    runs = []
    for curve_file in sorted(Path(runs_dir).glob("*/curve.json")):
        data = json.loads(curve_file.read_text())
        # A curve gathered from an earlier summary keeps the run file it names.
        runs.append({**data, "name": curve_file.parent.name, "file": data.get("file", str(curve_file))})
    lines = [
        "# Calibration: greedy validation accuracy against SFT steps",
        "",
        "Each run: `python -m tsdkd_plugin.experiments.calibrate` (its command is in calibration.json); "
        "a checkpoint at step s of an n-step cosine schedule is not what an s-step run would give.",
        "",
        "The same recipe climbs at other steps on another kind of processor (docs/reproduction.md), so each "
        "run names the one it ran on.",
        "",
        "| run | processor | model | lr | schedule steps | step | greedy | sampled (T=1) | samples answered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        recipe = run["recipe"]
        for point in run["curve"]:
            lines.append(
                f"| {run['name']} | {_processor(run)} | {recipe['model']} | {recipe['lr']:g} | {run['steps']} | "
                f"{point['step']} | "
                f"{100 * point['greedy_accuracy']:.1f}% | {100 * point['sampled_accuracy']:.1f}% | "
                f"{100 * point['sampled_answered']:.1f}% |"
            )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 5))
    for run in runs:
        ax.plot(
            [p["step"] for p in run["curve"]],
            [100 * p["greedy_accuracy"] for p in run["curve"]],
            marker="o",
            markersize=3,
            label=f"{run['recipe']['model']}, {run['steps']} steps, lr {run['recipe']['lr']:g} ({_processor(run)})",
        )
    ax.set_xlabel("SFT step (batch 32)")
    ax.set_ylabel("validation accuracy (%), greedy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    report_dir.mkdir(parents=True, exist_ok=True)
    plot = _save(plt, fig, report_dir / "calibration.png")
    lines += ["", f"![calibration]({plot.name})", ""]
    return {
        "markdown": write_text_atomic(report_dir / "calibration.md", "\n".join(lines)),
        "json": write_json_atomic(report_dir / "calibration.json", {"runs": runs}),
        "plot": plot,
    }


def _processor(run: dict) -> str:
    return run.get("machine", {}).get("cpu") or "?"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="toy model name (tsdkd_plugin.toy.models.MODEL_RECIPES)")
    parser.add_argument("--role", default="student", help="teacher or student (names the logs)")
    parser.add_argument("--difficulty", default="easy")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-scheduler", default="cosine_with_min_lr")
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=250, help="save and evaluate a checkpoint every N steps")
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--out")
    parser.add_argument("--summarize", default=None, help="gather every <dir>/*/curve.json into a report instead")
    parser.add_argument("--report-dir", default="benchmarks/toy_results", help="where --summarize writes")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(PROG, build_arg_parser().parse_args, run_calibration, argv)


if __name__ == "__main__":
    sys.exit(main())
