"""Final answers of GSM8K/MATH-style responses: extraction and equivalence.

Used by the GRPO baseline's verifier (recipes/rewards/math_verifier.py) and by
`prepare_data --label-from-response`. Standard library only, so the verifier loads inside
vLLM/Ray workers of any install; `math_verify` (the `eval` extra) is consulted as a second
opinion for LaTeX answers when it is importable.

Where an answer is found, in order of trust:
  1. the last `\\boxed{...}` (MATH convention; nested braces allowed),
  2. the number after `####` (GSM8K convention),
  3. "the (final) answer is ..." up to the end of the sentence,
  4. the last number in the text (how lm-eval's "flexible-extract" scores GSM8K).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Chat end markers that decoding with special tokens leaves in a response.
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>", "</s>", "<|eot_id|>")


def strip_end_markers(text: str) -> str:
    for marker in _END_MARKERS:
        text = text.replace(marker, "")
    return text.strip()


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when absent."""
    start = max(text.rfind(command) for command in _BOXED_COMMANDS)
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # `\boxed 5`: the token after a space
        rest = text[start:].split(None, 1)
        return rest[1].split()[0] if len(rest) == 2 and rest[1].split() else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None  # unbalanced: truncated response


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer a response commits to (see module docstring), or None."""
    text = strip_end_markers(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm8k = _GSM8K_RE.search(text)
    if gsm8k:
        return gsm8k.group(1).strip()
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return stated[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(label) -> Optional[str]:
    """The answer inside a dataset label: a GSM8K solution ("... #### 72"), a MATH solution with
    \\boxed{...}, or a bare answer."""
    if label is None:
        return None
    text = str(label).strip()
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm8k = _GSM8K_RE.search(text)
    if gsm8k:
        return gsm8k.group(1).strip()
    return text


_LATEX_NOISE = (
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", "%"), ("\\$", "$"),
)


def normalize_answer(answer: str) -> str:
    """A canonical string: LaTeX spacing and sizing removed, \\text{} unwrapped, no spaces,
    no trailing period, no surrounding $...$."""
    text = answer.strip()
    for old, new in _LATEX_NOISE:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.strip().strip("$").rstrip(".").strip()
    return re.sub(r"\s+", "", text).lower()


def parse_number(answer: str) -> Optional[Fraction]:
    """An exact number from "1,234", "$5", "50%", "-3/4", "\\frac{3}{4}", "0.25"; None otherwise."""
    text = normalize_answer(answer).replace(",", "").replace("$", "")
    match = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", text)
    if match:
        numerator, denominator = int(match.group(2)), int(match.group(3))
        if denominator == 0:
            return None
        value = Fraction(numerator, denominator)
        return -value if match.group(1) else value
    percent = text.endswith("%")
    text = text.rstrip("%")
    try:
        value = Fraction(text)  # ints, decimals and a/b
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


# math_verify runs without its SIGALRM timeout here (see below); sympy on a long, adversarial
# expression could then take unbounded time, so only short answers get the second opinion.
_MATH_VERIFY_MAX_CHARS = 200


def _math_verify_equal(predicted: str, reference: str) -> bool:
    if max(len(predicted), len(reference)) > _MATH_VERIFY_MAX_CHARS:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        # Timeouts off: they use SIGALRM, which only works in the main thread, and OpenRLHF calls
        # reward functions from worker threads.
        gold = parse(f"${reference}$", parsing_timeout=None)
        guess = parse(f"${predicted}$", parsing_timeout=None)
        return bool(gold) and bool(guess) and bool(verify(gold, guess, timeout_seconds=None))
    except Exception:  # math_verify raises on malformed LaTeX; a malformed answer is just wrong
        return False


def answers_match(predicted: Optional[str], reference: Optional[str]) -> bool:
    """True when two final answers are the same number or the same normalized expression."""
    if predicted is None or reference is None:
        return False
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    return _math_verify_equal(predicted, reference)


def is_correct(response: str, label) -> bool:
    """Whether a response's final answer equals the label's answer."""
    return answers_match(extract_final_answer(response), reference_answer(label))
