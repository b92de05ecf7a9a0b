"""Do two models share one tokenizer? Teacher and student distributions are compared
token id by token id, so they must (the models' logit rows may still differ by padding)."""

from __future__ import annotations

import hashlib
import json
import os


def _load_tokenizer(tokenizer_or_path):
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_or_path))
    return tokenizer_or_path


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: vocabulary, merges, pre-tokenizer, added and special tokens.

    Settings that do not change ids (padding side, truncation, max length,
    chat template) are left out on purpose.
    """
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "specials": sorted((name, str(value)) for name, value in tokenizer.special_tokens_map.items()),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = json.loads(backend.to_str())
        state["model"] = serialized.get("model")
        state["pre_tokenizer"] = serialized.get("pre_tokenizer")
        state["normalizer"] = serialized.get("normalizer")
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def check_same_tokenizer(tok_a, tok_b, name_a: str = "teacher", name_b: str = "student") -> int:
    """Return the shared vocabulary size (len(tokenizer)) or raise ValueError naming both sides.

    tok_a / tok_b: tokenizer objects or paths loadable by AutoTokenizer. The
    names (typically the model paths) go into the message. Only the tokenizer
    is compared: the models' logit rows may differ (vocabulary padding), which
    the distillation loss aligns separately.
    """
    a, b = _load_tokenizer(tok_a), _load_tokenizer(tok_b)
    if tokenizer_fingerprint(a) == tokenizer_fingerprint(b):
        return len(a)

    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    differences = [f"sizes {len(a)} vs {len(b)}"]
    specials_a, specials_b = a.special_tokens_map, b.special_tokens_map
    if specials_a != specials_b:
        differences.append(f"special tokens {specials_a} vs {specials_b}")
    conflicting = sorted(tok for tok in vocab_a.keys() & vocab_b.keys() if vocab_a[tok] != vocab_b[tok])
    if conflicting:
        sample = ", ".join(f"{tok!r}: {vocab_a[tok]} vs {vocab_b[tok]}" for tok in conflicting[:3])
        differences.append(f"{len(conflicting)} tokens with different ids (e.g. {sample})")
    only_a, only_b = len(vocab_a.keys() - vocab_b.keys()), len(vocab_b.keys() - vocab_a.keys())
    if only_a or only_b:
        differences.append(f"{only_a} tokens only in {name_a}, {only_b} only in {name_b}")
    if len(differences) == 1 and len(a) == len(b):
        differences.append("same vocabulary but different merges or pre-tokenization")
    raise ValueError(
        f"{name_a} and {name_b} do not use the same tokenizer ({'; '.join(differences)}). "
        f"Token-level distillation compares the two models' distributions id by id, so teacher and "
        f"student must share one tokenizer."
    )
