"""Markdown, PNG and JSON reports of the main job and of the baseline comparison.

Plots use matplotlib's Agg backend (no display needed). Every writer takes the
results as plain dicts (what main_job / compare put in their JSON), so a
report can be regenerated from a results.json alone:

    python -m tsdkd_plugin.experiments.report runs/default/results.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tsdkd_plugin.experiments.runner import write_json_atomic, write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _ops_keys(evaluations: Mapping[str, Mapping]) -> list[str]:
    keys = {ops for evaluation in evaluations.values() for ops in evaluation.get("by_num_ops", {})}
    return sorted(keys, key=int)


def _machine_line(machine: Mapping) -> str:
    load = machine.get("load_average_1_5_15")
    load_text = f", load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) when the report was written" if load else ""
    return (
        f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores, {machine.get('device', '?')}, "
        f"torch {machine.get('torch', '?')}, Python {machine.get('python', '?')}, {machine.get('platform', '?')}{load_text}"
    )


# --------------------------------------------------------------------------- the main job


def plot_job_accuracy(evaluations: Mapping[str, Mapping], path: Path, title: str) -> Path:
    """Grouped bars: accuracy overall and by number of operations, one colour per model."""
    plt = _pyplot()
    groups = ["all"] + [f"{ops} ops" for ops in _ops_keys(evaluations)]
    names = list(evaluations)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, name in enumerate(names):
        evaluation = evaluations[name]
        values = [evaluation["accuracy"]] + [
            evaluation["by_num_ops"].get(ops, {}).get("accuracy", float("nan")) for ops in _ops_keys(evaluations)
        ]
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [100 * v for v in values], width, label=name)
        ax.bar_label(bars, labels=[f"{100 * v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_training_curve(curve: Sequence[Mapping], path: Path, title: str) -> Path | None:
    """Sample accuracy (verifier reward) and loss per rollout, when the trainer logged them."""
    # The total loss and each TSD-KD term (tsdkd/loss would repeat policy_loss).
    candidates = ("reward", "policy_loss", "tsdkd/loss_direct", "tsdkd/loss_indirect_token",
                  "tsdkd/loss_indirect_sequence", "tsdkd/loss_entropy")
    keys = [k for k in candidates if any(point.get(k) for point in curve)]
    if not curve or not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(p["global_step"], p[key]) for p in curve if key in p]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3)
        ax.set_xlabel("rollout")
        ax.set_title("sample accuracy (verifier)" if key == "reward" else key.replace("tsdkd/", ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def job_markdown(results: Mapping, plot_name: str, curve_name: str | None) -> str:
    evaluations = results["evaluations"]
    budget = results["budget"]
    distill = budget["distill"]
    ops = _ops_keys(evaluations)
    lines = [
        "# TSD-KD on the built-in arithmetic task",
        "",
        f"Command: `{' '.join(results['command'])}`  ",
        f"Budget: **{budget['name']}**, difficulty **{results['options']['difficulty']}**, "
        f"distillation seed {results['options']['seed']}  ",
        f"Machine: {_machine_line(results['machine'])}  ",
        f"Wall time: {results['wall_seconds'] / 60:.1f} min",
        "",
        f"## Test accuracy (greedy, {budget['n_test']} held-out problems)",
        "",
        "| model | accuracy | " + " | ".join(f"{o} ops" for o in ops) + " | answered |",
        "|---|---|" + "---|" * len(ops) + "---|",
    ]
    for name, evaluation in evaluations.items():
        by_ops = " | ".join(_pct(evaluation["by_num_ops"].get(o, {}).get("accuracy")) for o in ops)
        lines.append(
            f"| {name} | **{_pct(evaluation['accuracy'])}** ({evaluation['correct']}/{evaluation['n']}) | {by_ops} | "
            f"{_pct(evaluation.get('answered_rate'))} |"
        )
    initial = evaluations.get("student (initial)", {}).get("accuracy")
    distilled = evaluations.get("student (TSD-KD)", {}).get("accuracy")
    lines += ["", f"![accuracy]({plot_name})", ""]
    if initial is not None and distilled is not None:
        lines.append(f"TSD-KD changed the student's accuracy by **{100 * (distilled - initial):+.1f} points**.")
    if not results.get("teacher_margin_ok", True):
        lines.append(
            "Note: at this budget the teacher is not clearly better than the initial student, so the run "
            "tests the plumbing, not the method (use `--budget default`)."
        )
    lines += [
        "",
        "## What ran",
        "",
        "| stage | time | notes |",
        "|---|---|---|",
    ]
    for name, stage in results["stages"].items():
        note = stage.get("note") or ""
        lines.append(f"| {name} | {stage['seconds']:.0f} s | {note} |")
    lines.append("")
    for role, label in (("teacher", "teacher"), ("student", "initial student")):
        recipe = budget[role]
        steps = recipe["n_train"] // recipe["batch_size"] * recipe["epochs"]
        lines.append(
            f"- {label}: OpenRLHF `train_sft` on the worked solutions, {steps} steps ({recipe['n_train']} problems "
            f"x {recipe['epochs']} epochs, batch {recipe['batch_size']}), lr {recipe['lr']}"
        )
    lines += [
        f"- TSD-KD: `python -m openrlhf.cli.train_tsdkd`, {distill['n_prompts']} prompts x "
        f"{distill['samples_per_prompt']} student samples, train batch {distill['train_batch_size']} "
        f"({distill['n_prompts'] * distill['samples_per_prompt'] // distill['train_batch_size']} optimizer steps), "
        f"lr {distill['lr']}, default objective (docs/objective.md)",
    ]
    tsdkd_stage = results["stages"].get("tsdkd", {})
    if tsdkd_stage.get("extra", {}).get("command"):
        lines += ["", "Distillation command:", "", "```", " ".join(tsdkd_stage["extra"]["command"]), "```"]
    if curve_name:
        lines += ["", "## Training", "", f"![training]({curve_name})"]
    lines.append("")
    return "\n".join(lines)


def write_job_report(results: Mapping, run_dir: Path) -> dict[str, Path]:
    """report.md, accuracy.png, training.png (when logged) and results.json in run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(run_dir / "results.json", results)
    title = (f"TSD-KD toy job ({results['budget']['name']} budget, {results['options']['difficulty']}): "
             f"greedy test accuracy")
    plot = plot_job_accuracy(results["evaluations"], run_dir / "accuracy.png", title)
    curve = plot_training_curve(results.get("training_curve") or [], run_dir / "training.png", "TSD-KD training")
    markdown = write_text_atomic(
        run_dir / "report.md", job_markdown(results, plot.name, curve.name if curve else None)
    )
    return {"markdown": markdown, "plot": plot, "json": json_path, "training_plot": curve}


# --------------------------------------------------------------------------- the comparison


def summarize_runs(runs: Sequence[Mapping]) -> dict[str, dict]:
    """Per method: accuracies over seeds, mean, sample standard deviation, mean by number of ops."""
    by_method: dict[str, list[Mapping]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    summary = {}
    for method, method_runs in by_method.items():
        accuracies = [r["evaluation"]["accuracy"] for r in method_runs]
        ops = sorted({o for r in method_runs for o in r["evaluation"]["by_num_ops"]}, key=int)
        summary[method] = {
            "label": method_runs[0].get("label", method),
            "group": method_runs[0].get("group", ""),
            "seeds": [r["seed"] for r in method_runs],
            "accuracies": accuracies,
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "by_num_ops_mean": {
                o: statistics.fmean(r["evaluation"]["by_num_ops"][o]["accuracy"]
                                    for r in method_runs if o in r["evaluation"]["by_num_ops"])
                for o in ops
            },
            "seconds_mean": statistics.fmean(r.get("seconds", float("nan")) for r in method_runs),
            # Distinct step counts over seeds, as counted in the training logs.
            "optimizer_steps": sorted({r.get("optimizer_steps") for r in method_runs}, key=lambda x: (x is None, x)),
        }
    return summary


def plot_comparison(summary: Mapping[str, Mapping], references: Mapping[str, float], path: Path, title: str) -> Path:
    """One bar per method (mean over seeds, error bar = sample std), seeds as dots, references as lines."""
    plt = _pyplot()
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(methods) + 2), 4.6))
    colors = {"baseline": "#8c8c8c", "tsdkd": "#1f77b4", "ablation": "#9ecae1"}
    for x, method in enumerate(methods):
        entry = summary[method]
        ax.bar(x, 100 * entry["mean"], 0.7, yerr=100 * entry["std"], capsize=4,
               color=colors.get(entry.get("group"), "#1f77b4"), edgecolor="black", linewidth=0.5)
        ax.scatter([x] * len(entry["accuracies"]), [100 * a for a in entry["accuracies"]], s=10, color="black", zorder=3)
        ax.text(x, 100 * (entry["mean"] + entry["std"]) + 1.5, f"{100 * entry['mean']:.1f}", ha="center", fontsize=7)
    styles = ["--", ":", "-."]
    for (name, value), style in zip(references.items(), styles):
        ax.axhline(100 * value, linestyle=style, color="darkred", linewidth=1, label=f"{name} ({100 * value:.1f}%)")
    ax.set_xticks(range(len(methods)), [summary[m]["label"] for m in methods], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    top = max([100 * (e["mean"] + e["std"]) for e in summary.values()] + [100 * v for v in references.values()] + [10])
    ax.set_ylim(0, min(105, top + 10))
    ax.set_title(title, fontsize=10)
    if references:
        ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def comparison_markdown(comparison: Mapping, summary: Mapping[str, Mapping], plot_name: str) -> str:
    references = comparison["references"]
    ops = sorted({o for entry in summary.values() for o in entry["by_num_ops_mean"]}, key=int)
    budget = comparison["budget"]["distill"]
    lines = [
        "# Toy-scale comparison: TSD-KD against baselines and its own ablations",
        "",
        f"Command: `{' '.join(comparison['command'])}`  ",
        f"Machine: {_machine_line(comparison['machine'])}  ",
        f"Difficulty: {comparison['difficulty']}; seeds: {', '.join(str(s) for s in comparison['seeds'])}; "
        f"time of the {len(comparison['runs'])} runs (training + evaluation, summed over resumed invocations): "
        f"{sum(r.get('seconds', 0.0) for r in comparison['runs']) / 60:.0f} min",
        "",
        f"Equal budget for every method: the same initial student, the same {budget['n_prompts']} train prompts, "
        f"{budget['n_prompts'] * budget['samples_per_prompt']} sampled responses "
        f"({budget['samples_per_prompt']} per prompt), "
        f"{budget['n_prompts'] * budget['samples_per_prompt'] // budget['train_batch_size']} optimizer steps of "
        f"{budget['train_batch_size']} sequences, lr {budget['lr']}. Test split: {comparison['n_test']} held-out "
        f"problems, greedy decoding. Mean ± sample standard deviation over seeds.",
        "",
        "| method | accuracy (mean ± std) | per seed | " + " | ".join(f"{o} ops" for o in ops)
        + " | optimizer steps taken | s / run |",
        "|---|---|---|" + "---|" * len(ops) + "---|---|",
    ]
    for name, value in references.items():
        lines.append(f"| *{name}* | {_pct(value)} | | " + " | " * len(ops) + " | |")
    for method, entry in summary.items():
        per_seed = ", ".join(f"{100 * a:.1f}" for a in entry["accuracies"])
        by_ops = " | ".join(_pct(entry["by_num_ops_mean"].get(o)) for o in ops)
        steps = "/".join(str(s) for s in entry["optimizer_steps"])
        lines.append(
            f"| {entry['label']} | **{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}** | {per_seed} | {by_ops} | "
            f"{steps} | {entry['seconds_mean']:.0f} |"
        )
    lines += ["", f"![comparison]({plot_name})", ""]
    if comparison.get("methods_doc"):
        lines += ["## Methods", ""] + [f"- **{label}**: {doc}" for label, doc in comparison["methods_doc"]] + [""]
    missing = comparison.get("missing") or []
    if missing:
        lines += ["## Runs that did not finish", ""] + [f"- {m}" for m in missing] + [""]
    return "\n".join(lines)


def write_comparison_report(comparison: Mapping, out_dir: Path, stem: str = "comparison") -> dict[str, Path]:
    """<stem>.md, <stem>.png and <stem>.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_runs(comparison["runs"])
    ordered = {m: summary[m] for m in comparison.get("method_order", summary) if m in summary}
    data = {**comparison, "summary": ordered}
    json_path = write_json_atomic(out_dir / f"{stem}.json", data)
    title = (f"Toy arithmetic ({comparison['difficulty']}), equal budget, "
             f"{len(comparison['seeds'])} seeds: greedy test accuracy")
    plot = plot_comparison(ordered, comparison["references"], out_dir / f"{stem}.png", title)
    markdown = write_text_atomic(out_dir / f"{stem}.md", comparison_markdown(comparison, ordered, plot.name))
    return {"markdown": markdown, "plot": plot, "json": json_path}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m tsdkd_plugin.experiments.report RESULTS.json (a job's results.json or a comparison.json)",
              file=sys.stderr)
        return 2
    path = Path(args[0])
    data = json.loads(path.read_text(encoding="utf-8"))
    if "runs" in data:
        written = write_comparison_report(data, path.parent, path.stem)
    else:
        written = write_job_report(data, path.parent)
    for kind, where in written.items():
        if where:
            print(f"{kind}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
