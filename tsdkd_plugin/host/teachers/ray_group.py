"""The teacher as a separate Ray actor group (`--teacher.placement separate`): own GPUs, sparse transport.

Like upstream's `ReferenceModelActor`, each `TeacherModelActor` holds one DeepSpeed-wrapped OpenRLHF
`Actor` (any HF causal LM) in its own placement group and answers batched `forward` calls. Its
driver-side half, `RayGroupTeacher`, first asks the policy group for the student's top-k candidates
per response position, then the teacher group for the sparse signals (teachers/scoring.py), each
attempt bounded by `--teacher.timeout_s` and retried `--teacher.max_retries` times after a transient
failure (`get_with_retries`); then the run stops with one sentence and the latest checkpoint intact
(docs/reliability.md). The actor-side half is `ShippedSignals` (teachers/base.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
import torch

from openrlhf.trainer.ray.launcher import BaseModelActor
from openrlhf.utils.deepspeed import DeepspeedStrategy
from openrlhf.utils.logging_utils import init_logger

from tsdkd_plugin.host.checkpoint import resume_hint
from tsdkd_plugin.host.device import where_am_i
from tsdkd_plugin.host.faults import inject_teacher_forward_fault, worker_error_line
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers.base import (
    STUDENT_CANDIDATES,
    DriverTeacher,
    StepSamples,
    TeacherFailedError,
    TeacherUnavailableError,
    run_on_policy_group,
    timed,
)
from tsdkd_plugin.host.teachers.scoring import load_causal_lm_for_scoring, score_samples

logger = init_logger(__name__)

# Pause between teacher attempts (capped by the timeout): a restarting node or a transient
# object-store error gets a moment; a dead actor fails again at once, so the total stays bounded.
TEACHER_RETRY_PAUSE_S = 2.0


@ray.remote(num_gpus=1)
class TeacherModelActor(BaseModelActor):
    def init_model_from_pretrained(
        self, strategy: DeepspeedStrategy, pretrain: str, run: RunConfig, shared_vocab_size: int
    ) -> None:
        """`run`: the objective the signals are made for and the teacher's options (validated by the CLI);
        `shared_vocab_size`: the token ids both models share (the preflight's)."""
        self._setup_distributed(strategy)
        self.model = load_causal_lm_for_scoring(strategy, pretrain, offload=run.teacher.offload)
        self.run = run
        self.shared_vocab_size = shared_vocab_size

    def placement(self) -> dict:
        return where_am_i()

    def forward(self, sequences, action_mask, attention_mask, candidate_ids=None) -> dict[str, torch.Tensor]:
        inject_teacher_forward_fault()  # test-only (TSDKD_FAULT_INJECT, host/faults.py); no-op otherwise
        return score_samples(
            self.model, self.strategy.args.ds.zero_stage, self.run.objective, self.shared_vocab_size,
            sequences, action_mask, attention_mask, candidate_ids,
        )  # fmt: skip


# ----------------------------------------------------------------------------- bounded retries


class RetriesExhausted(Exception):
    """Every attempt of `get_with_retries` failed; carries the count and the last error."""

    def __init__(self, attempts: int, last_error: BaseException):
        super().__init__(attempts, last_error)
        self.attempts, self.last_error = attempts, last_error


def first_line(error: BaseException, limit: int = 300) -> str:
    """A Ray error's str() is often a multi-line traceback; its first line says what happened."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_transient(error: BaseException) -> bool:
    """Can the same call succeed when tried again? Yes for what happens to a process, a node or a
    connection (a dead or restarting actor, a timeout, a lost object or connection); no for an
    exception the teacher's own code raised (a ValueError stays a ValueError on the same batch)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return isinstance(error.cause, (ConnectionError, TimeoutError))
    return isinstance(error, (ray.exceptions.RayError, TimeoutError))


def get_with_retries(
    submit: Callable[[], list],
    *,
    timeout_s: float,
    max_retries: int,
    what: str,
    get: Callable = ray.get,
    sleep: Callable[[float], None] = time.sleep,
) -> list:
    """get(submit(), timeout=timeout_s), re-submitting after a transient failure (`is_transient`),
    at most max_retries times; then RetriesExhausted. Any other error is raised at once.
    Total time <= (max_retries + 1) x (timeout_s + pause)."""
    last_error = None
    for attempt in range(1, max_retries + 2):
        refs = submit()
        try:
            return get(refs, timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as error:
            if not is_transient(error):
                raise
            last_error = error
            for ref in refs:  # best effort: drop queued work of a hung attempt
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            logger.warning(f"{what}: attempt {attempt}/{max_retries + 1} failed ({first_line(error)})")
            if attempt <= max_retries:
                sleep(min(TEACHER_RETRY_PAUSE_S, timeout_s))
    raise RetriesExhausted(max_retries + 1, last_error)


# ----------------------------------------------------------------------------- the driver's side


class RayGroupTeacher(DriverTeacher):
    """Student candidates from the policy group, then the teacher group's sparse signals."""

    def __init__(self, policy_group, teacher_group, run: RunConfig, *, duplicate_factor: int, ckpt_path: str):
        self.policy_group, self.teacher_group = policy_group, teacher_group
        self.teacher = run.teacher
        self.duplicate_factor = duplicate_factor  # policy actors per ring-attention / tensor-parallel group
        self.ckpt_path = ckpt_path  # where the resume hint of a stop points

    def signals(self, samples: StepSamples, times: dict[str, float]) -> list[dict[str, torch.Tensor]]:
        with timed(times, "student_candidates"):
            candidates = run_on_policy_group(self.policy_group, STUDENT_CANDIDATES, samples, self.duplicate_factor)
        with timed(times, "teacher_scoring"):  # forward + sparse signals + transport
            return self.group_forward(candidates, samples)

    def group_forward(self, candidates: list[torch.Tensor], samples: StepSamples) -> list[dict[str, torch.Tensor]]:
        """The teacher group's signals per micro-batch; each attempt bounded by --teacher.timeout_s and
        retried --teacher.max_retries times; then the run stops with TeacherUnavailableError.
        (A dead teacher actor is not restarted: its retries fail at once, and the run stops.)"""
        teacher = self.teacher

        def submit():
            return self.teacher_group.async_run_method_batch(
                method_name="forward", candidate_ids=candidates, **samples.as_batch()
            )

        try:
            results = get_with_retries(submit, timeout_s=teacher.timeout_s, max_retries=teacher.max_retries,
                                       what="teacher forward")  # fmt: skip
        except ray.exceptions.RayTaskError as error:  # raised by the teacher's code: reported at once
            raise TeacherFailedError(
                f"TSD-KD stopped: the teacher group (--teacher.model_name_or_path {teacher.model_name_or_path}) "
                f"raised {worker_error_line(error)}; a retry would raise it again, so it was not retried; fix the "
                f"cause, then {resume_hint(self.ckpt_path)}"
            ) from None
        except RetriesExhausted as exhausted:
            raise TeacherUnavailableError(
                f"TSD-KD stopped: the teacher group (--teacher.model_name_or_path {teacher.model_name_or_path}) "
                f"failed to return its signals {exhausted.attempts} times (--teacher.max_retries "
                f"{teacher.max_retries}, --teacher.timeout_s {teacher.timeout_s:g} each); last error: "
                f"{first_line(exhausted.last_error)}; {resume_hint(self.ckpt_path)}"
            ) from None
        # One list per teacher actor (the group runs without ring attention / tensor parallelism).
        return [signals for chunk in results for signals in chunk]
