"""The toy tokenizer, the Qwen-size vocabulary and the same-tokenizer check."""

import pytest
from transformers import AutoTokenizer, BatchEncoding

from tsdkd_plugin.tokenizer_compat import check_same_tokenizer, tokenizer_fingerprint
from tsdkd_plugin.toy.tokenizer import QWEN_SPECIAL_IDS, QWEN_VOCAB_SIZE, TOY_VOCAB_SIZE

CONVERSATION = [
    {"role": "user", "content": "Q: 24+72-28-30+18=?"},
    {"role": "assistant", "content": "24+72=96; 96-28=68; 68-30=38; 38+18=56. #### 56"},
]
RENDERED = (
    "<|im_start|>user\nQ: 24+72-28-30+18=?<|im_end|>\n"
    "<|im_start|>assistant\n24+72=96; 96-28=68; 68-30=38; 38+18=56. #### 56<|im_end|>\n"
)


def test_toy_tokenizer_specials_and_size(toy_tokenizer):
    assert len(toy_tokenizer) == TOY_VOCAB_SIZE
    assert toy_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [397, 398, 399]
    assert (toy_tokenizer.eos_token, toy_tokenizer.eos_token_id) == ("<|im_end|>", 399)
    assert (toy_tokenizer.pad_token, toy_tokenizer.pad_token_id) == ("<|endoftext|>", 397)
    assert set(toy_tokenizer.all_special_ids) == {397, 398, 399}


@pytest.mark.parametrize(
    "text",
    ["Q: 70-6*3-7*5=? A: 6*3=18; 7*5=35; 70-18=52; 52-35=17. #### 17", "héllo wörld 世界 🙂\n\ttabs  and  spaces ", ""],
)
def test_toy_tokenizer_round_trip(toy_tokenizer, text):
    ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer.decode(ids) == text
    assert all(0 <= i < TOY_VOCAB_SIZE for i in ids)


def test_toy_tokenizer_splits_digits(toy_tokenizer):
    # One token per digit, as Qwen2: the same number tokenizes the same everywhere.
    ids = toy_tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert [toy_tokenizer.decode([i]) for i in ids] == list("12345")


def test_toy_chat_template(toy_tokenizer):
    assert toy_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED
    prompt = toy_tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nQ: 24+72-28-30+18=?<|im_end|>\n<|im_start|>assistant\n"
    # OpenRLHF cuts responses out as full[len(prompt):]; that needs the prompt to be a prefix.
    assert RENDERED.startswith(prompt)

    # transformers 5: tokenize=True gives a BatchEncoding, not a list of ids.
    encoded = toy_tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    assert isinstance(encoded, BatchEncoding)
    assert encoded["input_ids"] == toy_tokenizer(RENDERED, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"].count(398) == 2 and encoded["input_ids"].count(399) == 2

    # Content given as a list of parts (what OpenRLHF makes of <image> prompts) renders its text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Q: 24+72-28-30+18=?"}]}]
    assert toy_tokenizer.apply_chat_template(parts, tokenize=False) == RENDERED.split("<|im_start|>assistant")[0]


def test_qwen_vocab_tokenizer(qwen_vocab_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(qwen_vocab_tokenizer_dir))
    assert len(tok) == QWEN_VOCAB_SIZE == 151_646
    for token, token_id in QWEN_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert (tok.eos_token_id, tok.pad_token_id) == (151_645, 151_643)
    text = "Hello world! 12+34=46 héllo 世界"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Ids of Qwen2's vocabulary (same ranks file), e.g. "Hello" and " world".
    assert ids[:2] == [9707, 1879]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == RENDERED
    assert tok(rendered, add_special_tokens=False)["input_ids"][0] == 151_644


def test_tokenizer_dir_and_model_dirs_load_the_same_tokenizer(toy_tokenizer_dir, toy_teacher_dir, toy_student_dir):
    """transformers 5 loads Qwen2Tokenizer from any model dir with model_type qwen2 (adding NFC and an
    unk token); the toy tokenizer is saved as that class so every load path agrees."""
    loaded = [AutoTokenizer.from_pretrained(str(d)) for d in (toy_tokenizer_dir, toy_teacher_dir, toy_student_dir)]
    assert {type(t).__name__ for t in loaded} == {"Qwen2Tokenizer"}
    assert len({tokenizer_fingerprint(t) for t in loaded}) == 1
    not_nfc = "cafe\u0301 12"
    assert len({tuple(t(not_nfc)["input_ids"]) for t in loaded}) == 1


def test_check_same_tokenizer_accepts_paths_and_objects(toy_tokenizer, toy_teacher_dir, toy_student_dir):
    assert check_same_tokenizer(toy_teacher_dir, toy_student_dir, str(toy_teacher_dir), str(toy_student_dir)) == 400
    assert check_same_tokenizer(toy_tokenizer, toy_student_dir) == 400
    # Settings that do not change ids do not count as a different tokenizer.
    toy_tokenizer.padding_side = "left"
    toy_tokenizer.chat_template = "{{ messages }}"
    assert check_same_tokenizer(toy_tokenizer, toy_student_dir) == 400


def test_check_same_tokenizer_rejects_other_vocabulary(toy_tokenizer_dir, qwen_vocab_tokenizer_dir):
    with pytest.raises(ValueError) as info:
        check_same_tokenizer(toy_tokenizer_dir, qwen_vocab_tokenizer_dir, "/models/teacher", "/models/student")
    message = str(info.value)
    assert "/models/teacher" in message and "/models/student" in message
    assert "400 vs 151646" in message


def test_check_same_tokenizer_rejects_added_token(toy_tokenizer, toy_tokenizer_dir):
    before = tokenizer_fingerprint(toy_tokenizer)
    toy_tokenizer.add_tokens(["<|tool|>"])
    assert tokenizer_fingerprint(toy_tokenizer) != before
    with pytest.raises(ValueError, match="teacher-path and student-path do not use the same tokenizer"):
        check_same_tokenizer(toy_tokenizer, toy_tokenizer_dir, "teacher-path", "student-path")
