"""Teacher and initial student: toy models trained by OpenRLHF `train_sft` on the task's worked
solutions, built once per recipe into the fixture cache and reused afterwards.

The cache key hashes the whole recipe (base model directory, which itself encodes architecture,
init seed and tokenizer; task, difficulty, data seed and size; the SFT recipe; dtype and ZeRO
stage; library versions; the kind of processor, which changes the trained weights). A build
happens in a temp directory renamed into place only when complete
(`tsdkd_plugin.toy.cache.cached_build`); an existing entry is never retrained or overwritten.
Every reuse checks the model's tokenizer against the toy tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from tsdkd_plugin.experiments.budgets import TASK_DATA_SEED, Budget, SFTRecipe, StudentSelection, write_task_data
from tsdkd_plugin.experiments.flags import sft_flags
from tsdkd_plugin.experiments.runner import (
    CommandResult,
    JobError,
    StageCancelled,
    StepProgress,
    child_env,
    hardware_kind,
    run_logged,
    upstream_command,
    write_json_atomic,
)

# Libraries whose versions decide what a training run produces from the same recipe.
_SFT_LIBRARIES = ("torch", "transformers", "deepspeed", "openrlhf", "tokenizers")
SFT_CACHE_FORMAT = 1


def base_model_dir(model: str, cache_dir: Path | None) -> Path:
    """The untrained toy model named `model` (tsdkd_plugin.toy.models.MODEL_RECIPES), built on first use."""
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import get_model_recipe

    return toy_model_dir(get_model_recipe(model), cache_dir)


# Inside a cache entry built with a StudentSelection: HF copies of the model, global_step<N>_hf.
KEPT_CHECKPOINTS_DIR = "checkpoints"


def sft_cache_entry(
    recipe: SFTRecipe, difficulty: str, cache_dir: Path | None, selection: StudentSelection | None = None
) -> tuple[str, dict]:
    """(cache kind, full recipe) of a trained model; the cache key hashes exactly this dict."""
    base = base_model_dir(recipe.model, cache_dir)
    full_recipe = {
        # The base directory's name is its own recipe key (architecture, init seed, tokenizer).
        "base_model": base.name,
        "task": "arith",
        "difficulty": difficulty,
        "task_data_seed": TASK_DATA_SEED,
        "sft": asdict(recipe),
        "param_dtype": "fp32",
        "zero_stage": 0,
        "format": SFT_CACHE_FORMAT,
        # The same recipe trains other weights on another kind of processor (runner.hardware_kind), so a
        # cache shared between machines never hands one machine's model to another.
        "hardware": hardware_kind(),
    }
    if selection is not None:
        # Only when copies are kept: an entry without them keeps the key it always had.
        full_recipe["kept_checkpoints"] = {"every": selection.every, "first_step": selection.first_step}
    return f"toy-sft-{recipe.role}", full_recipe


def sft_cache_path(
    recipe: SFTRecipe, difficulty: str, cache_dir: Path | None, selection: StudentSelection | None = None
) -> Path:
    """Where the model `recipe` describes lives (or will live) in the cache."""
    from tsdkd_plugin.toy.cache import default_cache_dir, recipe_key

    kind, full_recipe = sft_cache_entry(recipe, difficulty, cache_dir, selection)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{kind}-{recipe_key(kind, full_recipe, _SFT_LIBRARIES)}"


def check_model_tokenizer(model_dir: Path, tokenizer_dir: Path, what: str) -> None:
    """A model whose tokenizer differs from the toy tokenizer is refused (it would be compared
    id by id with the other model). Raises JobError; the directory is left untouched."""
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    try:
        check_same_tokenizer(model_dir, tokenizer_dir, "model", "toy")
    except (ValueError, OSError) as error:
        # check_same_tokenizer lists the differences in parentheses; keep just those.
        detail = re.search(r"do not use the same tokenizer \((.*?)\)\. ", str(error))
        raise JobError(
            f"refusing the cached {what} at {model_dir}: its tokenizer does not match the toy tokenizer at "
            f"{tokenizer_dir} ({detail.group(1) if detail else error}); it is left untouched: delete it by hand "
            f"or use another --cache-dir"
        ) from None


def trained_model_dir(
    recipe: SFTRecipe,
    difficulty: str,
    cache_dir: Path | None,
    *,
    work_dir: Path,
    timeout_s: float,
    verbose: bool = False,
    selection: StudentSelection | None = None,
    cancel: threading.Event | None = None,
) -> tuple[Path, bool]:
    """(directory, built_now) of the model `recipe` describes, trained by OpenRLHF train_sft on
    first use and reused afterwards. Its tokenizer is checked against the toy tokenizer either way.
    With `selection`, the entry also keeps the run's HF copies from selection.first_step on, under
    KEPT_CHECKPOINTS_DIR (`initial_student_candidates`)."""
    from tsdkd_plugin.toy.cache import cached_build, toy_tokenizer_dir

    kind, full_recipe = sft_cache_entry(recipe, difficulty, cache_dir, selection)
    base = base_model_dir(recipe.model, cache_dir)
    built = False

    def build(out: Path) -> None:
        nonlocal built
        data_dir = out / "sft_data"
        # Only sft_train.jsonl is used; the other splits must merely be non-empty.
        write_task_data(data_dir, difficulty, recipe.n_train, 16, 16)
        copies_dir = out / ".all_checkpoints"
        result = run_sft(
            recipe,
            base,
            data_dir / "sft_train.jsonl",
            out,
            work_dir=work_dir,
            timeout_s=timeout_s,
            verbose=verbose,
            extra_flags=hf_copy_flags(copies_dir, selection.every) if selection is not None else (),
            cancel=cancel,
        )
        shutil.rmtree(data_dir)
        if selection is not None:
            kept = out / KEPT_CHECKPOINTS_DIR
            kept.mkdir()
            for step, path in hf_copies(copies_dir).items():
                if selection.first_step <= step < recipe.steps:  # the final model is the entry itself
                    path.rename(kept / path.name)
            shutil.rmtree(copies_dir)
        shutil.copyfile(result.log, out / "train_sft.log")
        (out / "tsdkd_sft_run.json").write_text(
            json.dumps({"command": result.command, "seconds": result.seconds, "steps": recipe.steps}, indent=2) + "\n"
        )
        built = True

    path = cached_build(kind, full_recipe, build, cache_dir, _SFT_LIBRARIES)
    check_model_tokenizer(path, toy_tokenizer_dir(cache_dir), recipe.role)
    return path, built


def build_teacher_and_student(
    budget: Budget,
    difficulty: str,
    cache_dir: Path | None,
    logs_dir: Path,
    *,
    verbose: bool = False,
    prompts_val: Path | None = None,
    selection_record: Path | None = None,
) -> dict[str, tuple[Path, bool, float]]:
    """{role: (model dir, built now, seconds)} for the teacher and the student's SFT run, the two
    train_sft runs side by side: small models keep neither of the two cores busy alone, and a build's
    weights do not depend on the load beside it (the recipe fixes its thread count;
    tests/repro/test_build_determinism.py). A failing build stops the other one at once, and its
    error is the one raised. With the budget's student selection, the student's candidates are
    evaluated on `prompts_val` (into `selection_record`) as soon as its build ends, while the
    teacher's goes on; `select_initial_student` then only reads them."""
    from concurrent.futures import ThreadPoolExecutor

    selection = budget.student_selection
    if selection is not None and (prompts_val is None or selection_record is None):
        raise ValueError("a budget with a student selection needs prompts_val and selection_record")
    recipes = {"teacher": budget.teacher, "student": budget.student}
    for recipe in recipes.values():  # the shared untrained models and tokenizer: built once, before
        base_model_dir(recipe.model, cache_dir)

    failed = threading.Event()  # set by the first build that fails: the other one is stopped

    def build(role: str) -> tuple[Path, bool, float]:
        started = time.time()
        try:
            path, built = trained_model_dir(
                recipes[role],
                difficulty,
                cache_dir,
                work_dir=logs_dir / role,
                timeout_s=budget.stage_timeout_s,
                verbose=verbose,
                selection=selection if role == "student" else None,
                cancel=failed,
            )
            if role == "student" and selection is not None:
                evaluate_candidates(
                    initial_student_candidates(path, budget.student.steps),
                    prompts_val,
                    selection_record,
                    max_new_tokens=budget.distill.max_new_tokens,
                    batch_size=budget.eval_batch_size,
                )
        except BaseException:
            failed.set()
            raise
        return path, built, time.time() - started

    with ThreadPoolExecutor(max_workers=len(recipes)) as pool:
        futures = {role: pool.submit(build, role) for role in recipes}
        errors = [future.exception() for future in futures.values()]  # waits for both
    # The failure to report is the one that stopped the other build, not the stop itself.
    for error in sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, StageCancelled)):
        raise error
    return {role: future.result() for role, future in futures.items()}


def initial_student(
    budget: Budget, student_run_dir: Path, teacher_val_accuracy: float, prompts_val: Path, selection_record: Path
) -> tuple[Path, dict | None]:
    """(model directory, selection record or None) of the initial student: the SFT run's final model,
    or with the budget's student selection the candidate it chooses on the validation split."""
    if budget.student_selection is None:
        return student_run_dir, None
    return select_initial_student(
        student_run_dir,
        budget.student.steps,
        budget.student_selection,
        teacher_val_accuracy,
        prompts_val,
        selection_record,
        max_new_tokens=budget.distill.max_new_tokens,
        batch_size=budget.eval_batch_size,
    )


def hf_copy_flags(copies_dir: Path, every: int) -> list[str]:
    """train_sft flags that save an HF copy of the model every `every` optimizer steps into
    copies_dir/global_step<N>_hf, without DeepSpeed state (a later --ckpt.path overrides sft_flags')."""
    return ["--ckpt.path", str(copies_dir), "--ckpt.save_hf", "--ckpt.disable_ds", "--ckpt.save_steps", str(every)]


def hf_copies(copies_dir: Path) -> dict[int, Path]:
    """{optimizer step: HF directory} of the complete global_step<N>_hf copies under copies_dir."""
    found = {}
    for path in Path(copies_dir).glob("global_step*_hf"):
        match = re.fullmatch(r"global_step(\d+)_hf", path.name)
        if match and (path / "config.json").is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def initial_student_candidates(student_dir: Path, steps: int) -> dict[int, Path]:
    """{SFT step: HF directory} of the models an initial student is chosen from: the kept copies and
    the run's final model (the entry itself, at `steps`)."""
    return {**hf_copies(Path(student_dir) / KEPT_CHECKPOINTS_DIR), steps: Path(student_dir)}


def choose_checkpoint(val_accuracy: Mapping[int, float], teacher_val_accuracy: float, target_ratio: float) -> int:
    """The step whose validation accuracy is nearest target_ratio * the teacher's (the earlier step on a
    tie; a teacher at 0%, as in the smoke budget, makes that the least accurate one)."""
    if not val_accuracy:
        raise ValueError("no checkpoint to choose from")
    target = target_ratio * teacher_val_accuracy
    return min(sorted(val_accuracy), key=lambda step: abs(val_accuracy[step] - target))


def evaluate_candidates(
    candidates: Mapping[int, Path], prompts_val: Path, record_file: Path, *, max_new_tokens: int, batch_size: int
) -> dict[int, float]:
    """{step: greedy validation accuracy} of every candidate, kept in record_file (a rerun resumes;
    an entry for another model directory is evaluated again)."""
    from tsdkd_plugin.experiments.evaluate import evaluate_model

    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    wanted = {step: str(path) for step, path in candidates.items()}
    done = {int(c["step"]): c for c in record.get("candidates", []) if wanted.get(int(c["step"])) == c.get("model")}
    for step, model_dir in candidates.items():
        if step in done:
            continue
        result = evaluate_model(
            model_dir, prompts_val, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"student step {step}"
        )
        done[step] = {"step": step, "model": str(model_dir), "val_accuracy": result.accuracy}
        record["candidates"] = [done[s] for s in sorted(done)]
        write_json_atomic(record_file, record)
    return {step: done[step]["val_accuracy"] for step in sorted(candidates)}


def select_initial_student(
    student_dir: Path,
    steps: int,
    selection: StudentSelection,
    teacher_val_accuracy: float,
    prompts_val: Path,
    record_file: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[Path, dict]:
    """(model directory, record) of the initial student `selection` chooses among its SFT run's
    candidates on the validation split; the record (every candidate's accuracy, the target and the
    choice) is written to record_file."""
    candidates = initial_student_candidates(student_dir, steps)
    accuracy = evaluate_candidates(
        candidates, prompts_val, record_file, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    chosen = choose_checkpoint(accuracy, teacher_val_accuracy, selection.target_ratio)
    record = {
        **json.loads(record_file.read_text()),
        "rule": selection.describe(),
        "target_ratio": selection.target_ratio,
        "teacher_val_accuracy": teacher_val_accuracy,
        "chosen_step": chosen,
        "chosen_val_accuracy": accuracy[chosen],
        "chosen_ratio": accuracy[chosen] / teacher_val_accuracy if teacher_val_accuracy else None,
        "model": str(candidates[chosen]),
    }
    write_json_atomic(record_file, record)
    return candidates[chosen], record


def describe_choice(record: Mapping, steps: int) -> str:
    """The choice a selection record holds, in one line (the main job's and the comparison's)."""
    ratio = record["chosen_ratio"]
    return (
        f"step {record['chosen_step']} of {steps}: validation {record['chosen_val_accuracy']:.1%}, "
        f"{'n/a' if ratio is None else f'{ratio:.2f}'} of the teacher's {record['teacher_val_accuracy']:.1%} "
        f"(aimed at {record['target_ratio']:g})"
    )


def run_sft(
    recipe: SFTRecipe,
    base_dir: Path,
    data_file: Path,
    output_dir: Path,
    *,
    work_dir: Path,
    timeout_s: float,
    verbose: bool = False,
    extra_flags: Sequence[str] = (),
    cancel: threading.Event | None = None,
) -> CommandResult:
    """One `train_sft` run of `recipe` from `base_dir` on `data_file` into `output_dir` (HF directory),
    with its TensorBoard events in output_dir/tensorboard and its log in work_dir."""
    flags = sft_flags(recipe, base_dir, data_file, output_dir, work_dir / f"{recipe.role}-ds-ckpt")
    flags += ["--logger.tensorboard_dir", str(output_dir / "tensorboard"), *extra_flags]
    return run_logged(
        upstream_command("openrlhf.cli.train_sft", flags, ray_job=False, threads=recipe.threads),
        work_dir / f"train_sft_{recipe.role}.log",
        desc=f"train_sft {recipe.role} ({recipe.steps} steps)",
        progress=StepProgress(recipe.steps, "epoch_bar", recipe.epochs),
        env=child_env(work_dir, threads=recipe.threads),
        cwd=work_dir,
        timeout_s=timeout_s,
        verbose=verbose,
        cancel=cancel,
    )
