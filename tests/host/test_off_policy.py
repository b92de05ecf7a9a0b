"""The on-policy fraction lambda (GKD-style mixing with dataset responses)."""

import pytest
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from transformers import AutoTokenizer

from tsdkd_plugin.host.off_policy import (
    is_off_policy_step,
    reference_response_text,
    replace_with_reference_responses,
)


def test_coin_is_seeded_and_has_the_requested_rate():
    assert not any(is_off_policy_step(1.0, 0, step) for step in range(100))
    draws = [is_off_policy_step(0.7, 3, step) for step in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [is_off_policy_step(0.7, 3, step) for step in range(4000)]  # resumable
    assert draws != [is_off_policy_step(0.7, 4, step) for step in range(4000)]


def test_reference_response_from_text_or_messages():
    assert reference_response_text("1+1=2. #### 2") == "1+1=2. #### 2"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert reference_response_text(messages) == "a"
    with pytest.raises(ValueError, match="--data.label_key"):
        reference_response_text(42)


def test_sample_gets_the_reference_response(toy_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(toy_tokenizer_dir)
    prompt_ids = tokenizer("<|im_start|>user\nQ: 2+3=?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    sampled = prompt_ids + [5, 6, 7]
    action_mask = torch.zeros(1, len(sampled) - 1, dtype=torch.long)
    action_mask[0, len(prompt_ids) - 1 :] = 1
    sample = Experience(
        sequences=torch.tensor([sampled]),
        attention_mask=torch.ones(1, len(sampled), dtype=torch.long),
        action_mask=action_mask,
        prompts=["p"],
        labels=["2+3=5. #### 5"],
        images=[None],
        mm_train_inputs=[None],
        rewards=torch.tensor([0.0]),
        info={},
    )
    (replaced,) = replace_with_reference_responses([sample], tokenizer, max_new_tokens=64, max_len=256)
    response = tokenizer("2+3=5. #### 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert replaced.sequences[0].tolist() == prompt_ids + response
    assert replaced.action_mask.shape == (1, len(prompt_ids) + len(response) - 1)
    assert replaced.action_mask[0].sum().item() == len(response)
    assert replaced.sequences[0, 1:][replaced.action_mask[0].bool()].tolist() == response
    assert replaced.rewards is None and int(replaced.response_length) == len(response)

    (short,) = replace_with_reference_responses([sample], tokenizer, max_new_tokens=4, max_len=256)
    assert short.action_mask[0].sum().item() == 4 and bool(short.truncated)
