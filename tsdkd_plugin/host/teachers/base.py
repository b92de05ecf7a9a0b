"""The teacher interface: what the driver asks for a step's samples, what the actor gets per micro-batch.

A teacher has two halves, in two kinds of process:

- `DriverTeacher`, in the trainer's Ray actor (the driver of the step loop). Once per step the
  experience maker hands it the step's samples (`StepSamples`: one entry per rollout micro-batch,
  as the policy group will train on them) and gets back, per micro-batch, a dict of CPU tensors in
  the wire format (`TeacherSignals.to_wire()` keys, host/experience.py `SIGNAL_KEYS`). The dict must
  hold `sequence_scores` [B] (the ranking score, also logged as `teacher_score`); a teacher whose
  per-token signals are made by the driver-side half ships them in it too. The dict rides with the
  experience to the policy actors (`experience.tsdkd`).
- `ActorTeacher`, in each policy actor. Once per micro-batch the training step hands it a
  `MicroBatch` (its sequences, and the dict that came with the experience) and gets the
  objective's `TeacherSignals`, for the duration of a `with` block (a colocated model's output
  embedding exists only while gathered under ZeRO-3).
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
import torch

from tsdkd_plugin.host.faults import TrainingStoppedError
from tsdkd_plugin.objective import TeacherSignals

# Methods of the policy actor (host/actor.py TSDKDPolicyActorImpl) that driver-side teachers call through
# upstream's RayActorGroup.async_run_method_batch, which takes a method name.
STUDENT_CANDIDATES = "student_candidates"
IN_PROCESS_TEACHER_SIGNALS = "in_process_teacher_signals"


class TeacherUnavailableError(TrainingStoppedError):
    """The teacher failed, or did not answer in time, on every attempt."""


class TeacherFailedError(TrainingStoppedError):
    """The teacher raised an error that a retry would raise again."""


@dataclass(frozen=True)
class StepSamples:
    """One step's student samples as the policy group will train on them: one entry per rollout
    micro-batch. `sequences` [B, T] are [prompt (left-padded) | response (right-padded)], the
    response in the last A = action_mask.shape[1] positions; `attention_mask` [B, T]; `action_mask`
    [B, A] marks the response tokens."""

    sequences: list[torch.Tensor]
    action_mask: list[torch.Tensor]
    attention_mask: list[torch.Tensor]

    def as_batch(self) -> dict[str, list[torch.Tensor]]:
        """Keyword arguments of upstream's `RayActorGroup.async_run_method_batch` (one list entry per
        micro-batch, spread over the group's actors)."""
        return {"sequences": self.sequences, "action_mask": self.action_mask, "attention_mask": self.attention_mask}

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass(frozen=True)
class MicroBatch:
    """One training micro-batch as the actor-side teacher sees it (tensors on the training device)."""

    sequences: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    num_actions: int  # A: the response positions are the last A
    shipped: dict[str, torch.Tensor]  # what the driver-side teacher sent with the experience (+ group_ids)


@contextlib.contextmanager
def timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """Seconds of one phase of the experience step, logged as `tsdkd/time_<phase>` (upstream sums its own
    `timing/*` into step_total, so these are TSD-KD's own keys)."""
    started = time.time()
    try:
        yield
    finally:
        times[f"tsdkd/time_{phase}"] = time.time() - started


def run_on_policy_group(policy_group, method: str, samples: StepSamples, duplicate_factor: int) -> list:
    """One result per micro-batch from a policy-actor method, in the samples' order. Actors that share a
    ring-attention / tensor-parallel group answer the same chunk; one copy is kept (as upstream's
    RemoteExperienceMaker._flatten_results does)."""
    refs = policy_group.async_run_method_batch(method_name=method, **samples.as_batch())
    return list(itertools.chain.from_iterable(ray.get(refs)[::duplicate_factor]))


class DriverTeacher(abc.ABC):
    """The teacher as the experience maker sees it (in the trainer's Ray actor, once per step)."""

    @abc.abstractmethod
    def signals(self, samples: StepSamples, times: dict[str, float]) -> list[dict[str, torch.Tensor]]:
        """Per micro-batch of `samples`, the teacher's signals in the wire format (CPU tensors,
        `sequence_scores` always). Records the seconds of its phases in `times` (`timed`). A teacher
        that cannot answer raises a `TrainingStoppedError` (one sentence: what failed, how to resume)."""


class ActorTeacher(abc.ABC):
    """The teacher as the training step sees it (in each policy actor, once per micro-batch)."""

    @abc.abstractmethod
    def signals(self, batch: MicroBatch) -> contextlib.AbstractContextManager[TeacherSignals]:
        """The objective's TeacherSignals for this micro-batch, valid inside the `with` block."""

    def in_process_signals(
        self, sequences: torch.Tensor, action_mask: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Experience-time signals of a teacher that lives in the policy actor, for its driver-side half
        (`IN_PROCESS_TEACHER_SIGNALS`). Teachers whose signals come from the driver have none."""
        raise RuntimeError(f"{type(self).__name__}: this teacher's signals come from the driver, not the policy actor")


class ShippedSignals(ActorTeacher):
    """The actor side of every teacher that runs outside the policy actors (a separate Ray group, an
    inference server): the sparse signals came with the experience, in the wire format."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature  # the tau the driver-side teacher used (the objective checks it)

    @contextlib.contextmanager
    def signals(self, batch: MicroBatch) -> Iterator[TeacherSignals]:
        wire = {name: tensor for name, tensor in batch.shipped.items() if name != "group_ids"}
        yield TeacherSignals.from_wire(wire, temperature=self.temperature)
