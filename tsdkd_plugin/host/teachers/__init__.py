"""The teacher: one interface, one implementation per placement.

    base.py       the interface (`DriverTeacher`, `ActorTeacher`), what crosses it (`StepSamples`,
                  `MicroBatch`, the wire dict), `ShippedSignals` (the actor side of every teacher
                  outside the policy actors), the stop errors
    scoring.py    a teacher model in this process scoring samples (OpenRLHF `Actor`, sparse signals)
    ray_group.py  --teacher.placement separate: `TeacherModelActor` (the Ray group), `RayGroupTeacher`
                  (student candidates, then the group's sparse signals; bounded timeout and retries)
    colocated.py  --teacher.placement colocate: `ColocatedModel` (in each policy actor; hidden states +
                  output embedding, dense), `ColocatedTeacher` (its sequence scores at experience time)

The experience maker (host/trainer.py) calls `driver_teacher(...).signals(samples, times)` once per
step; the training step (host/actor.py) enters `actor_teacher(...).signals(micro_batch)` once per
micro-batch. Neither knows where the teacher runs: `driver_teacher` and `actor_teacher` below are
the only places that choose by placement (and host/launch.py, which starts a Ray group only for a
teacher that has one, `TeacherConfig.has_own_group`).

What crosses the interface
--------------------------
Driver side, per step: `StepSamples` (sequences [B, T], action_mask [B, A], attention_mask [B, T], one
entry per rollout micro-batch) in; per micro-batch a dict of CPU tensors in the wire format out
(`TeacherSignals.to_wire()`: `topk_logprobs`, `topk_ids`, `tail_logprob`, `entropy`, `candidate_ids`,
`candidate_logprobs` [B, A, ...] and `sequence_scores` [B]; an in-process teacher sends
`sequence_scores` only). Phases are timed into `tsdkd/time_<phase>` (`timed`); a teacher that cannot
answer raises a `TrainingStoppedError` whose message is the run's last line (what failed, how to
resume), e.g. `TeacherUnavailableError` after its retry budget.
Actor side, per micro-batch: `MicroBatch` (the training device's sequences, attention mask, number of
response positions, and the dict that came with the experience) in; the objective's `TeacherSignals`
out, valid inside a `with` block.

The teacher behind an inference server (--teacher.remote_url)
----------------------------------------------------------
    server/       `ServerDriverTeacher`: student candidates from the policy group, then the prompt
                  log-probs of each sample from a vLLM OpenAI-compatible server (HTTP, bounded pool,
                  per-request timeout, retries with backoff), turned into the same sparse signals the
                  Ray group ships (docs/server_teacher.md: the approximations and their bounds). It has
                  no Ray group (`TeacherConfig.has_own_group` is False); its actor side is
                  `ShippedSignals`. The server's model and tokenizer are checked against the student's
                  by the preflight (host/preflight/models.py), before any Ray worker starts.

Adding another teacher: its options are fields of `host/run_config.py` `TeacherConfig` (the flags are
generated from them), a `DriverTeacher` here (time its phases with `timed`, stop with a
`TrainingStoppedError` subclass carrying `checkpoint.resume_hint`), and one branch in each factory below.
"""

from __future__ import annotations

from openrlhf.utils.deepspeed import DeepspeedStrategy

from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers.base import (
    ActorTeacher,
    DriverTeacher,
    MicroBatch,
    ShippedSignals,
    StepSamples,
    TeacherFailedError,
    TeacherUnavailableError,
)
from tsdkd_plugin.host.teachers.colocated import ColocatedModel, ColocatedTeacher
from tsdkd_plugin.host.teachers.ray_group import RayGroupTeacher, TeacherModelActor
from tsdkd_plugin.host.teachers.server import ServerDriverTeacher

__all__ = [
    "ActorTeacher",
    "DriverTeacher",
    "MicroBatch",
    "ShippedSignals",
    "StepSamples",
    "TeacherFailedError",
    "TeacherModelActor",
    "TeacherUnavailableError",
    "actor_teacher",
    "driver_teacher",
]


def driver_teacher(
    run: RunConfig,
    *,
    policy_group,
    teacher_group,
    duplicate_factor: int,
    ckpt_path: str,
    shared_vocab_size: int | None = None,
) -> DriverTeacher:
    """The experience maker's teacher. `teacher_group`: the Ray group host/launch.py started for a
    teacher that has one (else None); `duplicate_factor`: policy actors per ring-attention / tensor-
    parallel group (they answer the same chunk); `ckpt_path`: where a stop's resume hint points;
    `shared_vocab_size`: the token ids both models share (the preflight's; a served teacher needs it)."""
    if run.teacher.served:
        if shared_vocab_size is None:
            raise ValueError("a teacher served at --teacher.remote_url needs the shared vocabulary size")
        return ServerDriverTeacher(
            policy_group,
            run,
            shared_vocab_size=shared_vocab_size,
            duplicate_factor=duplicate_factor,
            ckpt_path=ckpt_path,
        )
    if run.teacher.placement == "colocate":
        return ColocatedTeacher(policy_group, duplicate_factor=duplicate_factor)
    return RayGroupTeacher(policy_group, teacher_group, run, duplicate_factor=duplicate_factor, ckpt_path=ckpt_path)


def actor_teacher(run: RunConfig, strategy: DeepspeedStrategy, shared_vocab_size: int) -> ActorTeacher:
    """The training step's teacher, made in each policy actor once its own DeepSpeed engine is up (a
    colocated teacher is loaded here, beside the student; a Ray group's or a server's signals were shipped)."""
    if run.teacher.placement == "colocate":
        return ColocatedModel.load(strategy, run, shared_vocab_size)
    return ShippedSignals(temperature=run.objective.temperature)
