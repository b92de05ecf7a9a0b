"""The comparison's machinery: regimes, one run and its result file, tuning, the test seeds, and
what the report is made of. `python -m tsdkd_plugin.experiments.compare` is its entry point (the
protocol itself is described there and in `protocol`).

Every finished run is a JSON file under <run-dir>/<regime>/results/<stage>/<method>/ (what it ran,
what it logged, its evaluation); a failed run leaves a .failed.json instead and the comparison goes
on. `collect` reads only those files, so a report can be rewritten at any time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tsdkd_plugin.experiments.budgets import BUDGETS, Budget, check_budget, write_task_data
from tsdkd_plugin.experiments.evaluate import evaluate_model, format_result_line, load_prompt_rows
from tsdkd_plugin.experiments.methods import METHODS, TUNED_METHODS, RunContext, run_method
from tsdkd_plugin.experiments.options import cache_dir_of
from tsdkd_plugin.experiments.protocol import LR_GRID, TUNING_SEED, best_trial
from tsdkd_plugin.experiments.run_pool import RunPool
from tsdkd_plugin.experiments.runner import (
    BUILD_PHASE,
    JobError,
    banner,
    hardware_kind,
    machine_info,
    write_json_atomic,
)
from tsdkd_plugin.experiments.trained_models import build_teacher_and_student, describe_choice, initial_student

REFERENCE_METHOD = "gkd"  # what the per-seed differences are taken against
CHECKPOINTS_PER_TUNING_RUN = 4


@dataclass(frozen=True)
class Regime:
    """A budget and how much of the protocol runs in it."""

    name: str
    budget: str  # key of budgets.BUDGETS
    # "full": LR grid then each method's grid; "lr": LR grid only, the rest from `inherit_from`
    tune: str
    inherit_from: str | None = None
    ablations: bool = True
    doc: str = ""
    # Evaluated copies along each validation run (its curve in the report).
    curve_points: int = CHECKPOINTS_PER_TUNING_RUN
    # The tuned methods whose chosen settings run on the test split here (None: every tuned method);
    # the ablations and remedies of a tested method follow it.
    tested: tuple[str, ...] | None = None

    def tests(self, method_name: str) -> bool:
        return self.tested is None or method_name in self.tested


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime(
            "paper-like",
            "paper-like",
            "full",
            ablations=True,
            # GKD: every paired difference is taken against it; the paper preset: its ablations' parent.
            tested=(REFERENCE_METHOD, "tsdkd-paper"),
            doc="the student starts at 0.55-0.8 of its teacher's accuracy (the paper's Qwen2.5-1.5B starts at "
            "0.71 of its 14B teacher's on GSM8K), the teacher is above 80%; at 32 optimizer steps every method "
            "is tuned here (the other regimes take its choices), and the test split gets GKD, the paper preset "
            "and the paper preset's ablations and remedies (every method is tested at 96 steps, paper-like-long)",
        ),
        Regime(
            "weak-student",
            "weak-student",
            "lr",
            inherit_from="paper-like",
            ablations=False,
            doc="the earlier default: a 0.16M-parameter student far below its teacher, most of its own samples "
            "wrong; the learning rate tuned again (the paper-like choice and the grid's rates next to it)",
        ),
        Regime(
            "paper-like-long",
            "paper-like-long",
            "lr",
            inherit_from="paper-like",
            ablations=False,
            curve_points=12,
            doc="the paper-like regime with 3x the distillation budget (96 optimizer steps, where the best "
            "baseline's validation accuracy flattens), the learning rate tuned again at this budget (the "
            "paper-like choice and the grid's rates next to it)",
        ),
    )
}


def settings_key(settings: Mapping[str, object]) -> str:
    """A file-name-safe, stable name for a settings dict, e.g. "lr=0.0001,beta=0.5"."""
    parts = []
    for name in sorted(settings, key=lambda k: (k != "lr", k)):
        value = settings[name]
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ",".join(parts)


@dataclass
class RegimeState:
    """Where one regime's files are and what has been decided so far."""

    regime: Regime
    budget: Budget
    root: Path
    files: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)

    def result_file(self, stage: str, method: str, name: str) -> Path:
        return self.root / "results" / stage / method / f"{name}.json"

    def stage_dir(self, stage: str, method: str, name: str) -> Path:
        return self.root / "runs" / stage / method / name


# --------------------------------------------------------------------------- one run


def run_and_evaluate(
    state: RegimeState,
    ctx: RunContext,
    stage: str,
    method_name: str,
    settings: Mapping,
    seed: int,
    split: str,
    *,
    checkpoints: int = 0,
    extra_objective: Mapping | None = None,
) -> dict | None:
    """The result dict of one run, from its file when it finished before; None when it failed
    (recorded in a .failed.json next to where its result would be, the comparison goes on)."""
    method = METHODS[method_name]
    name = f"{settings_key(settings)}--seed{seed}"
    result_file = state.result_file(stage, method_name, name)
    failed_file = result_file.with_suffix(".failed.json")
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if failed_file.is_file():
        return None
    banner(f"[{state.regime.name} / {stage}] {method.label}: {settings_key(settings)}, seed {seed}")
    stage_dir = state.stage_dir(stage, method_name, name)
    d = state.budget.distill
    started = time.time()
    load_at_start = machine_info()["load_average_1_5_15"]
    try:
        model_dir, command_result, notes = run_method(
            method, settings, seed, ctx, stage_dir, checkpoints=checkpoints, extra_objective=extra_objective
        )
        evaluation = evaluate_model(
            model_dir,
            state.files[f"prompts_{split}"],
            max_new_tokens=d.max_new_tokens,
            batch_size=state.budget.eval_batch_size,
            desc=f"evaluating on {split}",
        )
        curve = []
        for samples, checkpoint in sorted(notes.pop("checkpoints", {}).items()):
            point = evaluate_model(
                checkpoint,
                state.files[f"prompts_{split}"],
                max_new_tokens=d.max_new_tokens,
                batch_size=state.budget.eval_batch_size,
                desc=f"checkpoint at {samples} samples",
            )
            curve.append({"samples": samples, "accuracy": point.accuracy, "answered": point.answered / point.n})
            shutil.rmtree(checkpoint)  # its accuracy is all that is kept
    except JobError as error:
        print(f"  FAILED: {str(error).splitlines()[0]}", file=sys.stderr)
        write_json_atomic(
            failed_file, {"method": method_name, "settings": dict(settings), "seed": seed, "error": str(error)}
        )
        return None
    print("  " + format_result_line(f"{method_name} ({split})", evaluation))
    shutil.rmtree(stage_dir / "ds-ckpt", ignore_errors=True)
    result = {
        "regime": state.regime.name,
        "stage": stage,
        "method": method_name,
        "label": method.label,
        "group": method.group,
        "settings": dict(settings),
        "seed": seed,
        "split": split,
        "objective": method.objective_for(settings) if method.runner == "tsdkd" else {},
        "extra_objective": dict(extra_objective or {}),
        "evaluation": evaluation.to_dict(),
        "validation_curve": curve,
        "seconds": time.time() - started,
        "train_seconds": command_result.seconds,
        "command": command_result.command,
        "model_dir": str(model_dir),
        "log": command_result.log,
        "load_average_at_start": load_at_start,
        **notes,
    }
    write_json_atomic(result_file, result)
    return result


def budget_shortfall(run: Mapping) -> str | None:
    """Why a finished on-policy run is not an equal-budget result (its TensorBoard events hold fewer
    rollouts or samples than planned), or None."""
    for what in ("rollouts", "samples"):
        planned, taken = run.get(f"{what}_planned"), run.get(what)
        if planned is not None and taken is not None and planned != taken:
            return f"it logged {taken} of its {planned} {what}"
    return None


# --------------------------------------------------------------------------- the protocol


# Learning rates a method is tried at in an "lr" regime: the one chosen where its settings come
# from and the grid's rates next to it, the same count for every method.
INHERITED_LR_TRIALS = 3


def lr_window(lr_grid: Sequence[float], centre: float, size: int = INHERITED_LR_TRIALS) -> list[float]:
    """The `size` neighbouring rates of the sorted grid around the one nearest `centre` (in log
    scale), moved inwards at the grid's ends so that every method gets `size` trials; the whole
    grid when it has no more."""
    grid = sorted(lr_grid)
    if len(grid) <= size:
        return grid
    nearest = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / centre)))
    start = min(max(nearest - size // 2, 0), len(grid) - size)
    return grid[start : start + size]


def tuning_trials(
    state: RegimeState, method_name: str, chosen: Mapping[str, dict], lr_grid: Sequence[float] = LR_GRID
) -> list[dict]:
    """The learning-rate trials of a method on validation, in order: the grid with the method's
    defaults, or in an "lr" regime the rates of the grid around the one chosen in the regime it
    inherits from (`lr_window`), with the other settings chosen there."""
    if state.regime.tune == "lr":
        inherited = chosen.get(method_name, {})
        knobs = {k: v for k, v in inherited.items() if k != "lr"}
        rates = lr_window(lr_grid, inherited["lr"]) if "lr" in inherited else list(lr_grid)
        return [{"lr": lr, **knobs} for lr in rates]
    return [{"lr": lr} for lr in lr_grid]  # then the method's grid at the best lr (tune_method)


def tune_method(
    state: RegimeState,
    ctx: RunContext,
    method_name: str,
    inherited: Mapping[str, dict],
    grid_trials: int | None = None,
    lr_grid: Sequence[float] = LR_GRID,
    pool: RunPool | None = None,
) -> dict:
    """{"trials": [...], "chosen": settings} for one method on the validation split: the learning-rate
    grid, the method's own grid at the best rate, and when that moved the choice, the neighbouring
    rates at the new settings (protocol.py). `grid_trials` keeps only the first entries of the
    method's own grid and `lr_grid` replaces the learning-rate grid, the same for every method, so
    that none is tuned more than its rivals; None keeps the whole grid. Each trial depends on the ones
    before it, so one method's trials run one after another (`pool` runs them)."""
    method = METHODS[method_name]
    pool = pool or RunPool()
    trials = []

    def trial(settings):
        result = pool.call(
            run_and_evaluate,
            state,
            ctx,
            "tune",
            method_name,
            settings,
            TUNING_SEED,
            "val",
            checkpoints=state.regime.curve_points,
        )
        accuracy = result["evaluation"]["accuracy"] if result and not budget_shortfall(result) else float("-inf")
        trials.append({"settings": dict(settings), "val_accuracy": accuracy, "failed": result is None})
        return accuracy

    def best():
        return best_trial([(t["settings"], t["val_accuracy"]) for t in trials])

    for settings in tuning_trials(state, method_name, inherited, lr_grid):
        trial(settings)
    if state.regime.tune == "full":
        best_lr = best()[0]["lr"]
        for overrides in method.grid[:grid_trials]:
            trial({"lr": best_lr, **overrides})
        # When the method's own grid moved its choice, the learning rate once more at the new
        # settings: the grid's rates next to the chosen one (weights 100x smaller can move the best
        # rate). The same rule for every method; the report counts the trials.
        chosen = dict(best()[0])
        if set(chosen) != {"lr"}:
            index = list(lr_grid).index(chosen["lr"])
            for neighbour in (index - 1, index + 1):
                if 0 <= neighbour < len(lr_grid):
                    trial({**chosen, "lr": lr_grid[neighbour]})
    chosen, accuracy = best()
    return {"trials": trials, "chosen": chosen, "chosen_val_accuracy": accuracy}


def try_remedy(
    state: RegimeState, ctx: RunContext, method_name: str, parent: Mapping, pool: RunPool | None = None
) -> dict:
    """A remedy on the validation split (tuning seed) at its parent's chosen settings. It goes to the
    test split only when it beats the parent's chosen validation accuracy: a remedy is never chosen
    on test. Each remedy is one more validation trial of its parent (the report counts them)."""
    result = (pool or RunPool()).call(
        run_and_evaluate,
        state,
        ctx,
        "tune",
        method_name,
        parent["chosen"],
        TUNING_SEED,
        "val",
        checkpoints=state.regime.curve_points,
    )
    accuracy = result["evaluation"]["accuracy"] if result and not budget_shortfall(result) else None
    return {
        "parent": METHODS[method_name].derived_from,
        "settings": dict(parent["chosen"]),
        "val_accuracy": accuracy,
        "parent_val_accuracy": parent["chosen_val_accuracy"],
        "failed": result is None,
        "to_test": accuracy is not None and accuracy > parent["chosen_val_accuracy"],
    }


def remedies_file(regime_root: Path) -> Path:
    return regime_root / "remedies.json"


_RECORD_LOCK = threading.Lock()  # methods tuned side by side record their choices one at a time


def update_json_record(path: Path, entries: Mapping) -> None:
    """Write `entries` (per method) into the JSON object at `path`, keeping the entries of methods
    this invocation did not run: a comparison extended one method at a time keeps every method's
    choice (the report and the long regime read them from here)."""
    with _RECORD_LOCK:
        recorded = json.loads(path.read_text()) if path.is_file() else {}
        write_json_atomic(path, {**recorded, **entries})


def goes_to_test(method_name: str, regime: Regime, tuning: Mapping, remedies: Mapping) -> bool:
    """Whether a derived method runs on the test split: an ablation in a regime with ablations, a
    remedy that beat its parent on validation."""
    method = METHODS[method_name]
    if not method.derived_from or method.derived_from not in tuning or not regime.tests(method.derived_from):
        return False
    if method.group == "remedy":
        return bool(remedies.get(method_name, {}).get("to_test"))
    return regime.ablations


# How the regime chose its initial student among its SFT run's checkpoints (budgets.StudentSelection).
SELECTION_FILE = "student_selection.json"


def chosen_settings_file(run_dir: Path, regime: str) -> Path:
    return run_dir / regime / "chosen.json"


def prepare_regime(regime: Regime, options: argparse.Namespace) -> RegimeState:
    """Task files, teacher and initial student (cached), and their reference accuracies."""
    budget = BUDGETS[regime.budget]
    check_budget(budget)
    root = Path(options.run_dir).resolve() / regime.name
    state = RegimeState(regime=regime, budget=budget, root=root)
    d = budget.distill
    state.files = write_task_data(root / "data", budget.difficulty, d.n_prompts, budget.n_val, budget.n_test)
    cache_dir = cache_dir_of(options)
    selection_record = root / SELECTION_FILE
    built_models = build_teacher_and_student(
        budget,
        budget.difficulty,
        cache_dir,
        root / "logs",
        verbose=options.verbose,
        prompts_val=state.files["prompts_val"],
        selection_record=selection_record,
    )
    for role, (path, built, _) in built_models.items():
        state.models[role] = path
        print(f"  {role}: {path} ({'trained now' if built else 'reused from the cache'})")
    references_file = root / "references.json"
    state.references = json.loads(references_file.read_text()) if references_file.is_file() else {}

    def measure(role: str) -> None:
        for split, sampled in (("val", False), ("test", False), ("val", True)):
            key = f"{role} {split} {'sampled' if sampled else 'greedy'}"
            # An entry for another model (another build or choice of the student) is measured again.
            if state.references.get(key, {}).get("model") != str(state.models[role]):
                result = evaluate_model(
                    state.models[role],
                    state.files[f"prompts_{split}"],
                    max_new_tokens=d.max_new_tokens,
                    batch_size=budget.eval_batch_size,
                    sampled=sampled,
                    seed=0,
                    desc=f"evaluating {key}",
                )
                state.references[key] = {
                    "accuracy": result.accuracy,
                    "answered": result.answered / result.n,
                    "n": result.n,
                    "model": str(state.models[role]),
                }
                write_json_atomic(references_file, state.references)
            print(
                f"  {key}: {state.references[key]['accuracy']:.1%} (answered {state.references[key]['answered']:.1%})"
            )

    measure("teacher")
    # The student is chosen against the teacher's validation accuracy, then measured like the teacher.
    state.models["student"], selection = initial_student(
        budget,
        state.models["student"],
        state.references["teacher val greedy"]["accuracy"],
        state.files["prompts_val"],
        selection_record,
    )
    if selection is not None:
        print(f"  initial student: {describe_choice(selection, budget.student.steps)} -> {state.models['student']}")
    measure("student")
    if regime.name == "paper-like":
        from tsdkd_plugin.experiments.report import paper_like_checks

        missed = [what for met, what in paper_like_checks(state.references) if not met]
        if missed:
            # The builds are deterministic per kind of processor, not across kinds (docs/reproduction.md).
            print(
                f"  WARNING: the models built on this machine ({hardware_kind()}) miss the paper-like regime's "
                f"definition ({'; '.join(missed)}: no), so its results here are not paper-like results.",
                file=sys.stderr,
            )
    return state


REFERENCE_KEYS_CHECKED_ON_RESTORE = (
    "teacher val greedy",
    "teacher test greedy",
    "student val greedy",
    "student test greedy",
)


def read_restore_report(report_file: Path) -> dict:
    """An earlier comparison's JSON (what `collect` wrote), for --restore-from; a JobError naming the
    option when the file is missing or is not such a report."""
    try:
        data = json.loads(Path(report_file).read_text())
    except FileNotFoundError:
        raise JobError(f"--restore-from: no such file {report_file}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise JobError(
            f"--restore-from: {report_file} is not a comparison.json ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("regimes"), dict):
        raise JobError(f'--restore-from: {report_file} is not a comparison.json (it has no "regimes" mapping)')
    return data


def restore_runs(state: RegimeState, report_file: Path) -> int:
    """Write the run files recorded in an earlier comparison's JSON (`report_file`, what `collect`
    wrote) back under this run dir, so that a comparison can be resumed and extended on another
    machine; returns how many were written. Only when the teacher and initial student built here
    score exactly what the report recorded (the builds are deterministic on the same kind of
    machine): otherwise the recorded runs started from other models and a JobError says so. Files
    already here are kept; each restored record names the report it came from. The report's
    invocation records come back with the runs (restore_invocations), so that the refused report of
    another machine never adds its time to this run directory's."""
    recorded = read_restore_report(report_file)["regimes"].get(state.regime.name)
    if not recorded or not recorded.get("references"):
        # A comparison stopped before this regime began (its report lists the regime with no models):
        # nothing of it to restore, and nothing to check the models built here against.
        return 0
    for key in REFERENCE_KEYS_CHECKED_ON_RESTORE:
        then, now = recorded["references"].get(key, {}).get("accuracy"), state.references[key]["accuracy"]
        if then != now:
            raise JobError(
                f"--restore-from {report_file}: the {key} accuracy recorded there is {then}, the model built here "
                f"scores {now}; the recorded runs started from other models, so they are not restored "
                "(run the comparison without --restore-from)"
            )
    restore_invocations(state.root.parent, report_file)
    written = 0
    for run in [*recorded.get("tuning_runs", []), *recorded.get("test_runs", [])]:
        name = f"{settings_key(run['settings'])}--seed{run['seed']}"
        target = state.result_file(run["stage"], run["method"], name)
        if target.is_file():
            continue
        restored = {k: v for k, v in run.items() if k != "result_file"}
        restored["restored_from"] = str(report_file)
        write_json_atomic(target, restored)
        written += 1
    return written


INVOCATIONS_DIR = "invocations"
HEARTBEAT_SECONDS = 30.0


@contextlib.contextmanager
def record_invocation(run_dir: Path, options: argparse.Namespace, heartbeat_s: float = HEARTBEAT_SECONDS):
    """Record this invocation's wall time in <run_dir>/invocations/<start>-<pid>.json: written when it
    starts, its "updated" time rewritten every `heartbeat_s` seconds and at the end with how it ended,
    so the comparison's time in all (the report's sum) survives a kill to within a heartbeat. Yields
    add_phase_seconds(phase, seconds), which counts part of that time to a named phase ("phases")."""
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = Path(run_dir).resolve() / INVOCATIONS_DIR / f"{stamp}-{os.getpid()}.json"
    record = {
        "started": started,
        "updated": started,
        "outcome": "running",
        "jobs": getattr(options, "jobs", 1),
        "argv": list(getattr(options, "argv", [])),
        "hardware": hardware_kind(),
    }
    lock = threading.Lock()

    def write(**changes) -> None:
        with lock:
            record.update(changes, updated=time.time())
            write_json_atomic(path, record)

    def add_phase_seconds(phase: str, seconds: float) -> None:
        """Count `seconds` of this invocation to `phase` (e.g. BUILD_PHASE), recorded at once."""
        with lock:
            phases = record.setdefault("phases", {})
            phases[phase] = phases.get(phase, 0.0) + seconds
        write()

    write()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat_s):
            write()

    thread = threading.Thread(target=beat, name="invocation-heartbeat", daemon=True)
    thread.start()
    outcome = "interrupted"
    try:
        yield add_phase_seconds
        outcome = "finished"
    except JobError as error:
        outcome = f"stopped: {str(error).splitlines()[0]}"
        raise
    finally:
        done.set()
        thread.join()
        write(outcome=outcome)


def read_invocations(run_dir: Path) -> list[dict]:
    """The recorded invocations of a run directory (record_invocation, restore_invocations), oldest first."""
    folder = Path(run_dir) / INVOCATIONS_DIR
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(records, key=lambda record: record["started"])


def restore_invocations(run_dir: Path, report_file: Path) -> int:
    """Write the invocations an earlier comparison's JSON recorded (`collect`'s "invocations") back
    under <run_dir>/invocations/, each marked with the report it came from, so that the time of a
    comparison resumed on another machine (--restore-from) still sums every invocation it took;
    returns how many were written. Records already here (same start) are kept."""
    recorded = read_restore_report(report_file).get("invocations", [])
    folder = Path(run_dir).resolve() / INVOCATIONS_DIR
    here = {record["started"] for record in read_invocations(Path(run_dir).resolve())}
    written = 0
    for record in recorded:
        if record["started"] in here:
            continue
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(record["started"]))
        write_json_atomic(folder / f"restored-{stamp}.json", {**record, "restored_from": str(report_file)})
        written += 1
    return written


def run_regime(
    regime: Regime,
    options: argparse.Namespace,
    methods: Sequence[str],
    pool: RunPool | None = None,
    add_phase_seconds=None,
) -> None:
    """One regime: each tuned method's pipeline (its tuning, then its remedies, then the test seeds of
    it and of the methods derived from it) runs beside the other methods' pipelines, `pool.jobs`
    runs at a time; with one job, one method after another. `add_phase_seconds` (record_invocation's)
    is told how long building the models took."""
    banner(f"regime {regime.name}: {regime.doc}")
    tuned = [m for m in methods if m in TUNED_METHODS]
    inherited = {}
    if regime.inherit_from:  # read before any model is built: a missing parent is one sentence
        source = chosen_settings_file(Path(options.run_dir).resolve(), regime.inherit_from)
        if not source.is_file():
            raise JobError(
                f"the {regime.name} regime takes its non-LR settings from the {regime.inherit_from} "
                f"regime, which has not been tuned yet ({source} is missing): run that regime first"
            )
        inherited = {m: entry["chosen"] for m, entry in json.loads(source.read_text()).items()}
        untuned = [m for m in tuned if m not in inherited]
        if untuned:
            raise JobError(
                f"the {regime.name} regime runs each method at the non-LR settings chosen in the {regime.inherit_from} "
                f"regime, which has not tuned {', '.join(untuned)}: run {'it' if len(untuned) == 1 else 'them'} "
                "there first"
            )
    building_started = time.monotonic()
    state = prepare_regime(regime, options)
    if add_phase_seconds is not None:
        add_phase_seconds(BUILD_PHASE, time.monotonic() - building_started)
    if getattr(options, "restore_from", None):
        count = restore_runs(state, Path(options.restore_from))
        print(f"  restored {count} run files from {options.restore_from} (the teacher and student match it)")
    ctx = RunContext(
        budget=state.budget,
        teacher_dir=state.models["teacher"],
        student_dir=state.models["student"],
        prompts_file=state.files["prompts_train"],
        prompt_rows=load_prompt_rows(state.files["prompts_train"]),
        timeout_s=options.run_timeout or state.budget.stage_timeout_s,
        verbose=options.verbose,
    )
    pool = pool or RunPool()
    chosen_file = chosen_settings_file(Path(options.run_dir).resolve(), regime.name)

    def pipeline(method_name: str) -> None:
        tuned_here = tune_method(state, ctx, method_name, inherited, options.grid_trials, options.lr_grid, pool)
        tuning = {method_name: tuned_here}
        update_json_record(chosen_file, tuning)
        derived = [m for m in methods if METHODS[m].derived_from == method_name]
        remedy_names = [m for m in derived if METHODS[m].group == "remedy" and regime.ablations]
        remedies = dict(
            zip(
                remedy_names,
                pool.map(lambda m: try_remedy(state, ctx, m, tuning[method_name], pool), remedy_names),
                strict=True,
            )
        )
        if remedies:
            update_json_record(remedies_file(state.root), remedies)
        if options.stop_after == "tune":
            return
        test_methods = [method_name] if regime.tests(method_name) else []
        test_methods += [m for m in derived if goes_to_test(m, regime, tuning, remedies)]
        # The first seed of every train_tsdkd method also logs the per-term gradient diagnostics
        # (which change no loss or gradient bit; docs/objective.md).
        pool.map(
            lambda job: pool.call(
                run_and_evaluate,
                state,
                ctx,
                "test",
                job[1],
                tuning[method_name]["chosen"],
                job[0],
                "test",
                extra_objective={"diagnostics": True}
                if job[0] == options.seed_list[0] and METHODS[job[1]].runner == "tsdkd"
                else {},
            ),
            [(seed, m) for seed in options.seed_list for m in test_methods],
        )

    pool.map(pipeline, tuned)


def collect(
    options: argparse.Namespace,
    regimes: Sequence[str],
    methods: Sequence[str],
    wall_seconds: float,
    command: Sequence[str],
) -> dict:
    """Everything the report shows, from the run files alone (`command`: how the comparison was run)."""
    run_dir = Path(options.run_dir).resolve()
    data = {
        "command": list(command),
        "machine": machine_info(),
        "wall_seconds": wall_seconds,
        "invocations": read_invocations(run_dir),
        "seeds": options.seed_list,
        "reference_method": REFERENCE_METHOD,
        "lr_grid": list(options.lr_grid),
        "tuning_seed": TUNING_SEED,
        "grid_trials": options.grid_trials,
        "methods_doc": {
            m: {
                "label": METHODS[m].label,
                "doc": METHODS[m].doc,
                "group": METHODS[m].group,
                "grid": [dict(g) for g in METHODS[m].grid],
                "objective": dict(METHODS[m].objective),
                "derived_from": METHODS[m].derived_from,
            }
            for m in methods
        },
        "regimes": {},
    }
    for name in regimes:
        regime = REGIMES[name]
        root = run_dir / name
        budget = BUDGETS[regime.budget]
        entry = {
            "doc": regime.doc,
            "tune": regime.tune,
            "inherit_from": regime.inherit_from,
            "budget": asdict(budget),
            "references": {},
            "tuning": {},
            "test_runs": [],
            "failed": [],
        }
        if (root / "references.json").is_file():
            entry["references"] = json.loads((root / "references.json").read_text())
        if (root / SELECTION_FILE).is_file():
            entry["student_selection"] = json.loads((root / SELECTION_FILE).read_text())
        if chosen_settings_file(run_dir, name).is_file():
            entry["tuning"] = json.loads(chosen_settings_file(run_dir, name).read_text())
        entry["remedies"] = (
            {m: r for m, r in json.loads(remedies_file(root).read_text()).items() if m in methods}
            if remedies_file(root).is_file()
            else {}
        )
        for path in sorted((root / "results" / "tune").rglob("*.json")) if (root / "results").is_dir() else []:
            if path.name.endswith(".failed.json"):
                entry["failed"].append(json.loads(path.read_text()))
        # Validation runs the protocol made: each method's trials, and its remedies. Others on disk (a
        # longer grid of an earlier protocol) are not runs of this comparison; the report counts them.
        protocol_trials = {
            (m, settings_key(t["settings"])) for m, tuned in entry["tuning"].items() for t in tuned["trials"]
        } | {(m, settings_key(r["settings"])) for m, r in entry["remedies"].items()}
        tuning_runs = (
            [
                json.loads(p.read_text())
                for p in sorted((root / "results" / "tune").rglob("*.json"))
                if not p.name.endswith(".failed.json")
            ]
            if (root / "results" / "tune").is_dir()
            else []
        )
        entry["tuning_runs"] = [
            run for run in tuning_runs if (run["method"], settings_key(run["settings"])) in protocol_trials
        ]
        entry["unused_tuning_runs"] = len(tuning_runs) - len(entry["tuning_runs"])
        # Test runs at settings the method no longer has (tuning went on after they ran: a longer grid,
        # a re-check), or of a method this regime no longer tests, stay on disk but are not results of
        # this comparison; the report counts them.
        chosen = {m: tuned["chosen"] for m, tuned in entry["tuning"].items()}
        entry["superseded_test_runs"] = []
        test_dir = root / "results" / "test"
        for path in sorted(test_dir.rglob("*.json")) if test_dir.is_dir() else []:
            run = json.loads(path.read_text())
            base = METHODS[run["method"]].tuned_as if run["method"] in METHODS else None
            if base in chosen and (dict(run["settings"]) != dict(chosen[base]) or not regime.tests(base)):
                entry["superseded_test_runs"].append(str(path.relative_to(run_dir)))
            elif path.name.endswith(".failed.json"):
                entry["failed"].append(run)
            elif run["method"] in methods and run["seed"] in options.seed_list:
                run["result_file"] = str(path.relative_to(run_dir))
                entry["test_runs"].append(run)
        done = {(run["method"], run["seed"]) for run in entry["test_runs"]}
        failed = {(run["method"], run["seed"]) for run in entry["failed"] if "settings" in run}
        # What the run would test: the tuned methods, and the derived ones whose parent was tuned here.
        expected = [
            m
            for m in methods
            if (m in TUNED_METHODS and regime.tests(m)) or goes_to_test(m, regime, entry["tuning"], entry["remedies"])
        ]
        entry["missing"] = [
            f"{m} seed {seed}"
            for seed in options.seed_list
            for m in expected
            if (m, seed) not in done and (m, seed) not in failed
        ]
        data["regimes"][name] = entry
    return data
