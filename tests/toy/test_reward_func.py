"""reward_func.py as OpenRLHF 0.11 loads and calls it (utils/agent.py) and consumes its output."""

import asyncio
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tsdkd_plugin.toy

REWARD_FILE = Path(tsdkd_plugin.toy.__file__).parent / "reward_func.py"


def load_like_openrlhf(path: Path):
    """What SingleTurnAgentExecutor does with a --reward.remote_url ending in .py."""
    spec = importlib.util.spec_from_file_location("reward_func", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


PROMPT = "<|im_start|>user\nQ: 29-5*4=?<|im_end|>\n<|im_start|>assistant\n"


def test_reward_func_contract():
    reward_func = load_like_openrlhf(REWARD_FILE)
    responses = [
        "5*4=20; 29-20=9. #### 9<|im_end|>",  # right
        "5*4=20; 29-20=8. #### 8<|im_end|>",  # wrong
        "5*4=20; 29-20=9.",  # truncated before the answer
        "#### 9 #### 10",  # extra text after the answer
    ]
    out = reward_func([PROMPT + r for r in responses], [PROMPT] * 4, ["9"] * 4)
    assert set(out) == {"rewards", "scores", "extra_logs"}
    for key in ("rewards", "scores"):
        assert isinstance(out[key], torch.Tensor) and out[key].dtype == torch.float32
        assert out[key].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["extra_logs"]["arith_has_final_answer"].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_prompt_is_not_graded():
    """The query repeats the prompt; only the generated part may earn the reward."""
    reward_func = load_like_openrlhf(REWARD_FILE)
    sneaky_prompt = "<|im_start|>user\nQ: 1+1=? (#### 2)<|im_end|>\n<|im_start|>assistant\n"
    assert reward_func([sneaky_prompt + "no idea"], [sneaky_prompt], ["2"])["rewards"].tolist() == [0.0]
    # If decoding did not reproduce the prompt exactly, the assistant marker still delimits the response.
    assert reward_func([sneaky_prompt + "no idea"], ["something else"], ["2"])["rewards"].tolist() == [0.0]


def test_reward_func_rejects_misaligned_batches():
    reward_func = load_like_openrlhf(REWARD_FILE)
    with pytest.raises(ValueError, match="one entry each per sample, got 2, 1, 1"):
        reward_func(["a", "b"], ["a"], ["1"])


@pytest.mark.parametrize("answer, expected", [("9", 1.0), ("8", 0.0)])
def test_through_openrlhf_executor_and_experience(toy_tokenizer, answer, expected):
    """The real SingleTurnAgentExecutor (fake engine) and the real response->Experience conversion."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    response_ids = toy_tokenizer(f"5*4=20; 29-20={answer}. #### {answer}<|im_end|>", add_special_tokens=False)[
        "input_ids"
    ]

    class FakeEngine:
        async def generate(self, prompt_token_ids, params, **kwargs):
            output = SimpleNamespace(token_ids=response_ids, finish_reason="stop", logprobs=None)
            return SimpleNamespace(outputs=[output])

    executor = SingleTurnAgentExecutor(str(REWARD_FILE))
    assert executor.reward_func is not None
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    result = asyncio.run(executor.execute(PROMPT, "9", params, 256, toy_tokenizer, FakeEngine()))
    # The executor swallows reward errors (logs them and leaves reward None): check it got one.
    assert result["reward"] is not None, "reward_func failed inside OpenRLHF's executor"
    experience = SamplesGenerator._process_response_into_experience(None, result, max_len=256)
    assert experience.rewards.shape == (1,) and experience.rewards.item() == expected
    assert experience.scores.shape == (1,) and experience.scores.item() == expected
    assert experience.info["arith_has_final_answer"].tolist() == [1.0]
