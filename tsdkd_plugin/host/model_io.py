"""Final hidden states, the output embedding and the output head of an OpenRLHF `Actor`.

Upstream `Actor.forward` materializes float32 logits for every position of the
whole sequence ([B, T, V], 5 GB for 4 x 2k tokens at a 152k vocabulary). The
teacher only needs the response positions, and the objective can turn hidden
states into logits chunk by chunk, so the teacher path stops before the LM head.

Logits made by hand must be the family's own: `logits = head(hidden @ W.T)`, where
the head is what the family's HF `*ForCausalLM.forward` does after `lm_head`
(`output_head_for_config`). A family whose head is not known here is refused,
never computed as if it had none.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch

from tsdkd_plugin.objective import IDENTITY_HEAD, OutputHead


def unwrap_hf_model(model) -> torch.nn.Module:
    """The HF causal LM inside an OpenRLHF Actor (possibly wrapped by a DeepSpeed engine)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "module", inner)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded batches: positions count real tokens only (as upstream Actor.forward does)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def response_hidden_states(model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
    """[B, num_actions, H]: the final-norm hidden states that predict the response tokens."""
    hf_model = unwrap_hf_model(model)
    decoder = hf_model.get_decoder()
    output = decoder(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        use_cache=False,
    )
    return output.last_hidden_state[:, :-1][:, -num_actions:]


@contextlib.contextmanager
def output_embedding(model, zero_stage: int) -> Iterator[torch.Tensor]:
    """The lm_head weight [V, H], gathered for the duration under ZeRO-3."""
    weight = unwrap_hf_model(model).get_output_embeddings().weight
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            yield weight
    else:
        yield weight


# ----------------------------------------------------------------------------- output heads


def _no_head(config) -> OutputHead:
    return IDENTITY_HEAD


def _final_logit_softcapping(config) -> OutputHead:
    cap = getattr(config, "final_logit_softcapping", None)
    return IDENTITY_HEAD if cap is None else OutputHead(softcap=float(cap))


def _logit_scale(config) -> OutputHead:
    return OutputHead(scale=float(config.logit_scale))


def _divide_by_logits_scaling(config) -> OutputHead:
    return OutputHead(scale=1.0 / float(config.logits_scaling))


# model_type -> what the family's HF `*ForCausalLM.forward` does to `lm_head(hidden)` (read from the
# transformers 5.x modeling files; each entry is checked against HF's own logits, Gemma-2 with its
# softcapping on, by tests/host/test_model_families.py). Qwen2.5 checkpoints are "qwen2".
OUTPUT_HEADS: Dict[str, Callable[[object], OutputHead]] = {
    "qwen2": _no_head,
    "qwen3": _no_head,
    "llama": _no_head,
    "mistral": _no_head,
    "gemma2": _final_logit_softcapping,  # cap * tanh(logits / cap), cap = 30.0 in the released models
    "cohere": _logit_scale,  # logits * logit_scale
    "granite": _divide_by_logits_scaling,  # logits / logits_scaling
}


class UnsupportedModelFamily(ValueError):
    """The model's output head is not one this plugin reproduces."""


def output_head_problem(config) -> Optional[str]:
    """None when `output_head_for_config(config)` is known, else why not (one sentence)."""
    model_type = getattr(config, "model_type", None)
    if model_type in OUTPUT_HEADS:
        return None
    return (
        f"model type {model_type!r} is not supported: TSD-KD makes the teacher's logits from its hidden states "
        f"and reproduces the output head (logit scaling, softcapping) of {', '.join(sorted(OUTPUT_HEADS))} only"
    )


def output_head_for_config(config) -> OutputHead:
    """The OutputHead of a HF config's family; UnsupportedModelFamily for any other family."""
    problem = output_head_problem(config)
    if problem:
        raise UnsupportedModelFamily(problem)
    return OUTPUT_HEADS[config.model_type](config)


def output_head_of(model) -> OutputHead:
    """The OutputHead of an OpenRLHF Actor (or HF model) from its config."""
    return output_head_for_config(unwrap_hf_model(model).config)
