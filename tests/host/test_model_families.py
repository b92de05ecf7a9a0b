"""Every model family the recipes use is computed the way Hugging Face computes it.

The teacher's logits are made by hand from its hidden states (`hidden @ W.T`, chunk by chunk),
so they must go through the family's output head: Gemma-2 softcaps its logits
(`cap * tanh(z / cap)`), Cohere and Granite scale them. For tiny random-weight models of each
supported family, built offline from transformers config classes and loaded through upstream
OpenRLHF's `Actor` (the real loading path, from a saved directory), in fp32:

- the dense chunked teacher logits (`HiddenRows` over `response_hidden_states`), and the loss
  computed from them (`TeacherSignals(hidden=..., lm_head_weight=..., output_head=...)`, the
  colocated teacher's path in host/actor.py);
- the sparse top-K signals of the separate teacher group (`sparse_signals_for_samples`, shipped by `score_samples`);
- the student's logits as the loss reads them (upstream `Actor.forward` + `action_positions`);

all equal HF's own `forward().logits` (same positions: OpenRLHF's left-padding convention) to
1e-5. Left-padded prompts and right-padded responses of different lengths are included. A
family whose head the plugin does not know is refused at preflight with one sentence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tsdkd_plugin.host.model_io import (
    OUTPUT_HEADS,
    UnsupportedModelFamily,
    output_embedding,
    output_head_for_config,
    output_head_of,
    response_hidden_states,
)
from tsdkd_plugin.host.student_step import action_positions
from tsdkd_plugin.host.teachers.scoring import score_samples, sparse_signals_for_samples
from tsdkd_plugin.objective import IDENTITY_HEAD, TeacherSignals, TSDKDConfig, teacher_signals_from_logits, tsdkd_loss
from tsdkd_plugin.objective.chunking import HiddenRows

TOL = 1e-5
ROWS = 96  # logit rows of the tiny models
SHARED = 90  # tokens of the (imaginary) shared tokenizer: rows past it are padding
PROMPT, RESPONSE = 7, 6
SMALL = dict(vocab_size=ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=64)  # fmt: skip


def family_config(family: str):
    """A tiny config of the family with its output head switched on where it has one."""
    import transformers

    if family == "qwen2":
        return transformers.Qwen2Config(**SMALL, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**SMALL, tie_word_embeddings=True)
    if family == "llama":
        return transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**SMALL, tie_word_embeddings=False, sliding_window=None)
    if family == "gemma2":
        # Gemma-2: tied embeddings, attention and final-logit softcapping, sliding-window layers.
        # The released models cap at 30; random tiny models have small logits, so a cap of 2 makes
        # the tanh bend them far more than the tolerance (and the identity head fail, see below).
        return transformers.Gemma2Config(**SMALL, tie_word_embeddings=True, final_logit_softcapping=2.0,
                                         attn_logit_softcapping=50.0, sliding_window=4, query_pre_attn_scalar=32)  # fmt: skip
    if family == "cohere":
        return transformers.CohereConfig(**SMALL, tie_word_embeddings=True, logit_scale=0.0625)
    if family == "granite":
        return transformers.GraniteConfig(**SMALL, tie_word_embeddings=False, logits_scaling=8.0)
    raise ValueError(family)


FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "gemma2", "cohere", "granite"]


def test_every_supported_family_is_tested_here():
    assert sorted(OUTPUT_HEADS) == sorted(FAMILIES)
    assert {family_config(f).model_type for f in FAMILIES} == set(FAMILIES)


def batch(seed: int):
    """[prompt (left-padded) | response (right-padded)] like OpenRLHF's experience batches."""
    generator = torch.Generator().manual_seed(seed)
    rows = 3
    sequences = torch.randint(0, SHARED, (rows, PROMPT + RESPONSE), generator=generator)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(rows, RESPONSE, dtype=torch.bool)
    for row, (prompt_pad, response_len) in enumerate([(0, RESPONSE), (3, 4), (5, 2)]):
        attention_mask[row, :prompt_pad] = 0
        attention_mask[row, PROMPT + response_len :] = 0
        action_mask[row, response_len:] = False
        sequences[row, :prompt_pad] = 0
        sequences[row, PROMPT + response_len :] = 0
    return sequences, attention_mask, action_mask


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, upstream Actor loaded from a saved directory, HF model with the same weights)."""
    from openrlhf.models import Actor
    from transformers import AutoModelForCausalLM

    name = request.param
    model_dir = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name), dtype=torch.float32)
    model.save_pretrained(model_dir)
    actor = Actor(str(model_dir), attn_implementation="eager", param_dtype="fp32").eval()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return name, actor, hf


@pytest.fixture(scope="module")
def reference(family):
    """HF's own logits at the response positions ([B, T, V]), fp32."""
    _, _, hf = family
    sequences, attention_mask, action_mask = batch(1)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # OpenRLHF's positions
    with torch.no_grad():
        logits = hf(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, :-1][:, -RESPONSE:].float(), (sequences, attention_mask, action_mask)


def test_dense_teacher_logits_equal_hf(family, reference):
    name, actor, _ = family
    expected, (sequences, attention_mask, action_mask) = reference
    with torch.no_grad():
        hidden = response_hidden_states(actor, sequences, attention_mask, RESPONSE)
    rows = hidden[action_mask]
    with torch.no_grad(), output_embedding(actor, zero_stage=0) as weight:
        made = torch.empty(rows.shape[0], SHARED)
        HiddenRows(rows, weight, SHARED, output_head_of(actor)).fill(slice(None), made)
        error = (made - expected[action_mask][:, :SHARED]).abs().max().item()
        assert error < TOL, f"{name}: dense teacher logits differ from HF's by {error}"
        if not output_head_of(actor).is_identity:
            # The check has teeth: without the family's head the logits are visibly wrong.
            HiddenRows(rows, weight, SHARED, IDENTITY_HEAD).fill(slice(None), made)
            assert (made - expected[action_mask][:, :SHARED]).abs().max().item() > 1e-2


def test_dense_teacher_loss_equals_the_loss_on_hf_logits(family, reference):
    """The colocated teacher's TeacherSignals(hidden=..., lm_head_weight=..., output_head=...)."""
    name, actor, _ = family
    expected, (sequences, attention_mask, action_mask) = reference
    config = TSDKDConfig(temperature=0.7)
    student = torch.randn(*expected.shape[:2], ROWS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        hidden = response_hidden_states(actor, sequences, attention_mask, RESPONSE)
    sampled = sequences[:, -RESPONSE:].masked_fill(~action_mask, 0)
    with torch.no_grad(), output_embedding(actor, zero_stage=0) as weight:
        dense = TeacherSignals(hidden=hidden, lm_head_weight=weight, output_head=output_head_of(actor))
        loss, _ = tsdkd_loss(student.float(), dense, action_mask, config, shared_vocab_size=SHARED, sampled_ids=sampled)
    hf_loss, _ = tsdkd_loss(student.float(), TeacherSignals(logits=expected), action_mask, config,
                            shared_vocab_size=SHARED, sampled_ids=sampled)  # fmt: skip
    assert abs(float(loss) - float(hf_loss)) < TOL, (name, float(loss), float(hf_loss))


def test_sparse_teacher_signals_equal_hf(family, reference):
    """The separate teacher group's signals (before the float16 wire encoding) against signals built
    from HF's logits, and its top-K log-probs and entropy against a float64 softmax of HF's logits;
    score_samples ships exactly their wire encoding."""
    name, actor, _ = family
    expected, (sequences, attention_mask, action_mask) = reference
    config = TSDKDConfig(temperature=0.7, sparse_top_k=8)
    candidates = torch.randint(0, SHARED, (*action_mask.shape, config.num_candidates),
                               generator=torch.Generator().manual_seed(4))  # fmt: skip
    signals = sparse_signals_for_samples(actor, 0, config, SHARED, sequences, action_mask, attention_mask, candidates)
    shipped = score_samples(actor, 0, config, SHARED, sequences, action_mask, attention_mask, candidates)
    wire = signals.to_wire()
    assert set(shipped) == set(wire)
    assert all(torch.equal(shipped[key], wire[key]) for key in wire), name
    got = signals.tensors()
    want = teacher_signals_from_logits(
        expected, config, mask=action_mask, shared_vocab_size=SHARED, candidate_ids=candidates,
        sampled_ids=sequences[:, -RESPONSE:].masked_fill(~action_mask, 0),
    ).tensors()  # fmt: skip
    assert set(got) == set(want)
    for key in want:
        if key == "topk_ids":
            assert torch.equal(got[key][action_mask], want[key][action_mask]), name
            continue
        a, b = got[key].double(), want[key].double()
        if a.dim() >= 2 and a.shape[:2] == action_mask.shape:
            a, b = a[action_mask], b[action_mask]
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), (name, key)
        error = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        assert error < TOL, f"{name}: sparse {key} differs from HF's by {error}"
    logprobs = torch.log_softmax(expected[..., :SHARED].double() / config.temperature, dim=-1)[action_mask]
    top = logprobs.topk(config.sparse_top_k, dim=-1)
    assert (got["topk_logprobs"][action_mask].double() - top.values).abs().max().item() < TOL
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert (got["entropy"][action_mask].double() - entropy).abs().max().item() < TOL


def test_student_logits_equal_hf(family, reference):
    """What the loss reads on the student side: upstream Actor.forward, then action_positions."""
    name, actor, _ = family
    expected, (sequences, attention_mask, action_mask) = reference
    with torch.no_grad():
        output = actor(sequences, attention_mask=attention_mask, return_output=True)
    student = action_positions(output["logits"], RESPONSE)
    error = (student - expected)[action_mask].abs().max().item()
    assert error < TOL, f"{name}: student logits differ from HF's by {error}"


def test_unknown_families_are_refused_with_one_sentence(tmp_path):
    import transformers

    config = transformers.GPTNeoXConfig(vocab_size=ROWS, hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelFamily, match=r"model type 'gpt_neox' is not supported"):
        output_head_for_config(config)
    assert output_head_for_config(family_config("gemma2")).softcap == 2.0
    assert output_head_for_config(transformers.Gemma2Config()).softcap == 30.0  # the released models' cap
    assert output_head_for_config(family_config("granite")).scale == 1 / 8.0

    # Preflight: before any Ray worker, naming the option, the path and the model type.
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight.models import TEACHER, inspect_model

    from tsdkd_plugin.toy.tokenizer import build_toy_tokenizer

    unknown = tmp_path / "neox"
    config.save_pretrained(unknown)
    build_toy_tokenizer(unknown)  # a complete directory: the family is what is refused
    with pytest.raises(ArgumentError) as error:
        inspect_model(TEACHER, str(unknown), use_fast=True)
    message = str(error.value)
    assert message.startswith(f"--teacher.model_name_or_path {str(unknown)!r}: model type 'gpt_neox' is not supported")
    assert message.count(". ") == 0 and "\n" not in message


@pytest.mark.slow
def test_gemma2_pair_trains_end_to_end_on_cpu(tmp_path, fixture_cache_dir, arith_data_dir):
    """A Gemma-2 teacher and student (toy sizes, head_dim 64 for vLLM-CPU; tied embeddings, softcapping,
    sliding windows) through the whole CPU pipeline, with every check of tests/host/test_tsdkd_e2e.py:
    vLLM-CPU samples from the Gemma-2 student, the colocated teacher's dense path makes its logits
    with the softcap (host/actor.py), 2 steps train, and the engine holds the trained weights."""
    import importlib.util

    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import GEMMA2_STUDENT_RECIPE, GEMMA2_TEACHER_RECIPE

    # By file path: OpenRLHF's wheel owns the top-level name `tests`.
    spec = importlib.util.spec_from_file_location("tsdkd_e2e", Path(__file__).with_name("test_tsdkd_e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    student = toy_model_dir(GEMMA2_STUDENT_RECIPE, fixture_cache_dir)
    teacher = toy_model_dir(GEMMA2_TEACHER_RECIPE, fixture_cache_dir)
    assert output_head_for_config(AutoConfig.from_pretrained(teacher)).softcap == 30.0
    e2e.test_tsdkd_trains_on_cpu_and_syncs_vllm(tmp_path, "colocate", False, student, teacher, arith_data_dir)
