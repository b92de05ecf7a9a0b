"""Helpers for end-to-end checks of Ray jobs on CPU, shared by the test suite and benchmarks.

They live in the package (not in tests/) because OpenRLHF's wheel owns the top-level
name `tests`, so test modules cannot import each other unambiguously.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence


def run_child(cmd: Sequence[str], env: Dict[str, str], log_file: Path, timeout: float) -> int:
    """Run cmd in its own process group, output to log_file; on timeout kill the whole group
    (including a Ray cluster it started) and re-raise TimeoutExpired."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def log_tail(log_file: Path, lines: int = 60) -> str:
    return "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-lines:])


def tensorboard_scalars(tb_dir: Path) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} over every TensorBoard event file under tb_dir, oldest first, so a
    resumed run's new file overrides the steps it repeats."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(Path(tb_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not event_files:
        raise FileNotFoundError(f"no TensorBoard event file under {tb_dir}")
    scalars: Dict[str, Dict[int, float]] = {}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return scalars


def tree_digest(path: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under path (bytecode caches left out), so two trees
    compare byte for byte and a failed comparison shows which files differ."""
    import hashlib

    path = Path(path)
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def probe_token_ids(tokenizer) -> List[int]:
    """A fixed chat exchange, tokenized: the sequence whose log-probs are compared."""
    messages = [{"role": "user", "content": "Q: 12+7=?"}, {"role": "assistant", "content": "12+7=19. #### 19"}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def hf_prompt_logprobs(model_dir, token_ids: Sequence[int]) -> List[float]:
    """log p(token_i | tokens_<i), i >= 1, under the HF model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)])).logits[0, :-1].float()
    targets = torch.tensor(list(token_ids)[1:]).unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()


def engine_prompt_logprobs(engine, token_ids: Sequence[int]) -> List[float]:
    """The same quantity from a live OpenRLHF vLLM rollout engine (a RolloutRayActor handle)."""
    import ray
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    output = ray.get(engine.generate.remote(prompt_token_ids=list(token_ids), sampling_params=params))
    return [position[token].logprob for position, token in zip(output.prompt_logprobs[1:], list(token_ids)[1:])]


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b))
