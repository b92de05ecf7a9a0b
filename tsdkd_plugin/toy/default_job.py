"""The main job: tiny teacher and student on the built-in task, TSD-KD through the real CLI, evaluation, report.

    python -m tsdkd_plugin.toy.default_job [--budget smoke|default|full] [--run-dir runs/default]
                                           [--seed 0] [--difficulty easy]

(`bash scripts/run_default.sh` sets up the environment and runs exactly this.)

Stages, each announced with a banner and a progress bar:

1. task data    arithmetic problems written as OpenRLHF JSONL files into <run-dir>/data
2. teacher      the toy teacher (128/2/4) trained by OpenRLHF `train_sft` on the worked solutions
3. student      the toy student (64/1/2) after a short `train_sft` on the same kind of data
4. tsdkd        `python -m openrlhf.cli.train_tsdkd` distils the teacher into the student (subprocess)
5. evaluation   greedy accuracy of teacher, initial student and distilled student on the held-out test split
6. report       <run-dir>/report.md, accuracy.png and results.json, and a summary on the console

Teacher and student are built once per recipe into the fixture cache ($TSDKD_CACHE or
~/.cache/tsdkd_plugin) with tsdkd_plugin.toy.cache.cached_build: the key hashes the whole
recipe (base model, data sizes, steps, learning rate, seeds, dtype, library versions), a build
happens in a temp directory that is renamed into place only when complete, and an existing
entry is reused, never retrained or overwritten. So a rerun skips stages 2 and 3.

Budgets are fixed in optimizer steps, not seconds (accuracy jumps late in training, so wall-clock
budgets would make results depend on the machine's load). `--seed` seeds the distillation stage
(vLLM sampling, data order); teacher, student and the task splits use fixed seeds so that they are
shared by every run and every seed.

The stage functions are reused by `tsdkd_plugin.toy.compare` (the baseline comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from tsdkd_plugin.toy import arith_task
from tsdkd_plugin.toy.arith_task import DIFFICULTIES, TASK_NAMES

PROG = "python -m tsdkd_plugin.toy.default_job"
REPO_ROOT = Path(__file__).resolve().parents[2]
REWARD_FUNC_PATH = Path(__file__).resolve().with_name("reward_func.py")

# The task splits and the SFT runs use this seed whatever --seed says: teacher, student and the
# test split are then the same for every distillation seed (and shared through the cache).
TASK_DATA_SEED = 0
# The teacher must beat the initial student by at least this much for the setting to make sense.
MIN_TEACHER_MARGIN = 0.10
LOG_TAIL_LINES = 25


class JobError(Exception):
    """Bad input: main() prints the message (one sentence, no traceback) and exits with status 2."""

    exit_status = 2


class StageFailed(JobError):
    """A stage's command failed: the message names the stage and its log and ends with the log's
    last lines (the real error is in the child's output). Exit status 1."""

    exit_status = 1


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class SFTRecipe:
    """One `openrlhf.cli.train_sft` run on the task's worked solutions (teacher or initial student)."""

    role: str  # "teacher" or "student": which untrained toy model (tsdkd_plugin.toy.models) it starts from
    n_train: int  # distinct training problems (rows of sft_train.jsonl)
    epochs: int
    batch_size: int  # sequences per optimizer step (micro batch = batch: no accumulation)
    lr: float
    lr_scheduler: str = "cosine_with_min_lr"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    seed: int = 0
    max_len: int = 128

    @property
    def steps(self) -> int:
        # OpenRLHF's dataloader drops the last partial batch.
        return self.n_train // self.batch_size * self.epochs


@dataclass(frozen=True)
class DistillBudget:
    """One on-policy run (TSD-KD, GKD, GRPO) and the equal budget every baseline gets."""

    n_prompts: int  # train prompts used, each once (one episode)
    samples_per_prompt: int  # student samples per prompt (vLLM rollouts)
    rollout_batch_size: int  # prompts per rollout
    train_batch_size: int  # sequences per optimizer step
    micro_batch_size: int  # sequences per forward/backward (a multiple of samples_per_prompt)
    lr: float
    # Constant after a short warm-up: every method then trains with the same learning rates,
    # whatever number of steps its trainer plans its schedule for.
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.05
    max_new_tokens: int = 64
    max_len: int = 128

    @property
    def num_samples(self) -> int:
        return self.n_prompts * self.samples_per_prompt

    @property
    def optimizer_steps(self) -> int:
        # OpenRLHF's PPO trainer: n_prompts * n // train_batch_size per episode and epoch.
        return self.num_samples // self.train_batch_size

    @property
    def rollouts(self) -> int:
        return self.n_prompts // self.rollout_batch_size


@dataclass(frozen=True)
class Budget:
    name: str
    teacher: SFTRecipe
    student: SFTRecipe
    distill: DistillBudget
    n_test: int
    n_val: int = 64
    eval_batch_size: int = 256
    # A stage that runs longer than this is stopped (a hung Ray job must not block forever).
    stage_timeout_s: int = 3600

    def summary(self) -> str:
        d = self.distill
        return (
            f"teacher SFT {self.teacher.steps} steps, student SFT {self.student.steps} steps, "
            f"distillation {d.n_prompts} prompts x {d.samples_per_prompt} samples = {d.optimizer_steps} "
            f"optimizer steps, test split {self.n_test} problems"
        )


# Calibration (docs/toy_task.md, /work/shared/notes/toy-calibration.md): the teacher reaches
# ~76% on `easy` after ~1,700 steps of batch 32 at lr 2e-3; the student ~15-35% after a few
# hundred steps at 3e-3. The distillation budget is what the comparison gives every method.
_DEFAULT_TEACHER = SFTRecipe(role="teacher", n_train=16000, epochs=4, batch_size=32, lr=2e-3, seed=1)
_DEFAULT_STUDENT = SFTRecipe(role="student", n_train=48000, epochs=1, batch_size=32, lr=3e-3, seed=2)
_DEFAULT_DISTILL = DistillBudget(
    n_prompts=512, samples_per_prompt=4, rollout_batch_size=64, train_batch_size=64, micro_batch_size=16, lr=1e-4
)

BUDGETS: dict[str, Budget] = {
    # A couple of minutes end to end; what the test suite runs. Models learn little: it proves
    # the plumbing (every stage, the real CLIs, the cache, the report), not the method.
    "smoke": Budget(
        name="smoke",
        teacher=SFTRecipe(role="teacher", n_train=256, epochs=1, batch_size=32, lr=2e-3, seed=1),
        student=SFTRecipe(role="student", n_train=128, epochs=1, batch_size=32, lr=3e-3, seed=2),
        distill=DistillBudget(
            n_prompts=16, samples_per_prompt=2, rollout_batch_size=8, train_batch_size=16, micro_batch_size=8,
            lr=1e-3,
        ),
        n_test=16,
        n_val=16,
        stage_timeout_s=900,
    ),
    "default": Budget(name="default", teacher=_DEFAULT_TEACHER, student=_DEFAULT_STUDENT,
                      distill=_DEFAULT_DISTILL, n_test=500),
    "full": Budget(
        name="full",
        teacher=replace(_DEFAULT_TEACHER, n_train=32000, epochs=4),
        student=_DEFAULT_STUDENT,
        distill=replace(_DEFAULT_DISTILL, n_prompts=2048),
        n_test=1000,
        stage_timeout_s=3 * 3600,
    ),
}


def check_budget(budget: Budget) -> None:
    """Every size must fill at least one batch (OpenRLHF drops partial batches, so a split that
    cannot would make training end without a single step). Raises JobError with one sentence."""
    d = budget.distill
    try:
        arith_task.check_split_size(budget.teacher.n_train, budget.teacher.batch_size, "the teacher's SFT data")
        arith_task.check_split_size(budget.student.n_train, budget.student.batch_size, "the student's SFT data")
        arith_task.check_split_size(d.n_prompts, d.rollout_batch_size, "the train split's distillation prompts")
        arith_task.check_split_size(d.num_samples, d.train_batch_size, "the student samples of one episode")
        arith_task.check_split_size(budget.n_test, 1, "the test split")
    except ValueError as error:
        raise JobError(str(error)) from None
    if d.micro_batch_size % d.samples_per_prompt or d.train_batch_size % d.micro_batch_size:
        raise JobError(
            f"the micro batch ({d.micro_batch_size}) must be a multiple of the samples per prompt "
            f"({d.samples_per_prompt}) and divide the train batch ({d.train_batch_size})"
        )


# --------------------------------------------------------------------------- running the real CLIs


def child_env(run_dir: Path) -> dict[str, str]:
    """Environment of every subprocess: offline, unbuffered, no wandb, datasets cache in the run dir
    (concurrent runs then never share half-written Arrow files)."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_DATASETS_CACHE=str(run_dir / ".hf_datasets_cache"),
    )
    # OpenMP threads that wait by spinning make a shared or oversubscribed CPU crawl: measured here,
    # train_sft took 4.8 s per step with spinning threads and 0.33 s with passive waiting (load ~5
    # on 2 cores). Passive waiting costs nothing measurable on an idle machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Let children import this checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def on_cpu() -> bool:
    from tsdkd_plugin.host.device import cpu_mode

    return cpu_mode()


def upstream_command(module: str, args: Sequence[str], *, ray_job: bool) -> list[str]:
    """The command line that runs an unmodified upstream OpenRLHF CLI here.

    On CPU: through tsdkd_plugin.host.cpu_launch (local Ray with logical GPUs for Ray jobs, a
    world of one for DeepSpeed ones). On GPUs: the module itself (Ray jobs) or under torchrun.
    """
    if on_cpu():
        # A single-process DeepSpeed job may use every core; Ray jobs share them between processes.
        threads = [] if ray_job else ["--threads", str(os.cpu_count() or 1)]
        return [sys.executable, "-m", "tsdkd_plugin.host.cpu_launch", *threads, module, *args]
    if ray_job:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", module, *args]


def tsdkd_command(args: Sequence[str]) -> list[str]:
    """train_tsdkd starts its own local Ray cluster on CPU, so it is always run directly."""
    return [sys.executable, "-m", "openrlhf.cli.train_tsdkd", *args]


class StepProgress:
    """Turns an OpenRLHF log stream into progress-bar positions.

    Two formats: the SFT/DPO trainers' tqdm bars ("Train step of epoch E: ... N/M") and the
    Ray trainers' per-rollout log line ("Global step N"). Only the display depends on this;
    a format that is not recognised leaves the bar at elapsed time.
    """

    _EPOCH_STEP = re.compile(r"Train step of epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    _GLOBAL_STEP = re.compile(r"Global step (\d+)")

    def __init__(self, total: int | None, kind: str, epochs: int = 1):
        if kind not in ("epoch_bar", "global_step"):
            raise ValueError(f"unknown progress kind {kind!r}")
        self.total, self.kind, self.epochs = total, kind, epochs
        # SFT/DPO bars count optimizer steps (micro batch = batch); Ray trainers log once per rollout.
        self.unit = "step" if kind == "epoch_bar" else "rollout"

    def position(self, line: str) -> int | None:
        if self.kind == "epoch_bar":
            match = self._EPOCH_STEP.search(line)
            if match:
                epoch, done, per_epoch = (int(x) for x in match.groups())
                self.total = per_epoch * self.epochs
                return epoch * per_epoch + done
            return None
        match = self._GLOBAL_STEP.search(line)
        return int(match.group(1)) if match else None


@dataclass
class CommandResult:
    command: list[str]
    log: str
    seconds: float
    returncode: int


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's own process group (it was started in a new session), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_logged(
    command: Sequence[str],
    log_path: Path,
    *,
    desc: str,
    progress: StepProgress | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 3600,
    verbose: bool = False,
) -> CommandResult:
    """Run one command, its whole output into log_path, a progress bar on the console.

    Raises JobError naming the stage and the log (with the log's last lines) when the command
    fails or runs past timeout_s.
    """
    from tqdm.auto import tqdm

    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bar = tqdm(total=progress.total if progress else None, desc=desc, unit=progress.unit if progress else "it",
               dynamic_ncols=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        # A new session: on timeout the child and every process it started (Ray, vLLM) are stopped together.
        process = subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env or os.environ),
            cwd=str(cwd) if cwd else None, start_new_session=True,
        )
        # A reader thread, so that a silent child cannot keep the time limit from being checked.
        chunks: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, chunks), daemon=True)
        reader.start()
        pending = b""
        timed_out = False
        try:
            while True:
                if time.time() - started > timeout_s:
                    timed_out = True
                    _stop_process_group(process)
                    break
                try:
                    chunk = chunks.get(timeout=1.0)
                except queue.Empty:
                    continue
                if not chunk:
                    break
                log.write(chunk)
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                # tqdm redraws with carriage returns; both end a "line" for our purpose.
                pieces = re.split(rb"[\r\n]", pending + chunk)
                pending = pieces.pop()
                if progress:
                    for piece in pieces:
                        position = progress.position(piece.decode("utf-8", "replace"))
                        if position is not None:
                            bar.total = progress.total
                            bar.n = min(position, progress.total or position)
                            bar.refresh()
        except BaseException:  # Ctrl-C, SIGTERM (see main), or a bug here: never leave the child running
            _stop_process_group(process)
            raise
        finally:
            returncode = process.wait()
            bar.close()
    seconds = time.time() - started
    if timed_out or returncode != 0:
        why = f"ran past its {timeout_s:.0f} s limit and was stopped" if timed_out else f"exited with status {returncode}"
        raise StageFailed(f"{desc} {why}; its log is {log_path}.\n--- last lines of the log ---\n{log_tail(log_path)}")
    return CommandResult(list(command), str(log_path), seconds, returncode)


def _pump(stream, chunks: "queue.Queue[bytes]") -> None:
    """Copy a pipe into a queue; an empty chunk marks its end."""
    for chunk in iter(lambda: stream.read1(65536), b""):
        chunks.put(chunk)
    chunks.put(b"")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    cleaned = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(cleaned[-lines:])


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 76 - len(text)), flush=True)


# --------------------------------------------------------------------------- task data


def write_task_data(out_dir: Path, difficulty: str, n_train: int, n_val: int, n_test: int) -> dict[str, Path]:
    return arith_task.write_task_files(
        out_dir, difficulty=difficulty, n_train=n_train, n_val=n_val, n_test=n_test, seed=TASK_DATA_SEED,
    )


# DeepSpeed settings of every toy training command (SFT, DPO, GRPO, TSD-KD): one CPU process
# (nothing to shard), fp32 (bf16 matmuls are slow on most CPUs), PyTorch attention.
TOY_DS_FLAGS = ("--ds.zero_stage", "0", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa")


# --------------------------------------------------------------------------- teacher and student (cached)

# Libraries whose versions decide what a training run produces from the same recipe.
_SFT_LIBRARIES = ("torch", "transformers", "deepspeed", "openrlhf", "tokenizers")
SFT_CACHE_FORMAT = 1


def _base_model_dir(role: str, cache_dir: Path | None) -> Path:
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import STUDENT_RECIPE, TEACHER_RECIPE

    recipes = {"teacher": TEACHER_RECIPE, "student": STUDENT_RECIPE}
    if role not in recipes:
        raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(recipes)}")
    return toy_model_dir(recipes[role], cache_dir)


def sft_cache_entry(recipe: SFTRecipe, difficulty: str, cache_dir: Path | None) -> tuple[str, dict]:
    """(cache kind, full recipe) of a trained model; the cache key hashes exactly this dict."""
    base = _base_model_dir(recipe.role, cache_dir)
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
    }
    return f"toy-sft-{recipe.role}", full_recipe


def sft_cache_path(recipe: SFTRecipe, difficulty: str, cache_dir: Path | None) -> Path:
    """Where the model `recipe` describes lives (or will live) in the cache."""
    from tsdkd_plugin.toy.cache import default_cache_dir, recipe_key

    kind, full_recipe = sft_cache_entry(recipe, difficulty, cache_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{kind}-{recipe_key(kind, full_recipe, _SFT_LIBRARIES)}"


def sft_flags(recipe: SFTRecipe, model_dir: Path, data_file: Path, output_dir: Path, ds_ckpt_dir: Path) -> list[str]:
    """train_sft flags; the micro batch equals the batch, so one step is one optimizer update."""
    return [
        "--model.model_name_or_path", str(model_dir),
        "--data.dataset", str(data_file),
        "--data.input_key", arith_task.PROMPT_KEY,
        "--data.output_key", arith_task.SFT_OUTPUT_KEY,
        "--data.apply_chat_template",
        "--data.max_len", str(recipe.max_len),
        "--train.batch_size", str(recipe.batch_size),
        "--train.micro_batch_size", str(recipe.batch_size),
        "--train.max_epochs", str(recipe.epochs),
        "--train.seed", str(recipe.seed),
        "--adam.lr", str(recipe.lr),
        "--lr_scheduler", recipe.lr_scheduler,
        "--lr_warmup_ratio", str(recipe.warmup_ratio),
        "--min_lr_ratio", str(recipe.min_lr_ratio),
        *TOY_DS_FLAGS,
        "--ckpt.output_dir", str(output_dir),
        # DeepSpeed checkpoints (none are written without --ckpt.save_steps) stay out of the cache.
        "--ckpt.path", str(ds_ckpt_dir),
        "--logger.logging_steps", "10",
    ]


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
    base = _base_model_dir(recipe.role, cache_dir)
    built = False

    def build(out: Path) -> None:
        nonlocal built
        data_dir = out / "sft_data"
        # Only sft_train.jsonl is used; the other splits must merely be non-empty.
        write_task_data(data_dir, difficulty, recipe.n_train, 16, 16)
        command = upstream_command(
            "openrlhf.cli.train_sft", sft_flags(recipe, base, data_dir / "sft_train.jsonl", out, work_dir / f"{recipe.role}-ds-ckpt"),
            ray_job=False,
        )
        result = run_logged(
            command, work_dir / f"train_sft_{recipe.role}.log",
            desc=f"train_sft {recipe.role} ({recipe.steps} steps)",
            progress=StepProgress(recipe.steps, "epoch_bar", recipe.epochs),
            env=child_env(work_dir), cwd=work_dir, timeout_s=timeout_s, verbose=verbose,
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


# --------------------------------------------------------------------------- distillation


def distill_flags(
    budget: DistillBudget,
    *,
    student_dir: Path,
    prompts_file: Path,
    output_dir: Path,
    seed: int,
    with_verifier_reward: bool = True,
) -> list[str]:
    """Flags shared by every on-policy run (train_tsdkd, train_ppo_ray): upstream train_ppo_ray's own."""
    flags = [
        "--actor.model_name_or_path", str(student_dir),
        "--data.prompt_dataset", str(prompts_file),
        "--data.input_key", arith_task.PROMPT_KEY,
        "--data.label_key", arith_task.LABEL_KEY,
        "--data.apply_chat_template",
        "--data.max_samples", str(budget.n_prompts),
        "--data.max_len", str(budget.max_len),
        "--rollout.max_new_tokens", str(budget.max_new_tokens),
        "--rollout.n_samples_per_prompt", str(budget.samples_per_prompt),
        "--rollout.batch_size", str(budget.rollout_batch_size),
        "--rollout.micro_batch_size", str(budget.micro_batch_size),
        "--rollout.temperature", "1.0",
        "--train.batch_size", str(budget.train_batch_size),
        "--train.micro_batch_size", str(budget.micro_batch_size),
        "--train.max_epochs", "1",
        "--train.num_episodes", "1",
        "--train.seed", str(seed),
        "--actor.adam.lr", str(budget.lr),
        "--actor.lr_scheduler", budget.lr_scheduler,
        "--actor.lr_warmup_ratio", str(budget.warmup_ratio),
        "--actor.num_nodes", "1",
        "--actor.num_gpus_per_node", "1",
        "--vllm.num_engines", "1",
        "--vllm.tensor_parallel_size", "1",
        *TOY_DS_FLAGS,
        "--ckpt.output_dir", str(output_dir),
        "--ckpt.path", str(output_dir.parent / "ds-ckpt"),
        "--ckpt.save_steps", "-1",
        "--logger.logging_steps", "1",
    ]
    if with_verifier_reward:
        # Training-time sample accuracy is logged as the reward; the TSD-KD loss does not use it.
        flags += ["--reward.remote_url", str(REWARD_FUNC_PATH)]
    return flags


def tsdkd_flags(objective: Mapping[str, object], *, teacher_dir: Path, placement: str = "colocate") -> list[str]:
    """--teacher.* and --tsdkd.* flags. Colocated by default: on two cores a separate teacher
    process would only add start-up time and inter-process transport."""
    flags = [
        "--teacher.model_name_or_path", str(teacher_dir),
        "--teacher.placement", placement,
        "--teacher.num_nodes", "1",
        "--teacher.num_gpus_per_node", "1",
    ]
    for name, value in objective.items():
        flags += [f"--tsdkd.{name}", str(value)]
    return flags


def run_tsdkd(
    budget: DistillBudget,
    objective: Mapping[str, object],
    *,
    teacher_dir: Path,
    student_dir: Path,
    prompts_file: Path,
    stage_dir: Path,
    seed: int,
    timeout_s: float,
    verbose: bool = False,
    desc: str = "train_tsdkd",
) -> tuple[Path, CommandResult]:
    """Distil with `python -m openrlhf.cli.train_tsdkd`; returns (saved HF model dir, command result)."""
    output_dir = stage_dir / "model"
    args = distill_flags(budget, student_dir=student_dir, prompts_file=prompts_file, output_dir=output_dir, seed=seed)
    args += tsdkd_flags(objective, teacher_dir=teacher_dir)
    args += ["--logger.tensorboard_dir", str(stage_dir / "tensorboard")]
    result = run_logged(
        tsdkd_command(args), stage_dir / "train.log",
        desc=f"{desc} ({budget.rollouts} rollouts, {budget.optimizer_steps} optimizer steps)",
        progress=StepProgress(budget.rollouts, "global_step"), env=child_env(stage_dir), cwd=stage_dir,
        timeout_s=timeout_s, verbose=verbose,
    )
    require_saved_model(output_dir, desc)
    return output_dir, result


def require_saved_model(output_dir: Path, what: str) -> None:
    if not (output_dir / "config.json").is_file():
        raise StageFailed(f"{what} finished but saved no HF model in {output_dir} (no config.json); see its log")


def fresh_stage_dir(path: Path) -> Path:
    """A stage directory emptied of an earlier run's outputs, so a stale model can never be evaluated."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- training logs


_GLOBAL_STEP_LINE = re.compile(r"Global step (\d+): (\{.*\})")
_TRAIN_EPOCH_DONE = re.compile(r"Train epoch \[(\d+)/\d+\]: 100%\|[^|]*\|\s*(\d+)/\d+")


def logged_optimizer_steps(log_path: Path, budget: DistillBudget) -> int | None:
    """Optimizer steps a Ray trainer really took, counted from its log: the micro-batches of every
    rollout's "Train epoch [e/E]: 100% ... k/k" bar, divided by the gradient-accumulation steps
    (train batch / micro batch, one rank). This checks, rather than assumes, that a run got its budget."""
    if not log_path.is_file():
        return None
    micro_batches, this_rollout = 0, {}
    for line in re.split(r"[\r\n]+", log_path.read_text(encoding="utf-8", errors="replace")):
        done = _TRAIN_EPOCH_DONE.search(line)
        if done:
            # tqdm prints a finished bar more than once; one entry per epoch of this rollout.
            this_rollout[int(done.group(1))] = int(done.group(2))
        elif "Global step" in line:
            micro_batches += sum(this_rollout.values())
            this_rollout = {}
    return micro_batches // (budget.train_batch_size // budget.micro_batch_size)


def training_curve(log_path: Path) -> list[dict]:
    """Per-rollout metrics from a Ray trainer's log ("Global step N: {...}" lines); unparsable lines are skipped."""
    import ast

    curve = []
    if not log_path.is_file():
        return curve
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _GLOBAL_STEP_LINE.search(line)
        if not match:
            continue
        try:
            metrics = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            continue
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        curve.append({"global_step": int(match.group(1)), **numeric})
    return curve


# --------------------------------------------------------------------------- machine description


def machine_info() -> dict:
    """What the numbers were measured on; the load average matters on shared machines."""
    import torch

    cpu_name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "device": "cpu" if on_cpu() else "cuda",
        "load_average_1_5_15": list(load) if load else None,
    }


# --------------------------------------------------------------------------- the job


@dataclass
class StageRecord:
    seconds: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def resolve_budget(options: argparse.Namespace) -> Budget:
    budget = BUDGETS[options.budget]
    distill = budget.distill
    overrides = {
        "n_prompts": options.n_prompts,
        "rollout_batch_size": options.rollout_batch_size,
        "train_batch_size": options.train_batch_size,
    }
    distill = replace(distill, **{k: v for k, v in overrides.items() if v is not None})
    if options.train_batch_size is not None and options.train_batch_size < distill.micro_batch_size:
        distill = replace(distill, micro_batch_size=options.train_batch_size)
    budget = replace(budget, distill=distill)
    if options.n_test is not None:
        budget = replace(budget, n_test=options.n_test)
    return with_difficulty_lengths(budget, options.difficulty)


def with_difficulty_lengths(budget: Budget, difficulty: str) -> Budget:
    """Generation and sequence lengths that fit the difficulty's longest problems (docs/toy_task.md)."""
    from tsdkd_plugin.toy.evaluate import MAX_NEW_TOKENS_BY_DIFFICULTY

    max_len = 192 if difficulty == "hard" else 128
    return replace(
        budget,
        teacher=replace(budget.teacher, max_len=max_len),
        student=replace(budget.student, max_len=max_len),
        distill=replace(budget.distill, max_new_tokens=MAX_NEW_TOKENS_BY_DIFFICULTY[difficulty], max_len=max_len),
    )


def validate_options(options: argparse.Namespace) -> Budget:
    """Every check that needs no model: raises JobError with one sentence."""
    try:
        arith_task.check_task_name(options.task)
        arith_task.get_difficulty(options.difficulty)
    except ValueError as error:
        raise JobError(str(error)) from None
    if options.budget not in BUDGETS:
        raise JobError(f"unknown budget {options.budget!r}; valid budgets: {', '.join(BUDGETS)}")
    for name in ("n_prompts", "n_test", "rollout_batch_size", "train_batch_size"):
        value = getattr(options, name)
        if value is not None and value <= 0:
            raise JobError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    budget = resolve_budget(options)
    check_budget(budget)
    return budget


def evaluate_models(models: Mapping[str, Path], prompts_file: Path, budget: Budget) -> dict[str, dict]:
    from tsdkd_plugin.toy.evaluate import evaluate_model, format_result_line

    results = {}
    for name, model_dir in models.items():
        result = evaluate_model(
            model_dir, prompts_file, max_new_tokens=budget.distill.max_new_tokens,
            batch_size=budget.eval_batch_size, desc=f"evaluating {name}",
        )
        print("  " + format_result_line(name, result), flush=True)
        results[name] = {**result.to_dict(), "dir": str(model_dir)}
    return results


def run_job(options: argparse.Namespace) -> dict:
    job_started = time.time()
    budget = validate_options(options)
    run_dir = Path(options.run_dir).resolve()
    cache_dir = Path(options.cache_dir).expanduser().resolve() if options.cache_dir else None
    timeout_s = budget.stage_timeout_s

    banner(f"TSD-KD toy job: budget {budget.name}, difficulty {options.difficulty}, seed {options.seed}")
    print(f"  {budget.summary()}")
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"  {run_dir} exists: its previous results are replaced (pass --run-dir to keep them)")
    run_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, StageRecord] = {}
    load_at_start = machine_info()["load_average_1_5_15"]

    banner("1/6 task data")
    started = time.time()
    data_dir = fresh_stage_dir(run_dir / "data")
    files = write_task_data(data_dir, options.difficulty, budget.distill.n_prompts, budget.n_val, budget.n_test)
    stages["task_data"] = StageRecord(time.time() - started, f"{data_dir}")
    print(f"  {budget.distill.n_prompts} train prompts, {budget.n_val} val, {budget.n_test} test -> {data_dir}")

    models: dict[str, Path] = {}
    for number, role, recipe in ((2, "teacher", budget.teacher), (3, "student", budget.student)):
        banner(f"{number}/6 {role}: OpenRLHF train_sft on worked solutions ({recipe.steps} steps, cached)")
        started = time.time()
        path, built = trained_model_dir(
            recipe, options.difficulty, cache_dir, work_dir=run_dir / "logs", timeout_s=timeout_s,
            verbose=options.verbose,
        )
        models[role] = path
        note = "trained now" if built else "reused from the cache"
        stages[role] = StageRecord(time.time() - started, note, {"dir": str(path), "steps": recipe.steps})
        print(f"  {role}: {path} ({note}, {time.time() - started:.0f} s)")

    banner(f"4/6 TSD-KD: python -m openrlhf.cli.train_tsdkd ({budget.distill.optimizer_steps} optimizer steps)")
    started = time.time()
    stage_dir = fresh_stage_dir(run_dir / "tsdkd")
    distilled_dir, result = run_tsdkd(
        budget.distill, {}, teacher_dir=models["teacher"], student_dir=models["student"],
        prompts_file=files["prompts_train"], stage_dir=stage_dir, seed=options.seed, timeout_s=timeout_s,
        verbose=options.verbose,
    )
    steps_taken = logged_optimizer_steps(stage_dir / "train.log", budget.distill)
    stages["tsdkd"] = StageRecord(
        time.time() - started, f"{steps_taken} optimizer steps taken (counted in the log)",
        {"command": result.command, "log": result.log, "optimizer_steps_logged": steps_taken},
    )
    print(f"  distilled student: {distilled_dir} ({result.seconds:.0f} s)")

    banner(f"5/6 evaluation: greedy accuracy on the held-out test split ({budget.n_test} problems)")
    started = time.time()
    evaluations = evaluate_models(
        {"teacher": models["teacher"], "student (initial)": models["student"], "student (TSD-KD)": distilled_dir},
        files["prompts_test"], budget,
    )
    stages["evaluation"] = StageRecord(time.time() - started)

    banner("6/6 report")
    from tsdkd_plugin.toy.report import write_job_report

    results = {
        "command": [PROG, *options.argv],
        "budget": asdict(budget),
        "options": {k: v for k, v in vars(options).items() if k != "argv"},
        "machine": {**machine_info(), "load_average_at_start": load_at_start},
        "stages": {name: asdict(record) for name, record in stages.items()},
        "evaluations": evaluations,
        "training_curve": training_curve(stage_dir / "train.log"),
        "teacher_margin_ok": evaluations["teacher"]["accuracy"] - evaluations["student (initial)"]["accuracy"]
        >= MIN_TEACHER_MARGIN,
        "wall_seconds": time.time() - job_started,
    }
    paths = write_job_report(results, run_dir)
    print(f"  report: {paths['markdown']}\n  plot:   {paths['plot']}\n  json:   {paths['json']}")
    print_summary(results)
    return results


def print_summary(results: Mapping) -> None:
    evaluations = results["evaluations"]
    banner("summary")
    for name, evaluation in evaluations.items():
        print(f"  {name:<20} {evaluation['accuracy']:6.1%}  ({evaluation['correct']}/{evaluation['n']})")
    initial, distilled = evaluations["student (initial)"]["accuracy"], evaluations["student (TSD-KD)"]["accuracy"]
    print(f"  TSD-KD changed the student's accuracy by {100 * (distilled - initial):+.1f} points")
    if not results["teacher_margin_ok"]:
        print(f"  note: the teacher is less than {MIN_TEACHER_MARGIN:.0%} ahead of the initial student at this budget")
    print(f"  wall time {results['wall_seconds'] / 60:.1f} min")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tiny teacher and student on the built-in arithmetic task, TSD-KD through "
                    "`python -m openrlhf.cli.train_tsdkd`, evaluation on the held-out test split and a report.",
    )
    # No argparse `choices` for task/difficulty/budget: an unknown value gets this job's own one
    # sentence naming the valid ones (validate_options), as every other bad input does.
    parser.add_argument("--budget", default="default", help=f"one of {', '.join(BUDGETS)} (default: default)")
    parser.add_argument("--run-dir", default="runs/default", help="where data, logs, models and the report go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distillation stage (sampling, data order)")
    parser.add_argument("--task", default="arith", help=f"built-in task: {', '.join(TASK_NAMES)}")
    parser.add_argument("--difficulty", default="easy", help=f"one of {', '.join(DIFFICULTIES)}")
    parser.add_argument("--cache-dir", default=None, help="fixture cache root (default: $TSDKD_CACHE or ~/.cache/tsdkd_plugin)")
    parser.add_argument("--n-prompts", type=int, default=None, help="override: distillation prompts from the train split")
    parser.add_argument("--n-test", type=int, default=None, help="override: size of the test split")
    parser.add_argument("--rollout-batch-size", type=int, default=None, help="override: prompts per rollout")
    parser.add_argument("--train-batch-size", type=int, default=None, help="override: sequences per optimizer step")
    parser.add_argument("--verbose", action="store_true", help="stream every subprocess's full output")
    return parser


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks run: the running stage's process group is
    stopped and a half-built cache entry's temp directory is removed."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_arg_parser().parse_args(argv)
    options.argv = argv
    exit_on_sigterm()
    try:
        run_job(options)
    except JobError as error:
        print(f"\n{PROG}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
