"""LoRA students: the weights that vLLM receives are the merged model, under HF checkpoint names.

With `--ds.lora.rank > 0` the student is a PEFT model: its parameters are named like
`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` (+ `lora_A` / `lora_B`),
names the vLLM engines do not have, and the adapters' update lives outside the base weight.
OpenRLHF 0.11's weight sync sends `model.named_parameters()` as they are (upstream #1349).

`merged_lora_parameters` yields what a merged checkpoint would hold instead: each LoRA
layer's `base weight + delta` (PEFT's own `get_delta_weight`, computed out of place: the
frozen base weights are never modified, so no merge/unmerge rounding drift in bf16),
every other parameter unchanged, names without the PEFT prefix and `.base_layer`.
The actor hands it to upstream's unchanged `broadcast_to_vllm` (see actor.py), so every
sync backend (NCCL broadcast, CUDA IPC, the CPU object store) sends merged weights.

Torch + PEFT only; the ZeRO-3 gather is passed in by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer."
# Adapter parameters: their effect is folded into the base weights.
ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")

Gather = Callable[[Sequence[torch.Tensor]], contextlib.AbstractContextManager]


def no_gather(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Gather for unsharded models (ZeRO 0-2): nothing to do."""
    return contextlib.nullcontext()


def is_lora_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def checkpoint_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` -> `model.layers.0.mlp.up_proj.weight`."""
    name = peft_name[len(PEFT_PREFIX) :] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return name.replace(BASE_LAYER, ".")


def _lora_layers(model: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _adapter_parameters(layer, adapters) -> list:
    params = []
    for container in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        modules = getattr(layer, container, {})
        for adapter in adapters:
            if adapter in modules:
                value = modules[adapter]
                params.extend(value.parameters() if isinstance(value, torch.nn.Module) else [value])
    return params


def merged_weight(layer, base_weight: torch.Tensor, gather: Gather = no_gather) -> torch.Tensor:
    """`base_weight + sum of the active adapters' deltas`, a new tensor (nothing is modified in place)."""
    adapters = [a for a in layer.active_adapters if a in getattr(layer, "scaling", {})]
    with torch.no_grad(), gather([base_weight, *_adapter_parameters(layer, adapters)]):
        merged = base_weight.detach().clone()
        for adapter in adapters:
            # in place, as PEFT's merge: a float32 delta (PEFT's CPU path for bf16) is rounded once, with the sum
            merged += layer.get_delta_weight(adapter)
    return merged


def merged_lora_parameters(
    model: torch.nn.Module, gather: Gather = no_gather, *, remove_duplicate: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every parameter of the merged model, in the PEFT model's order.

    Merged LoRA weights are fresh full tensors (under ZeRO-3: gathered, on every rank, with a
    `ds_shape` attribute so upstream's sync code reads their shape as it does for ZeRO-3
    parameters); every other parameter is the model's own (upstream gathers it as usual).
    """
    layers = _lora_layers(model)
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        if any(marker in name for marker in ADAPTER_MARKERS):
            continue
        owner, sep, field = name.partition(BASE_LAYER)
        if sep and field == "weight" and owner in layers and not layers[owner].merged:
            merged = merged_weight(layers[owner], param, gather)
            merged.ds_shape = merged.shape
            yield checkpoint_name(name), merged
        else:
            yield checkpoint_name(name), param
