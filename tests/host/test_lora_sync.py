"""LoRA weight sync: what vLLM receives equals PEFT's own merge_and_unload, under checkpoint names."""

from __future__ import annotations

import copy

import pytest
import torch

from tsdkd_plugin.host.lora_sync import checkpoint_name, is_lora_model, merged_lora_parameters


def lora_student(tie_word_embeddings: bool, target_modules="all-linear", dtype=torch.float32):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    # As OpenRLHF's Actor: the base in its dtype, then PEFT adds the adapters (in fp32 by default).
    base = Qwen2ForCausalLM(config).to(dtype)
    model = get_peft_model(
        base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=target_modules, bias="none")
    )
    with torch.no_grad():  # PEFT initializes B to 0 (delta 0): make the adapters do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_merged_parameters_equal_peft_merge_and_unload(tied, dtype):
    model = lora_student(tied, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = copy.deepcopy(model).merge_and_unload()
    expected_params = dict(expected.named_parameters(remove_duplicate=False))

    sent = dict(merged_lora_parameters(model, remove_duplicate=False))

    assert set(sent) == set(expected_params), set(sent) ^ set(expected_params)
    for name, tensor in sent.items():
        assert torch.equal(tensor, expected_params[name]), name  # bit-identical to PEFT's own merge
    # the adapters changed the weights that were sent...
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    base_q = before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (sent[q_proj] - base_q).abs().max() > 1e-3
    # ...and the PEFT model itself is untouched (merged out of place: no bf16 merge/unmerge drift)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    # upstream's ZeRO-3 sync reads ds_shape of what it sends
    assert sent[q_proj].ds_shape == sent[q_proj].shape


def test_deduplicated_names_match_the_model_without_lora():
    model = lora_student(tie_word_embeddings=True)
    plain_names = [n for n, _ in copy.deepcopy(model).merge_and_unload().named_parameters()]
    assert [n for n, _ in merged_lora_parameters(model)] == plain_names


def test_only_targeted_modules_are_merged():
    model = lora_student(False, target_modules=["q_proj"])
    sent = dict(merged_lora_parameters(model))
    assert "model.layers.1.mlp.up_proj.weight" in sent
    untouched = model.get_parameter("base_model.model.model.layers.1.mlp.up_proj.weight")
    assert sent["model.layers.1.mlp.up_proj.weight"] is untouched


def test_gather_sees_base_and_adapter_weights():
    model = lora_student(False, target_modules=["v_proj"])
    gathered = []

    class Recorder:
        def __init__(self, params):
            gathered.append(len(list(params)))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    list(merged_lora_parameters(model, Recorder))
    assert gathered == [3, 3]  # per layer: base weight, lora_A, lora_B


def test_names_and_detection():
    assert checkpoint_name("base_model.model.model.layers.3.mlp.down_proj.base_layer.weight") == (
        "model.layers.3.mlp.down_proj.weight"
    )
    assert checkpoint_name("base_model.model.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("model.norm.weight") == "model.norm.weight"
    assert is_lora_model(lora_student(False))
    assert not is_lora_model(torch.nn.Linear(2, 2))
