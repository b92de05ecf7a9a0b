"""The teacher as a ranking reward model: a Ray actor group built on OpenRLHF's pieces.

Like upstream's `ReferenceModelActor`, each `TeacherModelActor` holds one
DeepSpeed-wrapped OpenRLHF `Actor` (any HF causal LM) in its own placement group,
and answers batched `forward` calls from the experience maker. Instead of
log-probs it returns what the TSD-KD objective needs for the student's samples,
in the sparse transport (`tsdkd_plugin.objective.TeacherSignals`): per token its
entropy, top-K log-probs (+ tail bucket) and its log-probs at the student's top-k
candidates; per response a sequence score (length-normalized log-likelihood)
that ranks a prompt's n candidates.
"""

from __future__ import annotations

from typing import Dict, Optional

import ray
import torch

from openrlhf.models import Actor
from openrlhf.trainer.ray.launcher import BaseModelActor
from openrlhf.utils.deepspeed import DeepspeedStrategy

from tsdkd_plugin.host.device import current_device
from tsdkd_plugin.host.faults import inject_teacher_forward_fault
from tsdkd_plugin.host.model_io import output_embedding, output_head_of, response_hidden_states
from tsdkd_plugin.objective import TSDKDConfig, TeacherSignals, teacher_signals_from_hidden


def action_logits(output_logits: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Logits that predict the response tokens: position t of the result predicts action t.

    OpenRLHF sequences are [prompt (left-padded) | response (right-padded)] and the
    response occupies the last `num_actions` positions, so the predicting logits are
    the `num_actions` positions before the last one.
    """
    return output_logits[:, :-1][:, -num_actions:]


def in_vocab_action_mask(sequences: torch.Tensor, action_mask: torch.Tensor, shared_vocab_size: int) -> torch.Tensor:
    """Response positions whose sampled id is a real token.

    A model's logit rows past len(tokenizer) are padding; a well-trained model never
    samples them, but a barely trained one can. Such positions are left out of every
    term (and counted), instead of failing the run.
    """
    sampled = sequences[:, -action_mask.shape[1]:]
    return action_mask.bool() & (sampled < shared_vocab_size)


def scoring_model_arguments(strategy: DeepspeedStrategy, pretrain: str, offload: bool) -> Dict:
    """Keyword arguments of upstream `Actor` for a model that only scores (the teacher): DeepSpeed's
    inference config, temperature 1 (the TSD-KD temperature is applied by the objective, on raw
    logits). Also bound to the pristine `Actor` signature by tests/host/test_stock_contract.py."""
    args = strategy.args
    return dict(
        pretrain_or_model=pretrain,
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        load_in_4bit=args.ds.load_in_4bit,
        ds_config=strategy.get_ds_eval_config(offload=offload),
        packing_samples=False,
        temperature=1.0,
    )


def load_causal_lm_for_scoring(strategy: DeepspeedStrategy, pretrain: str, offload: bool) -> Actor:
    """An OpenRLHF `Actor` in eval mode under DeepSpeed's inference config."""
    model = Actor(**scoring_model_arguments(strategy, pretrain, offload))
    if offload:
        model._offload = True
    model = strategy.prepare(model)
    model.eval()
    return model


@torch.no_grad()
def sparse_signals_for_samples(
    model: Actor,
    zero_stage: int,
    config: TSDKDConfig,
    shared_vocab_size: int,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    candidate_ids: Optional[torch.Tensor],
) -> TeacherSignals:
    """Sparse teacher signals (float32, on the model's device) for a micro-batch of student samples."""
    device = current_device()
    sequences, attention_mask = sequences.to(device), attention_mask.to(device)
    num_actions = action_mask.shape[1]
    mask = in_vocab_action_mask(sequences, action_mask.to(device), shared_vocab_size)
    hidden = response_hidden_states(model, sequences, attention_mask, num_actions)
    with output_embedding(model, zero_stage) as lm_head_weight:
        return teacher_signals_from_hidden(
            hidden,
            lm_head_weight,
            config,
            mask=mask,
            shared_vocab_size=shared_vocab_size,
            candidate_ids=None if candidate_ids is None else candidate_ids.to(device),
            sampled_ids=sequences[:, -num_actions:].masked_fill(~mask, 0),
            output_head=output_head_of(model),  # e.g. Gemma-2's logit softcapping
        )


def score_samples(
    model: Actor,
    zero_stage: int,
    config: TSDKDConfig,
    shared_vocab_size: int,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    candidate_ids: Optional[torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """`sparse_signals_for_samples` as a dict of CPU tensors in the wire format
    (`TeacherSignals.to_wire`: float16 log-probs, int32 ids)."""
    signals = sparse_signals_for_samples(
        model, zero_stage, config, shared_vocab_size, sequences, action_mask, attention_mask, candidate_ids
    )
    return {name: tensor.to("cpu") for name, tensor in signals.to_wire().items()}


def where_am_i() -> Dict:
    """This Ray actor's node and logical GPUs (for the run log and the placement tests)."""
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@ray.remote(num_gpus=1)
class TeacherModelActor(BaseModelActor):
    def init_model_from_pretrained(self, strategy: DeepspeedStrategy, pretrain: str, signal_options: Dict):
        """`signal_options`: loss_config (TSDKDConfig) and shared_vocab_size (validated by the CLI)."""
        self._setup_distributed(strategy)
        self.model = load_causal_lm_for_scoring(strategy, pretrain, offload=strategy.args.teacher.offload)
        self.config: TSDKDConfig = signal_options["loss_config"]
        self.shared_vocab_size: int = signal_options["shared_vocab_size"]

    def placement(self) -> Dict:
        return where_am_i()

    def forward(self, sequences, action_mask, attention_mask, candidate_ids=None) -> Dict[str, torch.Tensor]:
        inject_teacher_forward_fault()  # test-only (TSDKD_FAULT_INJECT, host/faults.py); no-op otherwise
        return score_samples(
            self.model, self.strategy.args.ds.zero_stage, self.config, self.shared_vocab_size,
            sequences, action_mask, attention_mask, candidate_ids,
        )  # fmt: skip
