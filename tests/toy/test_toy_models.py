"""The tiny Qwen2 teacher and student as loaded by production code."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tsdkd_plugin.toy.models import HEAD_DIM, count_parameters, padded_vocab_size
from tsdkd_plugin.toy.tokenizer import TOY_VOCAB_SIZE


@pytest.fixture(scope="module")
def teacher(toy_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(str(toy_teacher_dir))


@pytest.fixture(scope="module")
def student(toy_student_dir):
    return AutoModelForCausalLM.from_pretrained(str(toy_student_dir))


def test_model_dirs_are_ordinary_hf_dirs(toy_teacher_dir, toy_student_dir):
    for model_dir in (toy_teacher_dir, toy_student_dir):
        names = {p.name for p in model_dir.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
        # OpenRLHF loads the tokenizer from the model path.
        assert len(AutoTokenizer.from_pretrained(str(model_dir))) == TOY_VOCAB_SIZE
        generation = GenerationConfig.from_pretrained(str(model_dir))
        assert generation.eos_token_id == [399, 397] and generation.pad_token_id == 397
        config = json.loads((model_dir / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"]
        assert config["eos_token_id"] == 399 and config["pad_token_id"] == 397


def test_shapes_and_padding_rows(teacher, student, toy_tokenizer):
    ids = toy_tokenizer("Q: 29-5*4=? A:", return_tensors="pt")["input_ids"]
    for model, rows in ((teacher, 512), (student, 448)):
        assert model.config.head_dim == HEAD_DIM == 64
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert model.config.vocab_size == rows == padded_vocab_size(TOY_VOCAB_SIZE, 128 if rows == 512 else 64)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], rows)
        assert torch.isfinite(logits).all()
        # Rows past the tokenizer exist (as in real Qwen) and start at exactly zero.
        assert torch.equal(logits[..., TOY_VOCAB_SIZE:], torch.zeros_like(logits[..., TOY_VOCAB_SIZE:]))
    # Different paddings on purpose: distillation code must align vocabularies.
    assert teacher.config.vocab_size != student.config.vocab_size


def test_teacher_is_bigger_than_student(teacher, student):
    assert count_parameters(teacher) > 5 * count_parameters(student)
    assert teacher.config.num_hidden_layers > student.config.num_hidden_layers
    assert teacher.config.hidden_size > student.config.hidden_size


def test_student_trains_and_generates(toy_student_dir, toy_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(toy_student_dir))
    batch = toy_tokenizer(["Q: 1+2=? A: 1+2=3. #### 3", "Q: 5-3=? A: 5-3=2. #### 2"], return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    prompt = toy_tokenizer("Q: 1+2=? A:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 4
