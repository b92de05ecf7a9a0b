"""Reward function of the built-in arithmetic task, for `--reward.remote_url path/to/reward_func.py`.

OpenRLHF (0.11.x, utils/agent.py, SingleTurnAgentExecutor) loads this file by
path with importlib (module name "reward_func", not as part of this package)
and, for every generated sample, calls in a worker thread

    reward_func(queries=[query], prompts=[prompt], labels=[label])

query:  prompt + response token ids decoded with special tokens kept
prompt: the prompt string (chat template already applied)
label:  the row's --data.label_key value (here the "answer" string)

It reads back `rewards` (advantages), `scores` (dynamic filtering; falls back
to rewards) and `extra_logs` (each value logged per sample), and wraps each as
torch.tensor([value]), so values are 1-D tensors with one entry per query.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from tsdkd_plugin.toy.arith_task import extract_final_answer, response_from_query, verify
except ImportError:
    # Loaded by path from a checkout whose package is not installed: the file
    # sits at <repo>/tsdkd_plugin/toy/reward_func.py.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tsdkd_plugin.toy.arith_task import extract_final_answer, response_from_query, verify


def reward_func(queries, prompts, labels):
    """1.0 for a correct final answer after `####`, else 0.0; one entry per query."""
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(
            f"reward_func: queries, prompts and labels must have one entry each per sample, "
            f"got {len(queries)}, {len(prompts)}, {len(labels)}"
        )
    responses = [response_from_query(query, prompt) for query, prompt in zip(queries, prompts, strict=True)]
    correct = [verify(response, label) for response, label in zip(responses, labels, strict=True)]
    has_answer = [int(extract_final_answer(response) is not None) for response in responses]
    rewards = torch.tensor(correct, dtype=torch.float32)
    return {
        "rewards": rewards,
        # The reward is already a 0/1 accuracy, which is what dynamic filtering expects of scores.
        "scores": rewards.clone(),
        # Tells "wrong answer" apart from "never wrote `#### n`" (e.g. truncated).
        "extra_logs": {"arith_has_final_answer": torch.tensor(has_answer, dtype=torch.float32)},
    }
