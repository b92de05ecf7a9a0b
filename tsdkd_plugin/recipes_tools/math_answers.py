"""Final answers of GSM8K/MATH-style responses: extraction and equivalence.

Used by the GRPO baseline's verifier (recipes/rewards/math_verifier.py) and by `prepare_data`
(labels from reference or teacher responses). Standard library only at import, so the verifier
loads inside vLLM/Ray workers of any install.

Whether a response is correct (is_correct): **math-verify** decides when it is installed (the
`gpu` and `eval` extras bring it) and finds an answer in both the response and the label: it
extracts the final answer itself (\\boxed{}, "the answer is", the last expression) and compares
mathematically (sympy). Otherwise (not installed, nothing extracted, an error, a timeout) the
regexes below decide: numbers compared exactly, other answers after LaTeX normalization.

Where the regexes find an answer, in order of trust:
  1. the last `\\boxed{...}` (MATH convention; nested braces allowed),
  2. the number after `####` (GSM8K convention),
  3. "the (final) answer is ..." up to the end of the sentence,
  4. the last number in the text (how lm-eval's "flexible-extract" scores GSM8K); not for
     labels taken from whole responses (`strict=True`), where a stray number is no answer.

math-verify bounds its work with SIGALRM, which works only in a main thread; OpenRLHF calls
reward functions from worker threads. So off the main thread the check runs in a helper process
(`python -m tsdkd_plugin.recipes_tools.math_answers --serve`, one per calling process, started
on first use) under a timeout; a check that times out is killed and the regexes decide.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path
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


def extract_final_answer(text: str, strict: bool = False) -> Optional[str]:
    """The final answer a response commits to (see module docstring), or None. strict: only an
    explicit one (\\boxed{}, ####, "the answer is"), never the last number."""
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
    if strict:
        return None
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


# --------------------------------------------------------------------------- math-verify

MATH_VERIFY_TIMEOUT_S = 10.0  # per check in the helper process (math-verify's own limit is 5 s per step)


def math_verify_check(response: str, reference: str) -> Optional[bool]:
    """math-verify's verdict on a whole response against a bare reference answer; None when it is
    not installed, finds no answer on either side, or fails. Call from a main thread only (its
    timeouts use SIGALRM)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        gold = parse(f"${reference}$")
        guess = parse(strip_end_markers(response))
        if not gold or not guess:
            return None
        return bool(verify(gold, guess))
    except Exception:  # malformed LaTeX, math-verify's TimeoutException: no verdict
        return None


class _MathVerifyServer:
    """math_verify_check in a helper process (its main thread), one JSON line per check."""

    def __init__(self) -> None:
        repo_root = str(Path(__file__).resolve().parents[2])  # works from a checkout that is not installed
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tsdkd_plugin.recipes_tools.math_answers", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
        )

    def check(self, response: str, reference: str, timeout: float) -> Optional[bool]:
        """The verdict, or None on a timeout (the process is then killed: `alive` turns False)."""
        self.process.stdin.write(json.dumps([response, reference]) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            self.process.wait()
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


_server: Optional[_MathVerifyServer] = None
_server_lock = threading.Lock()


def math_verify_verdict(response: str, reference: str, timeout: float = MATH_VERIFY_TIMEOUT_S) -> Optional[bool]:
    """math_verify_check from any thread: directly in a main thread, else through the helper
    process, serialized, under `timeout` seconds (None when it runs out)."""
    global _server
    if threading.current_thread() is threading.main_thread():
        return math_verify_check(response, reference)
    with _server_lock:
        if _server is None or not _server.alive:
            _server = _MathVerifyServer()
        try:
            return _server.check(response, reference, timeout)
        except (BrokenPipeError, OSError, ValueError):  # the helper died (e.g. math-verify missing)
            return None


def _serve() -> None:
    for line in sys.stdin:
        response, reference = json.loads(line)
        print(json.dumps(math_verify_check(response, reference)), flush=True)


def answers_match(predicted: Optional[str], reference: Optional[str]) -> bool:
    """True when two final answers are the same number or the same normalized expression."""
    if predicted is None or reference is None:
        return False
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return normalize_answer(predicted) == normalize_answer(reference)


def is_correct(response: str, label) -> bool:
    """Whether a response's final answer equals the label's answer: math-verify's verdict when it
    gives one, else the regexes' (module docstring)."""
    reference = reference_answer(label)
    if reference is None:
        return False
    verdict = math_verify_verdict(response, reference)
    if verdict is not None:
        return verdict
    return answers_match(extract_final_answer(response), reference)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
