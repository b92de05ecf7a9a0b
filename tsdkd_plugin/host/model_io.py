"""Final hidden states and the output embedding of an OpenRLHF `Actor`.

Upstream `Actor.forward` materializes float32 logits for every position of the
whole sequence ([B, T, V], 5 GB for 4 x 2k tokens at a 152k vocabulary). The
teacher only needs the response positions, and the objective can turn hidden
states into logits chunk by chunk, so the teacher path stops before the LM head.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


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
