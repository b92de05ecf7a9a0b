"""TSD-KD against baselines and its own ablations, at equal budget, over several seeds.

    python -m tsdkd_plugin.experiments.compare --seeds 3 [--methods all] [--run-dir runs/compare]
                                               [--out benchmarks/toy_results] [--budget default] [--difficulty easy]

Every method starts from the same initial student (the main job's cached `train_sft` student),
sees the same train prompts, gets the same number of sampled responses and the same number of
optimizer steps of the same size (see `budgets.DistillBudget`); only the training signal differs
(the methods are listed in `tsdkd_plugin.experiments.methods`).

Each finished run is stored as <run-dir>/results/<method>-seed<k>.json, so an interrupted
comparison resumes where it stopped; the report (markdown table, PNG with error bars, JSON, with
the command and machine) is rewritten in --out after every run. A failed run is recorded and the
comparison goes on; the report lists it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

from tsdkd_plugin.experiments.budgets import Budget, write_task_data
from tsdkd_plugin.experiments.evaluate import evaluate_model, format_result_line, load_prompt_rows
from tsdkd_plugin.experiments.methods import METHOD_GROUPS, METHODS, RunContext, parse_methods, run_method
from tsdkd_plugin.experiments.options import add_common_arguments, cache_dir_of, resolve_budget
from tsdkd_plugin.experiments.runner import JobError, banner, machine_info, run_entry_point, write_json_atomic
from tsdkd_plugin.experiments.trained_models import trained_model_dir

PROG = "python -m tsdkd_plugin.experiments.compare"


def budget_shortfall(run: Mapping) -> str | None:
    """Why a finished on-policy run is not an equal-budget result (its TensorBoard events hold fewer
    rollouts or samples than planned), or None. Such a run is redone."""
    for what in ("rollouts", "samples"):
        planned, taken = run.get(f"{what}_planned"), run.get(what)
        if planned is not None and taken is not None and planned != taken:
            return f"it logged {taken} of its {planned} {what}"
    return None


def load_finished_runs(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if not p.name.endswith(".failed.json")]


def write_report(options, budget: Budget, references: Mapping, results_dir: Path, methods: Sequence[str],
                 wall_seconds: float) -> dict:
    from tsdkd_plugin.experiments.report import write_comparison_report

    finished = [r for r in load_finished_runs(results_dir) if r["method"] in methods and r["seed"] in options.seed_list]
    # Only runs that got the whole budget are results; the others are listed with the reason.
    shortfall = {(r["method"], r["seed"]): budget_shortfall(r) for r in finished}
    runs = [r for r in finished if not shortfall[(r["method"], r["seed"])]]
    done = {(r["method"], r["seed"]) for r in runs}
    missing = []
    for seed in options.seed_list:
        for method in methods:
            if (method, seed) in done:
                continue
            failed = results_dir / f"{method}-seed{seed}.failed.json"
            if shortfall.get((method, seed)):
                why = f"left out: {shortfall[(method, seed)]}"
            elif failed.is_file():
                why = json.loads(failed.read_text())["error"].splitlines()[0]
            else:
                why = "not run yet"
            missing.append(f"{method} seed {seed}: {why}")
    comparison = {
        # The command that trains and reports; --report-only only rewrites its output.
        "command": [PROG, *(a for a in options.argv if a != "--report-only")],
        "machine": machine_info(),
        "difficulty": options.difficulty,
        "seeds": options.seed_list,
        "n_test": budget.n_test,
        "budget": asdict(budget),
        "references": references,
        "method_order": list(methods),
        "methods_doc": [(METHODS[m].label, METHODS[m].doc) for m in methods],
        "runs": runs,
        "missing": missing,
        "wall_seconds": wall_seconds,
    }
    return write_comparison_report(comparison, Path(options.out))


def run_comparison(options: argparse.Namespace) -> int:
    started = time.time()
    if options.seeds < 1:
        raise JobError(f"--seeds must be at least 1, got {options.seeds}")
    methods = parse_methods(options.methods)
    budget = resolve_budget(options)
    options.seed_list = list(range(options.first_seed, options.first_seed + options.seeds))

    run_dir = Path(options.run_dir).resolve()
    results_dir = run_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir_of(options)
    d = budget.distill
    banner(f"comparison: {len(methods)} methods x {options.seeds} seeds, budget {budget.name}, {options.difficulty}")
    print(f"  every method: {d.n_prompts} prompts, {d.num_samples} samples, {d.optimizer_steps} optimizer steps "
          f"of {d.train_batch_size} sequences, lr {d.lr}")

    files = write_task_data(run_dir / "data", options.difficulty, d.n_prompts, budget.n_val, budget.n_test)
    models = {}
    for role, recipe in (("teacher", budget.teacher), ("student", budget.student)):
        models[role], built = trained_model_dir(recipe, options.difficulty, cache_dir, work_dir=run_dir / "logs",
                                                timeout_s=budget.stage_timeout_s, verbose=options.verbose)
        print(f"  {role}: {models[role]} ({'trained now' if built else 'reused from the cache'})")

    references_file = run_dir / "references.json"
    references = json.loads(references_file.read_text()) if references_file.is_file() else {}
    for name, role in (("teacher", "teacher"), ("initial student", "student")):
        if name not in references:
            result = evaluate_model(models[role], files["prompts_test"], max_new_tokens=d.max_new_tokens,
                                    batch_size=budget.eval_batch_size, desc=f"evaluating {name}")
            references[name] = result.accuracy
            write_json_atomic(references_file, references)
        print(f"  {name}: {references[name]:.1%} on the test split")
    if options.report_only:
        written = write_report(options, budget, references, results_dir, methods, 0.0)
        print(f"  report: {written['markdown']}")
        return 0

    ctx = RunContext(budget=budget, teacher_dir=models["teacher"], student_dir=models["student"],
                     prompts_file=files["prompts_train"], prompt_rows=load_prompt_rows(files["prompts_train"]),
                     runs_dir=run_dir / "runs", timeout_s=options.run_timeout or budget.stage_timeout_s,
                     verbose=options.verbose)
    total = len(methods) * options.seeds
    position = 0
    for seed in options.seed_list:
        for name in methods:
            position += 1
            result_file = results_dir / f"{name}-seed{seed}.json"
            failed_file = results_dir / f"{name}-seed{seed}.failed.json"
            if result_file.is_file():
                stale = budget_shortfall(json.loads(result_file.read_text()))
                if not stale:
                    continue
                print(f"  redoing {name} seed {seed}: {stale}")
            banner(f"[{position}/{total}] {METHODS[name].label} ({name}), seed {seed}")
            run_started = time.time()
            load_at_start = machine_info()["load_average_1_5_15"]
            try:
                model_dir, command_result, notes = run_method(METHODS[name], seed, ctx)
                evaluation = evaluate_model(model_dir, files["prompts_test"], max_new_tokens=d.max_new_tokens,
                                            batch_size=budget.eval_batch_size, desc=f"evaluating {name}")
            except JobError as error:
                print(f"  FAILED: {str(error).splitlines()[0]}", file=sys.stderr)
                write_json_atomic(failed_file, {"method": name, "seed": seed, "error": str(error)})
                continue
            print("  " + format_result_line(name, evaluation))
            failed_file.unlink(missing_ok=True)
            write_json_atomic(result_file, {
                "method": name, "label": METHODS[name].label, "group": METHODS[name].group, "seed": seed,
                "objective": dict(METHODS[name].objective), "evaluation": evaluation.to_dict(),
                "seconds": time.time() - run_started, "train_seconds": command_result.seconds,
                "command": command_result.command,
                "model_dir": str(model_dir), "load_average_at_start": load_at_start, **notes,
            })
            write_report(options, budget, references, results_dir, methods, time.time() - started)
    written = write_report(options, budget, references, results_dir, methods, time.time() - started)
    banner("comparison written")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    # The table, as in the markdown report.
    print("\n".join(line for line in Path(written["markdown"]).read_text().splitlines() if line.startswith("|")))
    return 0


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_run_dir="runs/compare")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated: {', '.join(METHODS)}; or {', '.join(METHOD_GROUPS)} (default all)")
    parser.add_argument("--out", default="benchmarks/toy_results", help="where the report goes")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is stopped")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(PROG, build_arg_parser().parse_args, run_comparison, argv,
                           interrupted="interrupted; finished runs are kept and a rerun resumes.")


if __name__ == "__main__":
    sys.exit(main())
