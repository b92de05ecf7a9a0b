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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tsdkd_plugin.experiments.budgets import TASK_DATA_SEED, SFTRecipe, write_task_data
from tsdkd_plugin.experiments.flags import sft_flags
from tsdkd_plugin.experiments.runner import (
    CommandResult,
    JobError,
    StepProgress,
    child_env,
    hardware_kind,
    run_logged,
    upstream_command,
)

# Libraries whose versions decide what a training run produces from the same recipe.
_SFT_LIBRARIES = ("torch", "transformers", "deepspeed", "openrlhf", "tokenizers")
SFT_CACHE_FORMAT = 1


def base_model_dir(model: str, cache_dir: Path | None) -> Path:
    """The untrained toy model named `model` (tsdkd_plugin.toy.models.MODEL_RECIPES), built on first use."""
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import get_model_recipe

    return toy_model_dir(get_model_recipe(model), cache_dir)


def sft_cache_entry(recipe: SFTRecipe, difficulty: str, cache_dir: Path | None) -> tuple[str, dict]:
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
    return f"toy-sft-{recipe.role}", full_recipe


def sft_cache_path(recipe: SFTRecipe, difficulty: str, cache_dir: Path | None) -> Path:
    """Where the model `recipe` describes lives (or will live) in the cache."""
    from tsdkd_plugin.toy.cache import default_cache_dir, recipe_key

    kind, full_recipe = sft_cache_entry(recipe, difficulty, cache_dir)
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
) -> tuple[Path, bool]:
    """(directory, built_now) of the model `recipe` describes, trained by OpenRLHF train_sft on
    first use and reused afterwards. Its tokenizer is checked against the toy tokenizer either way."""
    from tsdkd_plugin.toy.cache import cached_build, toy_tokenizer_dir

    kind, full_recipe = sft_cache_entry(recipe, difficulty, cache_dir)
    base = base_model_dir(recipe.model, cache_dir)
    built = False

    def build(out: Path) -> None:
        nonlocal built
        data_dir = out / "sft_data"
        # Only sft_train.jsonl is used; the other splits must merely be non-empty.
        write_task_data(data_dir, difficulty, recipe.n_train, 16, 16)
        result = run_sft(
            recipe, base, data_dir / "sft_train.jsonl", out, work_dir=work_dir, timeout_s=timeout_s, verbose=verbose
        )
        shutil.rmtree(data_dir)
        shutil.copyfile(result.log, out / "train_sft.log")
        (out / "tsdkd_sft_run.json").write_text(
            json.dumps({"command": result.command, "seconds": result.seconds, "steps": recipe.steps}, indent=2) + "\n"
        )
        built = True

    path = cached_build(kind, full_recipe, build, cache_dir, _SFT_LIBRARIES)
    check_model_tokenizer(path, toy_tokenizer_dir(cache_dir), recipe.role)
    return path, built


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
    )
