"""The GRPO baseline's verifier: final-answer extraction and equivalence, and OpenRLHF's
reward_func contract (loaded by path, called per sample from a worker thread)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch

from tsdkd_plugin.recipes_tools.math_answers import answers_match, extract_final_answer, is_correct, reference_answer

VERIFIER = Path(__file__).resolve().parents[2] / "recipes" / "rewards" / "math_verifier.py"


@pytest.mark.parametrize("response, label, correct", [
    ("48/2 = 24 so 48+24 = 72.\n#### 72", "Natalia sold ... #### 72", True),  # GSM8K both sides
    ("The total is $1,234.", "1234", True),  # last number, thousands separator, dollar sign
    ("So the answer is \\boxed{\\dfrac{1}{2}}.", "0.5", True),  # boxed fraction vs decimal
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "The value is $\\boxed{\\frac{\\sqrt3}{2}}$.", True),  # LaTeX equivalence
    ("\\boxed{x^2+1}", "1+x^2", True),
    ("The final answer is 17.<|im_end|>", "17", True),
    ("#### 71", "#### 72", False),
    ("I am not sure.", "5", False),
    ("\\boxed{3", "3", True),  # truncated box: falls back to the last number
])
def test_final_answers_are_compared_like_math_graders(response, label, correct):
    assert is_correct(response, label) is correct


def test_extraction_prefers_boxed_then_hashes_then_stated_answer():
    assert extract_final_answer("12 then \\boxed{7} #### 9") == "7"
    assert extract_final_answer("steps 3, 4 #### 9 and 10") == "9 and 10"
    assert extract_final_answer("so the answer is 6. Then 8") == "6"
    assert reference_answer("") is None and answers_match(None, "3") is False


def load_reward_module():
    # Exactly how OpenRLHF's SingleTurnAgentExecutor loads it.
    spec = importlib.util.spec_from_file_location("reward_func", str(VERIFIER))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_func_returns_openrlhf_fields_per_query():
    reward_func = load_reward_module().reward_func
    prompt = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
    out = reward_func([prompt + "6*7 = 42. #### 42<|im_end|>", prompt + "It is 41."], [prompt, prompt], ["42", "42"])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert torch.equal(out["rewards"], torch.tensor([1.0, 0.0])) and torch.equal(out["scores"], out["rewards"])
    assert out["extra_logs"]["math_has_final_answer"].shape == (2,)
    with pytest.raises(ValueError, match="one entry per sample"):
        reward_func(["a"], ["a", "b"], ["1"])


def test_openrlhf_agent_executor_loads_and_calls_the_verifier():
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=[str(VERIFIER)])
    prompt = "<|im_start|>user\nHalf of 1?<|im_end|>\n<|im_start|>assistant\n"
    results = asyncio.run(executor._fetch_rewards_via_func([prompt + "\\boxed{1/2}"], [prompt], ["0.5"]))
    assert results[0]["rewards"].tolist() == [1.0]


# --------------------------------------------------------------------------- math-verify decides


def test_math_verify_decides_and_the_regexes_are_the_fallback(monkeypatch):
    from tsdkd_plugin.recipes_tools import math_answers

    # Equal as expressions, different as strings: only math-verify can say so.
    assert is_correct("so \\boxed{x^2+1}", "1+x^2") is True
    assert math_answers.math_verify_check("so \\boxed{x^2+1}", "1+x^2") is True
    # math-verify finds no answer in a truncated box: the regexes read the last number.
    assert math_answers.math_verify_check("\\boxed{3", "3") is None and is_correct("\\boxed{3", "3") is True

    monkeypatch.setitem(__import__("sys").modules, "math_verify", None)  # not installed
    assert math_answers.math_verify_check("so \\boxed{x^2+1}", "1+x^2") is None
    assert is_correct("so \\boxed{x^2+1}", "1+x^2") is False  # the regexes compare strings
    assert is_correct("48/2 = 24 so 48+24 = 72.\n#### 72", "72") is True


def test_off_the_main_thread_math_verify_runs_in_a_helper_process_under_a_timeout():
    """OpenRLHF calls reward_func from worker threads, where math-verify's SIGALRM timeouts cannot
    work: the check goes to a helper process, and one that takes too long is killed."""
    from concurrent.futures import ThreadPoolExecutor

    from tsdkd_plugin.recipes_tools import math_answers

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_correct, "so \\boxed{x^2+1}", "1+x^2").result() is True  # math-verify's verdict
        assert pool.submit(is_correct, "#### 71", "72").result() is False
    server = math_answers._server
    assert server is not None and server.alive

    slow = math_answers._MathVerifyServer()  # a fresh helper cannot even import math-verify in 1 ms
    assert slow.check("\\boxed{1}", "1", timeout=0.001) is None and not slow.alive
