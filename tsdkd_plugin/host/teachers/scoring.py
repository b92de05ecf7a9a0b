"""A teacher model in this process, scoring the student's samples: OpenRLHF's `Actor` under DeepSpeed's
inference config, and the sparse signals it makes (used by the separate Ray group, by the colocated
teacher for its sequence scores, and by recipes_tools/dpo_pairs.py).

The sparse transport (`tsdkd_plugin.objective.TeacherSignals`): per token the teacher's entropy,
its top-K log-probs (+ tail bucket) and its log-probs at the student's top-k candidates; per response
a sequence score (length-normalized log-likelihood) that ranks a prompt's n candidates. The logits
are made from the final hidden states chunk by chunk, with the family's output head (model_io.py).
"""

from __future__ import annotations

import torch

from openrlhf.models import Actor
from openrlhf.utils.deepspeed import DeepspeedStrategy

from tsdkd_plugin.host.device import current_device
from tsdkd_plugin.host.model_io import output_embedding, output_head_of, response_hidden_states
from tsdkd_plugin.host.student_step import in_vocab_action_mask
from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, teacher_signals_from_hidden


def scoring_model_arguments(strategy: DeepspeedStrategy, pretrain: str, offload: bool) -> dict:
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
    """An OpenRLHF `Actor` in eval mode under DeepSpeed's inference config. (Its name appears in the
    traceback of a colocated teacher that fails to load: host/faults.py reports that as the teacher's
    --teacher.model_name_or_path.)"""
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
    candidate_ids: torch.Tensor | None,
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
    candidate_ids: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """`sparse_signals_for_samples` as a dict of CPU tensors in the wire format
    (`TeacherSignals.to_wire`: float16 log-probs, int32 ids)."""
    signals = sparse_signals_for_samples(
        model, zero_stage, config, shared_vocab_size, sequences, action_mask, attention_mask, candidate_ids
    )
    return {name: tensor.to("cpu") for name, tensor in signals.to_wire().items()}
