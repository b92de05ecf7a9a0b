"""Budgets, fixed in optimizer steps and samples, never in seconds.

Accuracy on the built-in task jumps late in training (docs/toy_task.md), so a wall-clock budget
would make results depend on the machine's load. A `Budget` names the teacher's and the initial
student's SFT recipes and the distillation budget every compared method gets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tsdkd_plugin.experiments.runner import JobError
from tsdkd_plugin.toy import arith_task

# The task splits and the SFT runs use this seed whatever --seed says: teacher, student and the
# test split are then the same for every distillation seed (and shared through the cache).
TASK_DATA_SEED = 0
# Longest worked solution per difficulty is 44 / 52 / 95 tokens (docs/toy_task.md); the margin lets
# a model that rambles past the answer still be read correctly. Rollouts and evaluation use the same.
MAX_NEW_TOKENS_BY_DIFFICULTY = {"easy": 64, "medium": 72, "hard": 128}


@dataclass(frozen=True)
class SFTRecipe:
    """One `openrlhf.cli.train_sft` run on the task's worked solutions (teacher or initial student)."""

    role: str  # "teacher" or "student": what the trained model is for (names its cache entry)
    model: str  # the untrained toy model it starts from (tsdkd_plugin.toy.models.MODEL_RECIPES)
    n_train: int  # distinct training problems (rows of sft_train.jsonl)
    epochs: int
    batch_size: int  # sequences per optimizer step (micro batch = batch: no accumulation)
    lr: float
    lr_scheduler: str = "cosine_with_min_lr"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    seed: int = 0
    max_len: int = 128
    # Intra-op threads of the training process on CPU, fixed whatever the machine's core count:
    # float sums are split by thread, so another count gives other weights (runner.TRAINING_THREADS).
    threads: int = 2

    @property
    def steps(self) -> int:
        # OpenRLHF's dataloader drops the last partial batch.
        return self.n_train // self.batch_size * self.epochs


@dataclass(frozen=True)
class StudentSelection:
    """The initial student is one checkpoint of its SFT run, chosen on the validation split: the one
    whose greedy accuracy is nearest `target_ratio` of the teacher's.

    Accuracy on the task jumps late in an SFT run (docs/toy_task.md), and where exactly it jumps
    depends on the processor's float rounding: a fixed step count gave a student at 0.81 of its teacher
    on an Intel Xeon and at 0.92 on an AMD EPYC. Choosing among the run's checkpoints on validation
    gives the regime the same student/teacher ratio on every kind of processor."""

    every: int  # an HF copy of the student every `every` optimizer steps ...
    first_step: int  # ... is kept from this step on; the run's final model is a candidate too
    target_ratio: float  # student / teacher greedy accuracy on the validation split aimed at

    def describe(self) -> str:
        return (
            f"the checkpoint of its SFT run (one every {self.every} steps from step {self.first_step}, and the "
            f"final model) whose greedy validation accuracy is nearest {self.target_ratio:g} of the teacher's"
        )


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
    difficulty: str = "easy"  # of the task (tsdkd_plugin.toy.arith_task.DIFFICULTIES)
    eval_batch_size: int = 256
    # A stage that runs longer than this is stopped (a hung Ray job must not block forever).
    stage_timeout_s: int = 3600
    # None: the initial student is the final model of its SFT run.
    student_selection: StudentSelection | None = None

    def student_summary(self) -> str:
        if self.student_selection is None:
            return f"student SFT {self.student.steps} steps"
        return f"student: {self.student.steps} SFT steps, {self.student_selection.describe()}"

    def summary(self) -> str:
        d = self.distill
        return (
            f"teacher SFT {self.teacher.steps} steps, {self.student_summary()}, "
            f"distillation {d.n_prompts} prompts x {d.samples_per_prompt} samples = {d.optimizer_steps} "
            f"optimizer steps, difficulty {self.difficulty}, test split {self.n_test} problems"
        )


# Sizes, SFT budgets and difficulty come from the calibration in docs/reproduction.md
# ("Calibration"; python -m tsdkd_plugin.experiments.calibrate). The teacher and the distillation
# budget are shared by both regimes; only the initial student differs.
_TEACHER = SFTRecipe(role="teacher", model="teacher-3layer", n_train=16000, epochs=4, batch_size=32, lr=2e-3, seed=1)
# Paper-like: a student at 0.55-0.8 of its teacher's accuracy that finishes its answers. Where in its
# run the student's accuracy climbs depends on the processor: with 1,250 steps it ended at 74.8% on an
# Intel Xeon and at 38.4% on an AMD EPYC. A 2,000-step run climbs gradually, on the AMD EPYC from 5% at
# step 500 through 52% at 1,000 to 95% (benchmarks/toy_results/calibration.md,
# student-3layer-narrow-2000-amd); its copy nearest the middle of the range (0.675) is the student.
_PAPER_LIKE_STUDENT = SFTRecipe(
    role="student", model="student-3layer-narrow", n_train=64000, epochs=1, batch_size=32, lr=2e-3, seed=2
)
_PAPER_LIKE_SELECTION = StudentSelection(every=50, first_step=500, target_ratio=0.675)
# Weak student: the earlier default, far below its teacher (most of its own samples are wrong).
_WEAK_STUDENT = SFTRecipe(role="student", model="student", n_train=48000, epochs=1, batch_size=32, lr=3e-3, seed=2)
# The learning rate is the main job's (the comparison tunes every method's own): the one the
# comparison chose for TSD-KD (paper preset) on the paper-like regime's validation split, 3e-5
# (71.8% against 70.2% at 1e-5, 65.6% at 1e-4, 55.4% at 3e-4; runs/compare20, docs/reproduction.md).
_DISTILL = DistillBudget(
    n_prompts=512, samples_per_prompt=4, rollout_batch_size=64, train_batch_size=64, micro_batch_size=16, lr=3e-5
)

BUDGETS: dict[str, Budget] = {
    # A couple of minutes end to end; what the test suite runs. Models learn little: it proves
    # the plumbing (every stage, the real CLIs, the cache, the report), not the method.
    "smoke": Budget(
        name="smoke",
        teacher=SFTRecipe(role="teacher", model="teacher", n_train=256, epochs=1, batch_size=32, lr=2e-3, seed=1),
        student=SFTRecipe(role="student", model="student", n_train=128, epochs=1, batch_size=32, lr=3e-3, seed=2),
        distill=DistillBudget(
            n_prompts=16,
            samples_per_prompt=2,
            rollout_batch_size=8,
            train_batch_size=16,
            micro_batch_size=8,
            lr=1e-3,
        ),
        n_test=16,
        n_val=16,
        stage_timeout_s=900,
        # The paper-like regime's way of choosing its student, on a 4-step run.
        student_selection=StudentSelection(every=1, first_step=2, target_ratio=0.675),
    ),
    "paper-like": Budget(
        name="paper-like",
        teacher=_TEACHER,
        student=_PAPER_LIKE_STUDENT,
        student_selection=_PAPER_LIKE_SELECTION,
        distill=_DISTILL,
        n_val=500,
        n_test=500,
    ),
    "weak-student": Budget(
        name="weak-student", teacher=_TEACHER, student=_WEAK_STUDENT, distill=_DISTILL, n_val=500, n_test=500
    ),
    # The paper-like regime with three times the distillation prompts (96 optimizer steps): its 32
    # steps stop the best method (GKD) while its validation accuracy still climbs; at 96 it has
    # flattened (issue 13; docs/reproduction.md). The same teacher,
    # student and splits (a split depends only on its own size, so the first 512 prompts are the same).
    "paper-like-long": Budget(
        name="paper-like-long",
        teacher=_TEACHER,
        student=_PAPER_LIKE_STUDENT,
        student_selection=_PAPER_LIKE_SELECTION,
        distill=replace(_DISTILL, n_prompts=3 * _DISTILL.n_prompts),
        n_val=500,
        n_test=500,
    ),
}
DEFAULT_BUDGET = "paper-like"


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
    selection = budget.student_selection
    if selection is not None and not (
        selection.every >= 1 and 0 < selection.first_step <= budget.student.steps and 0 < selection.target_ratio < 1
    ):
        raise JobError(
            f"the student selection (every {selection.every}, from step {selection.first_step}, target ratio "
            f"{selection.target_ratio}) needs every >= 1, a first step in 1..{budget.student.steps} (the student's "
            "SFT steps) and a target ratio strictly between 0 and 1"
        )
    if d.micro_batch_size % d.samples_per_prompt or d.train_batch_size % d.micro_batch_size:
        raise JobError(
            f"the micro batch ({d.micro_batch_size}) must be a multiple of the samples per prompt "
            f"({d.samples_per_prompt}) and divide the train batch ({d.train_batch_size})"
        )


def with_difficulty_lengths(budget: Budget, difficulty: str) -> Budget:
    """The budget on `difficulty`, with generation and sequence lengths that fit its longest problems
    (docs/toy_task.md)."""
    max_len = 192 if difficulty == "hard" else 128
    return replace(
        budget,
        difficulty=difficulty,
        teacher=replace(budget.teacher, max_len=max_len),
        student=replace(budget.student, max_len=max_len),
        distill=replace(budget.distill, max_new_tokens=MAX_NEW_TOKENS_BY_DIFFICULTY[difficulty], max_len=max_len),
    )


def write_task_data(out_dir: Path, difficulty: str, n_train: int, n_val: int, n_test: int) -> dict[str, Path]:
    return arith_task.write_task_files(
        out_dir,
        difficulty=difficulty,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=TASK_DATA_SEED,
    )
