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

Adding a teacher served by an inference server (e.g. vLLM's OpenAI-compatible endpoint with prompt
log-probs, top-K per position)
-----------------------------------------------------------------------------------------------
1. Its options are fields of `host/run_config.py` `TeacherConfig` (e.g. `remote_url`, a pool size):
   the `--teacher.*` flags are generated from them, and each value is checked in `__post_init__`.
   A server-served teacher has no Ray group (`has_own_group` is False), so host/launch.py starts none.
2. A module here with a `DriverTeacher` whose `signals(samples, times)`:
   - asks the policy group for the student's top-k candidates, as `RayGroupTeacher` does
     (`run_on_policy_group(policy_group, STUDENT_CANDIDATES, samples, duplicate_factor)` under
     `timed(times, "student_candidates")`);
   - under `timed(times, "teacher_scoring")`, requests the prompt log-probs of each sample's
     prompt + response from the server (batched, a bounded pool, each request with a timeout,
     retried with backoff on transient failures only), and builds the same sparse signals the
     Ray group ships: `TeacherSignals(topk_logprobs=..., topk_ids=..., tail_logprob=..., entropy=...,
     candidate_ids=..., candidate_logprobs=..., sequence_scores=..., temperature=...)`, then
     `.to_wire()` (per micro-batch, the samples' order);
   - after the retry budget raises `TeacherUnavailableError` (a deterministic refusal:
     `TeacherFailedError`) with `checkpoint.resume_hint`, so the run stops with the checkpoint intact.
3. Its actor side is `ShippedSignals`, as for the Ray group: nothing changes in the policy actor.
4. One branch in each of the two factories below. The server's model and tokenizer are checked
   against the student's by the preflight (host/preflight/models.py), before any rollout.
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

__all__ = ["ActorTeacher", "DriverTeacher", "MicroBatch", "ShippedSignals", "StepSamples", "TeacherFailedError",
           "TeacherModelActor", "TeacherUnavailableError", "actor_teacher", "driver_teacher"]


def driver_teacher(run: RunConfig, *, policy_group, teacher_group, duplicate_factor: int,
                   ckpt_path: str) -> DriverTeacher:
    """The experience maker's teacher. `teacher_group`: the Ray group host/launch.py started for a
    teacher that has one (else None); `duplicate_factor`: policy actors per ring-attention / tensor-
    parallel group (they answer the same chunk); `ckpt_path`: where a stop's resume hint points."""
    if run.teacher.placement == "colocate":
        return ColocatedTeacher(policy_group, duplicate_factor=duplicate_factor)
    return RayGroupTeacher(policy_group, teacher_group, run, duplicate_factor=duplicate_factor, ckpt_path=ckpt_path)


def actor_teacher(run: RunConfig, strategy: DeepspeedStrategy, shared_vocab_size: int) -> ActorTeacher:
    """The training step's teacher, made in each policy actor once its own DeepSpeed engine is up (a
    colocated teacher is loaded here, beside the student)."""
    if run.teacher.placement == "colocate":
        return ColocatedModel.load(strategy, run, shared_vocab_size)
    return ShippedSignals(temperature=run.objective.temperature)
