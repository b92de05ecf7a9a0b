"""Verifier reward for the GRPO baseline: 1.0 when the response's final answer equals the label.

Pass it as `--reward.remote_url /abs/path/recipes/rewards/math_verifier.py` with
`--data.label_key label` (prompt files from `prepare_data prompts` with a label source: ground
truth, or the teacher's final answer; never the student's own responses). OpenRLHF 0.11
(utils/agent.py, SingleTurnAgentExecutor) loads this file by path and calls, in a worker thread of
each vLLM actor, once per generated sample:

    reward_func(queries=[query], prompts=[prompt], labels=[label])

query: prompt + response decoded with special tokens kept; prompt: the chat-rendered prompt;
label: the row's label. It reads `rewards` (advantages), `scores` (dynamic filtering) and
`extra_logs` (logged per sample); each is a 1-D tensor with one entry per query.

Correctness (tsdkd_plugin/recipes_tools/math_answers.py): math-verify (installed by the `gpu`
extra) extracts the response's final answer and compares it with the label mathematically; where
it gives no verdict, GSM8K/MATH-style regexes do (\\boxed{...}, `#### n`, "the answer is ...",
else the last number; numbers compared exactly, other answers after LaTeX normalization). From
these worker threads math-verify runs in a helper process under a timeout (its own timeouts need
the main thread).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from tsdkd_plugin.recipes_tools.math_answers import extract_final_answer, is_correct
except ImportError:
    # Loaded by path from a checkout whose package is not installed: <repo>/recipes/rewards/this.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tsdkd_plugin.recipes_tools.math_answers import extract_final_answer, is_correct


def _response(query: str, prompt: str) -> str:
    return query[len(prompt):] if prompt and query.startswith(prompt) else query


def reward_func(queries, prompts, labels):
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(
            f"reward_func: queries, prompts and labels must have one entry per sample, "
            f"got {len(queries)}, {len(prompts)}, {len(labels)}"
        )
    responses = [_response(query, prompt) for query, prompt in zip(queries, prompts)]
    rewards = torch.tensor([float(is_correct(r, label)) for r, label in zip(responses, labels)])
    has_answer = torch.tensor([float(extract_final_answer(r) is not None) for r in responses])
    return {
        "rewards": rewards,
        # A 0/1 accuracy is what dynamic filtering expects of scores.
        "scores": rewards.clone(),
        "extra_logs": {"math_has_final_answer": has_answer},
    }
