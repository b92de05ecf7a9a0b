"""The on-policy fraction lambda: some steps train on the dataset's responses instead.

GKD's mixing, which the reference TSD-KD script inherits (it runs lambda = 1): with
probability 1 - lambda a training step replaces the student's samples by the
dataset's reference responses (e.g. teacher-written solutions), read from
`--data.label_key`. The teacher still scores and ranks them and every loss term
applies unchanged; a prompt's n copies are identical, so the sequence-level
ranking has nothing to order on those steps (its gradient is ~0) while the
token-level terms train normally.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from openrlhf.trainer.ppo_utils.experience import Experience


def is_off_policy_step(on_policy_fraction: float, seed: int, global_step: int) -> bool:
    """A seeded coin per step, so a resumed run makes the same choices."""
    if on_policy_fraction >= 1.0:
        return False
    return random.Random(f"{seed}:{global_step}").random() >= on_policy_fraction


def reference_response_text(label) -> str:
    """The response in a dataset label: plain text, or a chat message list (the last assistant turn)."""
    if isinstance(label, str):
        return label
    if isinstance(label, (list, tuple)) and label and isinstance(label[-1], dict):
        assistant = [m for m in label if m.get("role") == "assistant"] or list(label)
        return str(assistant[-1].get("content", ""))
    raise ValueError(
        f"--tsdkd.on_policy_fraction < 1 reads reference responses from --data.label_key, but a row's label is "
        f"{type(label).__name__}; it must be the response text or a list of chat messages"
    )


def with_reference_response(
    sample: Experience, response_ids: Sequence[int], max_len: int, truncated: bool
) -> Experience:
    """A one-sample rollout Experience whose response is `response_ids` (prompt kept as sampled);
    `truncated`: the reference response was cut to fit the generation budget."""
    action_positions = torch.nonzero(sample.action_mask[0]).flatten()
    prompt_length = int(action_positions[0]) + 1 if len(action_positions) else int(sample.attention_mask[0].sum())
    prompt_ids = sample.sequences[0, :prompt_length].tolist()
    tokens = (prompt_ids + list(response_ids))[:max_len]
    num_response = len(tokens) - prompt_length
    sequences = torch.tensor([tokens], dtype=torch.long)
    action_mask = torch.zeros(1, len(tokens) - 1, dtype=torch.long)
    action_mask[0, prompt_length - 1 :] = 1
    return Experience(
        sequences=sequences,
        attention_mask=torch.ones_like(sequences),
        action_mask=action_mask,
        prompts=list(sample.prompts),
        labels=list(sample.labels),
        images=list(sample.images),
        mm_train_inputs=list(sample.mm_train_inputs),
        response_length=torch.tensor([num_response]),
        truncated=torch.tensor([truncated or num_response < len(response_ids)]),
        total_length=torch.tensor([float(len(tokens))]),
        info={"off_policy": torch.tensor([1.0])},
    )


def replace_with_reference_responses(
    samples: list[Experience], tokenizer, max_new_tokens: int, max_len: int
) -> list[Experience]:
    """Every sample's response becomes its dataset reference response (+ EOS), truncated to
    max_new_tokens. Rewards are dropped (they scored the student's text); the teacher's
    sequence score becomes the logged reward, as when no verifier is configured."""
    replaced = []
    for sample in samples:
        text = reference_response_text(sample.labels[0])
        response_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = response_ids[:max_new_tokens]
        replaced.append(with_reference_response(sample, kept, max_len, truncated=len(kept) < len(response_ids)))
    return replaced
