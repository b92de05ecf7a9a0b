"""The teacher inside each policy actor (`--teacher.placement colocate`): dense transport, nothing shipped.

The actor-side half, `ColocatedModel`, is the teacher model loaded beside the student (after the
student's DeepSpeed engine, in `TSDKDPolicyActorImpl.init_model_from_pretrained`). Per micro-batch
it gives the objective the teacher's final hidden states and output embedding, and the objective
makes the teacher's logits chunk by chunk with the family's output head: the full logits never
leave the process, nor exist all at once. At experience time it answers its driver-side half,
`ColocatedTeacher`, with the sequence scores only (the ranking score, logged as `teacher_score`);
the per-token signals are recomputed in the training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from openrlhf.models import Actor
from openrlhf.utils.deepspeed import DeepspeedStrategy

from tsdkd_plugin.host.experience import PER_SAMPLE_SIGNALS
from tsdkd_plugin.host.model_io import output_embedding, output_head_of, response_hidden_states
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers.base import (
    IN_PROCESS_TEACHER_SIGNALS,
    ActorTeacher,
    DriverTeacher,
    MicroBatch,
    StepSamples,
    run_on_policy_group,
    timed,
)
from tsdkd_plugin.host.teachers.scoring import load_causal_lm_for_scoring, score_samples
from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig


class ColocatedModel(ActorTeacher):
    """The teacher model in this policy actor."""

    def __init__(self, model: Actor, zero_stage: int, objective: TSDKDConfig, shared_vocab_size: int) -> None:
        self.model, self.zero_stage = model, zero_stage
        self.objective, self.shared_vocab_size = objective, shared_vocab_size

    @classmethod
    def load(cls, strategy: DeepspeedStrategy, run: RunConfig, shared_vocab_size: int) -> ColocatedModel:
        model = load_causal_lm_for_scoring(strategy, run.teacher.model_name_or_path, offload=run.teacher.offload)
        return cls(model, strategy.args.ds.zero_stage, run.objective, shared_vocab_size)

    @contextlib.contextmanager
    def signals(self, batch: MicroBatch) -> Iterator[TeacherSignals]:
        with torch.no_grad():
            hidden = response_hidden_states(self.model, batch.sequences, batch.attention_mask, batch.num_actions)
        with output_embedding(self.model, self.zero_stage) as lm_head_weight:
            # The family's output head (e.g. Gemma-2's logit softcapping) after hidden @ W.
            yield TeacherSignals(hidden=hidden, lm_head_weight=lm_head_weight, output_head=output_head_of(self.model))

    def in_process_signals(
        self, sequences: torch.Tensor, action_mask: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The sequence scores (for ranking and logging); the dense per-token signals are recomputed in
        the training step."""
        signals = score_samples(
            self.model, self.zero_stage, self.objective, self.shared_vocab_size,
            sequences, action_mask, attention_mask, None,
        )  # fmt: skip
        return {name: tensor for name, tensor in signals.items() if name in PER_SAMPLE_SIGNALS}


class ColocatedTeacher(DriverTeacher):
    """Asks the policy group, whose actors hold the teacher, for the samples' sequence scores."""

    def __init__(self, policy_group, *, duplicate_factor: int) -> None:
        self.policy_group = policy_group
        self.duplicate_factor = duplicate_factor  # policy actors per ring-attention / tensor-parallel group

    def signals(self, samples: StepSamples, times: dict[str, float]) -> list[dict[str, torch.Tensor]]:
        with timed(times, "teacher_scoring"):
            return run_on_policy_group(self.policy_group, IN_PROCESS_TEACHER_SIGNALS, samples, self.duplicate_factor)
