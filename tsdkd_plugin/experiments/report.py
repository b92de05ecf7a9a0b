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
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tsdkd_plugin.experiments.budgets import StudentSelection
from tsdkd_plugin.experiments.runner import BUILD_PHASE, write_json_atomic, write_text_atomic


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
    load_text = (
        f", load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) when the report was written"
        if load
        else ""
    )
    return (
        f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores, {machine.get('device', '?')}, "
        f"torch {machine.get('torch', '?')}, Python {machine.get('python', '?')}, "
        f"{machine.get('platform', '?')}{load_text}"
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
    candidates = (
        "reward",
        "policy_loss",
        "tsdkd/loss_direct",
        "tsdkd/loss_indirect_token",
        "tsdkd/loss_indirect_sequence",
        "tsdkd/loss_entropy",
    )
    keys = [k for k in candidates if any(point.get(k) for point in curve)]
    if not curve or not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
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
    if results.get("verdict"):
        lines.append(f"**{results['verdict']}**")
    elif initial is not None and distilled is not None:
        lines.append(f"TSD-KD changed the student's accuracy by **{100 * (distilled - initial):+.1f} points**.")
    if not results.get("teacher_margin_ok", True):
        lines.append(
            "Note: at this budget the teacher is not clearly better than the initial student, so the run "
            "tests the plumbing, not the method (use `--budget paper-like`)."
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
            + (f"; {selection_sentence(budget)}" if role == "student" and budget.get("student_selection") else "")
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


def _student_steps(budget: Mapping, selection: Mapping | None) -> str:
    steps = budget["student"]["n_train"] // budget["student"]["batch_size"] * budget["student"]["epochs"]
    if not budget.get("student_selection"):
        return f"{steps} SFT steps"
    chosen = (
        f"step {selection['chosen_step']}" if selection and "chosen_step" in selection else "a step (not chosen yet)"
    )
    return f"{chosen} of a {steps}-step SFT run ({selection_sentence(budget)})"


def selection_sentence(budget: Mapping) -> str:
    """How the budget (a dict, as results.json holds it) chose its initial student, in words."""
    return f"the initial student is {StudentSelection(**budget['student_selection']).describe()}"


def write_job_report(results: Mapping, run_dir: Path) -> dict[str, Path]:
    """report.md, accuracy.png, training.png (when logged) and results.json in run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(run_dir / "results.json", results)
    title = (
        f"TSD-KD toy job ({results['budget']['name']} budget, {results['options']['difficulty']}): greedy test accuracy"
    )
    plot = plot_job_accuracy(results["evaluations"], run_dir / "accuracy.png", title)
    curve = plot_training_curve(results.get("training_curve") or [], run_dir / "training.png", "TSD-KD training")
    markdown = write_text_atomic(run_dir / "report.md", job_markdown(results, plot.name, curve.name if curve else None))
    return {"markdown": markdown, "plot": plot, "json": json_path, "training_plot": curve}


# --------------------------------------------------------------------------- the comparison

_COLORS = {"baseline": "#8c8c8c", "tsdkd": "#1f77b4", "ablation": "#9ecae1", "remedy": "#2ca02c"}
# Per-step diagnostics plotted for the TSD-KD-family runs (logged with --tsdkd.diagnostics).
DIAGNOSTIC_PREFIX = "tsdkd/diag_"


def settings_text(settings: Mapping) -> str:
    """{"lr": 3e-05, "beta": 0.5} -> "lr 3e-05, beta 0.5" (tables, and the main job's sentence)."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def _ran_with(settings: Mapping, objective: Mapping) -> dict:
    """The settings a run really had: a remedy keeps its parent's tuned settings except where its own
    options override them (it runs at the paper's weights, methods.PAPER_WEIGHTS)."""
    return {key: objective.get(key, value) for key, value in settings.items()}


def summarize_test_runs(runs: Sequence[Mapping], reference_method: str) -> dict[str, dict]:
    """Per method: accuracies by seed, mean with 95% CI, and the per-seed difference against the
    reference method (same seeds) with its 95% CI."""
    from tsdkd_plugin.experiments.protocol import mean_ci, paired_difference

    by_method: dict[str, dict[int, Mapping]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    reference = {seed: r["evaluation"]["accuracy"] for seed, r in by_method.get(reference_method, {}).items()}
    summary = {}
    for method, seeds in by_method.items():
        accuracies = {seed: run["evaluation"]["accuracy"] for seed, run in sorted(seeds.items())}
        first = next(iter(seeds.values()))
        summary[method] = {
            "label": first.get("label", method),
            "group": first.get("group", ""),
            "settings": _ran_with(first["settings"], first.get("objective", {})),
            "extra_objective": first.get("extra_objective", {}),
            "accuracies": accuracies,
            **mean_ci(list(accuracies.values())),
            "difference": None if method == reference_method else paired_difference(accuracies, reference),
            "result_files": [seeds[s].get("result_file") for s in sorted(seeds)],
            "optimizer_steps": sorted({r.get("optimizer_steps") for r in seeds.values()}, key=lambda x: (x is None, x)),
            "seconds_mean": statistics.fmean(r.get("seconds", float("nan")) for r in seeds.values()),
        }
    return summary


def plot_test_accuracy(summary: Mapping[str, Mapping], references: Mapping[str, float], path: Path, title: str) -> Path:
    """One bar per method (mean over seeds, error bar = 95% CI), seeds as dots, references as lines."""
    plt = _pyplot()
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(methods) + 2), 4.6))
    for x, method in enumerate(methods):
        entry = summary[method]
        half = entry["half_width"] if not math.isnan(entry["half_width"]) else 0.0
        ax.bar(
            x,
            100 * entry["mean"],
            0.7,
            yerr=100 * half,
            capsize=4,
            color=_COLORS.get(entry["group"], "#1f77b4"),
            edgecolor="black",
            linewidth=0.5,
        )
        values = list(entry["accuracies"].values())
        ax.scatter([x] * len(values), [100 * a for a in values], s=10, color="black", zorder=3)
        ax.text(x, 100 * (entry["mean"] + half) + 1.0, f"{100 * entry['mean']:.1f}", ha="center", fontsize=7)
    for (name, value), style in zip(references.items(), ["--", ":", "-."], strict=False):
        ax.axhline(100 * value, linestyle=style, color="darkred", linewidth=1, label=f"{name} ({100 * value:.1f}%)")
    ax.set_xticks(range(len(methods)), [summary[m]["label"] for m in methods], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
    top = max(
        [100 * (e["mean"] + (0 if math.isnan(e["half_width"]) else e["half_width"])) for e in summary.values()]
        + [100 * v for v in references.values()]
        + [10]
    )
    ax.set_ylim(0, min(105, top + 10))
    ax.set_title(title, fontsize=10)
    if references:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_validation_curves(
    curves: Mapping[str, Sequence[Mapping]], initial: float | None, path: Path, title: str
) -> Path | None:
    """Validation accuracy against samples trained on, one line per method (its chosen settings)."""
    if not any(curves.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for method, curve in curves.items():
        points = [(0, initial)] if initial is not None else []
        points += [(p["samples"], p["accuracy"]) for p in curve]
        ax.plot([x for x, _ in points], [100 * y for _, y in points], marker="o", markersize=3, label=method)
    ax.set_xlabel("samples trained on")
    ax.set_ylabel("validation accuracy (%), greedy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_diagnostics(curves: Mapping[str, Sequence[Mapping]], path: Path, title: str) -> Path | None:
    """Every logged diagnostic (and sample accuracy) per rollout, one line per method."""
    keys = sorted({k for curve in curves.values() for point in curve for k in point if k.startswith(DIAGNOSTIC_PREFIX)})
    keys = ["reward", "tsdkd/entropy_student_mean"] + keys
    keys = [k for k in keys if any(k in p for curve in curves.values() for p in curve)]
    if not keys:
        return None
    plt = _pyplot()
    columns = 4
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for method, curve in curves.items():
            points = [(p["global_step"], p[key]) for p in curve if key in p]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], label=method, linewidth=1)
        ax.set_title("sample accuracy" if key == "reward" else key.replace("tsdkd/", ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _ci_text(entry: Mapping | None) -> str:
    if not entry:
        return "–"
    if math.isnan(entry["half_width"]):
        return f"{100 * entry['mean']:+.1f}"
    return f"{100 * entry['mean']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}]"


def paper_like_checks(refs: Mapping) -> list[tuple[bool, str]]:
    """(met, what) for each part of the paper-like regime's definition (issue 13): student at
    0.55-0.8 of the teacher's accuracy, teacher at >= 80%, >= 95% of the student's samples answered."""
    teacher, student = refs["teacher test greedy"]["accuracy"], refs["student test greedy"]["accuracy"]
    answered = refs.get("student val sampled", {}).get("answered", float("nan"))
    return [
        (0.55 <= student / teacher <= 0.8, f"student/teacher {student / teacher:.2f} in [0.55, 0.80]"),
        (teacher >= 0.8, f"teacher {100 * teacher:.1f}% >= 80%"),
        (answered >= 0.95, f"{100 * answered:.1f}% of the student's samples end in `#### n` (>= 95%)"),
    ]


def paper_like_check(refs: Mapping) -> str:
    """The paper-like definition's parts as one line of the report, each marked yes or **no**."""
    return (
        "Paper-like regime's definition: "
        + "; ".join(f"{text} {'yes' if ok else '**no**'}" for ok, text in paper_like_checks(refs))
        + "."
    )


def remedies_markdown(remedies: Mapping[str, Mapping], data: Mapping) -> list[str]:
    """The remedies' validation trials: each against its parent's chosen validation accuracy."""
    docs = data["methods_doc"]
    parents = sorted({r["parent"] for r in remedies.values()})
    lines = [
        "### Remedies on the validation split (opt-in objective options, deviations from the paper)",
        "",
        "Each is one more validation trial of "
        + ", ".join(docs.get(p, {}).get("label", p) for p in parents)
        + f" ({len(remedies)} in all), at its chosen learning rate and settings with the remedy's options "
        "on top (the paper's weights among them); a remedy runs on test only if it beats that method's "
        "chosen validation accuracy.",
        "",
        "| remedy | option | settings | val accuracy | parent's chosen val accuracy | on test |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in remedies.items():
        doc = docs.get(name, {})
        option = " ".join(f"--tsdkd.{key} {value}" for key, value in doc.get("objective", {}).items())
        accuracy = "failed" if entry["failed"] else _pct(entry["val_accuracy"])
        ran_with = settings_text(_ran_with(entry["settings"], doc.get("objective", {})))
        lines.append(
            f"| {doc.get('label', name)} | `{option}` | {ran_with} | {accuracy} | "
            f"{_pct(entry['parent_val_accuracy'])} | {'yes' if entry['to_test'] else 'no'} |"
        )
    return [*lines, ""]


def regime_markdown(
    name: str, regime: Mapping, summary: Mapping[str, Mapping], data: Mapping, plots: Mapping[str, Path | None]
) -> list[str]:
    budget = regime["budget"]
    d = budget["distill"]
    refs = regime.get("references", {})
    lines = [f"## Regime: {name}", "", f"{regime['doc'][:1].upper()}{regime['doc'][1:]}.", ""]
    if refs:
        lines += [
            "| model | val (greedy) | test (greedy) | val, one sample at T=1 | samples with a `#### n` answer |",
            "|---|---|---|---|---|",
        ]
        for role, label in (("teacher", "teacher"), ("student", "initial student")):

            def acc(key):
                return _pct(refs.get(key, {}).get("accuracy"))

            lines.append(
                f"| {label} | {acc(f'{role} val greedy')} | {acc(f'{role} test greedy')} | "
                f"{acc(f'{role} val sampled')} | {_pct(refs.get(f'{role} val sampled', {}).get('answered'))} |"
            )
        teacher, student = refs.get("teacher test greedy"), refs.get("student test greedy")
        if teacher and student and teacher["accuracy"]:
            lines += ["", f"Initial student / teacher on test: **{student['accuracy'] / teacher['accuracy']:.2f}**."]
            if name == "paper-like":
                lines.append(paper_like_check(refs))
    sequences, teacher_sft = d["n_prompts"] * d["samples_per_prompt"], budget["teacher"]
    teacher_steps = teacher_sft["n_train"] // teacher_sft["batch_size"] * teacher_sft["epochs"]
    lines += [
        "",
        f"Budget of every method: {d['n_prompts']} train prompts x {d['samples_per_prompt']} samples = "
        f"{sequences} sequences, {sequences // d['train_batch_size']} "
        f"optimizer steps of {d['train_batch_size']}, constant learning rate after a {d['warmup_ratio']:.0%} warm-up. "
        f"Teacher: {teacher_sft['model']}, {teacher_steps} "
        f"SFT steps; student: {budget['student']['model']}, {_student_steps(budget, regime.get('student_selection'))}; "
        f"difficulty {budget['difficulty']}; validation {budget['n_val']}, test {budget['n_test']} problems.",
        "",
    ]
    tuning = regime.get("tuning", {})
    if tuning:
        grid_trials = data.get("grid_trials")
        own_grid = (
            "the method's own grid at the best one"
            if grid_trials is None
            else "none of the method's own grid"
            if grid_trials == 0
            else f"the first {grid_trials} entries of the method's own grid at the best one"
        )
        what = {
            "full": f"the learning rate, then {own_grid}",
            "lr": f"the learning rate only, the rate chosen in the {regime['inherit_from']} regime and the grid's "
            "rates next to it; other settings as chosen there",
        }[regime["tune"]]
        lines += [
            f"### Tuning on the validation split (seed {data['tuning_seed']}; {what})",
            "",
            "| method | trials | chosen | val accuracy | every trial |",
            "|---|---|---|---|---|",
        ]
        for method, entry in tuning.items():
            label = data["methods_doc"].get(method, {}).get("label", method)
            trials = "; ".join(
                f"{settings_text(t['settings'])}: {'failed' if t['failed'] else _pct(t['val_accuracy'])}"
                for t in entry["trials"]
            )
            lines.append(
                f"| {label} | {len(entry['trials'])} | {settings_text(entry['chosen'])} | "
                f"{_pct(entry['chosen_val_accuracy'])} | {trials} |"
            )
        lines.append("")
    remedies = regime.get("remedies", {})
    if remedies:
        lines += remedies_markdown(remedies, data)
    if plots.get("curves"):
        lines += [
            "Validation accuracy during each method's chosen tuning run (is the budget long enough?):",
            "",
            f"![validation curves]({plots['curves'].name})",
            "",
        ]
    if summary:
        n_seeds = max(len(e["accuracies"]) for e in summary.values())
        ref = data["reference_method"]
        lines += [
            f"### Test split ({n_seeds} seeds, greedy)",
            "",
            f"| method | settings | accuracy, mean [95% CI] | per seed | difference vs {ref}, mean [95% CI] | "
            "per-seed difference | optimizer steps | s / run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for entry in summary.values():
            per_seed = ", ".join(f"{100 * a:.1f}" for a in entry["accuracies"].values())
            diff = entry["difference"]
            per_diff = ", ".join(f"{100 * v:+.1f}" for v in diff["per_seed"].values()) if diff else "–"
            ci = (
                f"**{100 * entry['mean']:.1f}** [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"
                if not math.isnan(entry["half_width"])
                else f"**{100 * entry['mean']:.1f}**"
            )
            steps = "/".join(str(s) for s in entry["optimizer_steps"])
            lines.append(
                f"| {entry['label']} | {settings_text(entry['settings'])} | {ci} | {per_seed} | "
                f"{_ci_text(diff)} | {per_diff} | {steps} | {entry['seconds_mean']:.0f} |"
            )
        lines += ["", f"![test accuracy]({plots['test'].name})", ""]
    if plots.get("diagnostics"):
        lines += ["### Diagnostics (seed 0, per rollout)", "", f"![diagnostics]({plots['diagnostics'].name})", ""]
    return lines


def compute_markdown(data: Mapping) -> list[str]:
    """What the runs this report counts cost: per regime, the validation runs (tuning and remedies)
    and test runs of the report's methods, each run's own recorded wall time (training and
    evaluation) summed. The regime's tuning runs of other methods are on disk but not counted."""
    rows, total_runs, total_seconds = [], 0, 0.0
    for name, regime in data["regimes"].items():
        tuning = [run for run in regime.get("tuning_runs", []) if run["method"] in data["methods_doc"]]
        test = regime["test_runs"]
        seconds = sum(run.get("seconds", 0.0) for run in [*tuning, *test])
        total_runs, total_seconds = total_runs + len(tuning) + len(test), total_seconds + seconds
        rows.append(f"| {name} | {len(tuning)} | {len(test)} | {seconds / 3600:.2f} |")
    if not rows:
        return []
    return [
        "## Compute: the runs this report counts",
        "",
        "| regime | validation runs | test runs | recorded hours |",
        "|---|---|---|---|",
        *rows,
        f"| all | {total_runs} runs | | {total_seconds / 3600:.2f} |",
        "",
        "Each run's own wall time as its result file records it (training and evaluation; not the building of "
        "teacher and student, nor earlier runs at superseded settings). A run made while other jobs shared "
        "the machine (another run beside it with --jobs 2, too), or before a later speed-up, is counted at the "
        "time it took then.",
        "",
        *invocations_markdown(data.get("invocations", [])),
    ]


def invocations_markdown(invocations: Sequence[Mapping]) -> list[str]:
    """The comparison's own wall time: its recorded invocations on this run directory (each from its
    start to its last heartbeat or its end), summed; teacher and student builds included."""
    if not invocations:
        return []
    hours = sum(max(0.0, i["updated"] - i["started"]) for i in invocations) / 3600
    jobs = sorted({i.get("jobs", 1) for i in invocations})
    outcomes = Counter(i.get("outcome", "?").split(":")[0] for i in invocations)
    restored = sum(1 for i in invocations if i.get("restored_from"))
    building = [i["phases"][BUILD_PHASE] for i in invocations if BUILD_PHASE in i.get("phases", {})]
    lines = [
        f"Wall time of the comparison itself: **{hours:.2f} h** over {len(invocations)} recorded invocation"
        f"{'s' if len(invocations) != 1 else ''} on this run directory (--jobs {', '.join(map(str, jobs))}; "
        + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
        + "), from each one's start to its end or last heartbeat, building teacher and students included; "
        "runs made before invocations were recorded are not in it."
        + (
            f" {restored} of them ran on an earlier machine of a resumed comparison (--restore-from): each "
            "machine built the teacher and students again, so the sum counts those builds once per machine."
            if restored
            else ""
        )
        + (
            f" Building teacher and students and measuring their reference accuracies took "
            f"{sum(building) / 3600:.2f} h of it"
            + (
                f" in the {len(building)} invocations that recorded it (invocations before stop 26 did not)."
                if len(building) < len(invocations)
                else "."
            )
            if building
            else ""
        ),
        "",
        "| started (UTC) | hours | of which building | --jobs | outcome | machine | restored from |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in invocations:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(i["started"]))
        built = i.get("phases", {}).get(BUILD_PHASE)
        lines.append(
            f"| {started} | {max(0.0, i['updated'] - i['started']) / 3600:.2f} | "
            f"{'' if built is None else f'{built / 3600:.2f}'} | {i.get('jobs', 1)} | "
            f"{i.get('outcome', '?')} | {i.get('hardware', '?')} | {i.get('restored_from') or ''} |"
        )
    return [*lines, ""]


def write_comparison_report(data: Mapping, out_dir: Path, stem: str = "comparison") -> dict[str, Path]:
    """<stem>.md and <stem>.json, and per regime <stem>-<regime>.png (test accuracy),
    <stem>-<regime>-curves.png (validation curves), <stem>-<regime>-diagnostics.png, in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Does TSD-KD work? Toy-scale comparison",
        "",
        f"Command: `{' '.join(data['command'])}`  ",
        f"Machine: {_machine_line(data['machine'])}  ",
        f"Test seeds: {', '.join(str(s) for s in data['seeds'])}; learning-rate grid: "
        f"{', '.join(f'{lr:g}' for lr in data['lr_grid'])}.",
        "",
    ]
    summaries = {}
    written: dict[str, Path] = {}
    for name, regime in data["regimes"].items():
        summary = summarize_test_runs(regime["test_runs"], data["reference_method"])
        order = [m for m in data["methods_doc"] if m in summary]
        summary = {m: summary[m] for m in order}
        summaries[name] = summary
        refs = regime.get("references", {})
        ref_lines = {
            label: refs[key]["accuracy"]
            for label, key in (("teacher", "teacher test greedy"), ("initial student", "student test greedy"))
            if key in refs
        }
        plots: dict[str, Path | None] = {}
        if summary:
            plots["test"] = plot_test_accuracy(
                summary, ref_lines, out_dir / f"{stem}-{name}.png", f"{name} regime: greedy test accuracy"
            )
        curves = {}
        for run in regime.get("tuning_runs", []):
            chosen = regime.get("tuning", {}).get(run["method"], {}).get("chosen")
            if chosen == run["settings"] and run.get("validation_curve"):
                curves[data["methods_doc"].get(run["method"], {}).get("label", run["method"])] = run[
                    "validation_curve"
                ] + [{"samples": run["samples_trained"], "accuracy": run["evaluation"]["accuracy"]}]
        initial = refs.get("student val greedy", {}).get("accuracy")
        plots["curves"] = plot_validation_curves(
            curves,
            initial,
            out_dir / f"{stem}-{name}-curves.png",
            f"{name} regime: validation accuracy of the chosen settings",
        )
        diag_curves = {
            summary[m]["label"]: run.get("training_curve", [])
            for m in summary
            for run in regime["test_runs"]
            if run["method"] == m and run["seed"] == min(data["seeds"]) and _logged_tsdkd_terms(run)
        }
        plots["diagnostics"] = plot_diagnostics(
            diag_curves,
            out_dir / f"{stem}-{name}-diagnostics.png",
            f"{name} regime: per-rollout diagnostics, seed {min(data['seeds'])}",
        )
        written.update({f"{name} {k}": v for k, v in plots.items() if v})
        lines += regime_markdown(name, regime, summary, data, plots)
        failed = regime.get("failed") or []
        if failed:
            lines += (
                ["### Runs that failed", ""]
                + [
                    f"- {f['method']} {settings_text(f['settings'])} seed {f['seed']}: {f['error'].splitlines()[0]}"
                    for f in failed
                ]
                + [""]
            )
        if regime.get("missing"):
            lines += ["### Test runs not made yet", "", ", ".join(regime["missing"]), ""]
        superseded = regime.get("superseded_test_runs") or []
        if superseded:
            lines += [
                f"{len(superseded)} earlier test runs at settings a method no longer has (tuning went on after "
                "they ran), or of methods this regime no longer tests, are kept on disk and left out of these tables.",
                "",
            ]
        if regime.get("unused_tuning_runs"):
            lines += [
                f"{regime['unused_tuning_runs']} validation runs on disk are not trials of this protocol (an earlier, "
                "longer grid) and are left out of these tables and of the compute below.",
                "",
            ]
    lines += compute_markdown(data)
    lines += ["## Methods", ""] + [
        f"- **{m['label']}** (`{name}`): {m['doc']}" for name, m in data["methods_doc"].items()
    ]
    lines.append("")
    json_data = {**data, "summaries": summaries}
    written["json"] = write_json_atomic(out_dir / f"{stem}.json", json_data)
    written["markdown"] = write_text_atomic(out_dir / f"{stem}.md", "\n".join(lines))
    return written


def _logged_tsdkd_terms(run: Mapping) -> bool:
    """Runs of train_tsdkd log the TSD-KD terms (and the diagnostics, when on)."""
    return any(k.startswith("tsdkd/") for point in run.get("training_curve", [])[:1] for k in point)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m tsdkd_plugin.experiments.report RESULTS.json (a job's results.json or a comparison.json)",
            file=sys.stderr,
        )
        return 2
    path = Path(args[0])
    data = json.loads(path.read_text(encoding="utf-8"))
    if "regimes" in data:
        written = write_comparison_report(data, path.parent, path.stem)
    else:
        written = write_job_report(data, path.parent)
    for kind, where in written.items():
        if where:
            print(f"{kind}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
