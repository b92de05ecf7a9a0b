"""OpenRLHF's own GRPO (`openrlhf.cli.train_ppo_ray`) runs end to end on CPU.

The upstream CLI runs unmodified through `tsdkd_plugin.host.cpu_launch` in a child
process: logical-GPU Ray cluster, one vLLM-CPU engine, policy + reference models
colocated with the engine on one logical GPU (`--train.colocate_all`), DeepSpeed
ZeRO-2 on gloo, fp32 weights, 2 steps of 4 prompts x 4 samples.

What is checked afterwards:
- the run exits 0 and TensorBoard has the step-1 and step-2 training metrics (with a
  non-zero KL at step 2, i.e. the reference model and the KL loss ran);
- the saved actor differs from the initial model (the optimizer stepped);
- the vLLM engine holds the trained weights: its prompt log-probs of a fixed sequence
  match those of the saved HF model (the actor after its last sync) to SYNC_TOLERANCE,
  and differ from the initial model's. fp32 on both sides; the two implementations
  differ only in kernels (measured: ~5e-7).

This file is also the child process's entry point (`python test_cpu_grpo.py ...`): it
records the engine handles that train_ppo_ray creates, lets the upstream CLI run, then
probes the engine before shutting Ray down.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tsdkd_plugin.testing import cpu_job_flags

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.network]

SYNC_TOLERANCE = 1e-3  # max |engine - HF| prompt log-prob after the sync (fp32 vs fp32)
MIN_TRAINED_SHIFT = 1e-2  # the training must move the log-probs well beyond that tolerance
RUN_TIMEOUT_S = 420

# Untrained toy models never solve the arithmetic task, so its 0/1 verifier gives all-zero
# rewards and GRPO advantages of 0 (no update). This dense reward varies between samples.
DENSE_REWARD_FUNC = '''
import torch


def reward_func(queries, prompts, labels):
    """Share of digit characters in each response: varies between random samples."""
    rewards = []
    for query, prompt in zip(queries, prompts):
        response = query[len(prompt):] if query.startswith(prompt) else query
        rewards.append(sum(c.isdigit() for c in response) / max(1, len(response)))
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards.clone()}
'''


def grpo_args(model_dir, prompts_file, reward_file, out_dir):
    return [
        *cpu_job_flags(model=model_dir, prompts=prompts_file, out_dir=out_dir, max_samples=8),
        *("--ref.num_nodes", "1", "--ref.num_gpus_per_node", "1", "--train.num_episodes", "1"),
        *("--algo.advantage.estimator", "group_norm", "--reward.remote_url", str(reward_file)),
        *("--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", "0.01"),
        *("--logger.wandb.run_name", "grpo_cpu"),
    ]


def run_and_probe(probe_file: str, initial_model: str, train_args: list) -> None:
    """Child process: run upstream train_ppo_ray, then compare the engine with the saved and initial models."""
    import openrlhf.trainer.ray as openrlhf_ray
    import ray

    from tsdkd_plugin.host import cpu_launch, device

    # train_ppo_ray does `from openrlhf.trainer.ray import create_vllm_engines` when it runs,
    # so wrapping the package attribute records the engines without touching the CLI.
    engines = []
    create_vllm_engines = openrlhf_ray.create_vllm_engines

    def recording_create_vllm_engines(*args, **kwargs):
        engines.extend(create_vllm_engines(*args, **kwargs))
        return engines

    openrlhf_ray.create_vllm_engines = recording_create_vllm_engines
    # Ray is started here, not by cpu_launch, so that it outlives the CLI for the probe.
    device.init_local_ray_cluster(num_gpus=cpu_launch.logical_gpus_for_ppo_ray(train_args))
    started = time.time()
    cpu_launch.main(["openrlhf.cli.train_ppo_ray", *train_args])
    train_seconds = time.time() - started

    from transformers import AutoTokenizer

    from tsdkd_plugin.testing import engine_prompt_logprobs, hf_prompt_logprobs, probe_token_ids

    out_model = train_args[train_args.index("--ckpt.output_dir") + 1]
    token_ids = probe_token_ids(AutoTokenizer.from_pretrained(out_model))
    engine = engine_prompt_logprobs(engines[0], token_ids)
    result = {
        "train_seconds": train_seconds,
        "engine": engine,
        "trained": hf_prompt_logprobs(out_model, token_ids),
        "initial": hf_prompt_logprobs(initial_model, token_ids),
    }
    Path(probe_file).write_text(json.dumps(result))
    ray.shutdown()


def test_openrlhf_grpo_runs_on_cpu_and_syncs_weights_into_vllm(tmp_path, toy_student_dir, arith_data_dir):
    from tsdkd_plugin.testing import log_tail, max_abs_diff, run_child, tensorboard_scalars

    reward_file = tmp_path / "dense_reward.py"
    reward_file.write_text(DENSE_REWARD_FUNC)
    train_args = grpo_args(toy_student_dir, arith_data_dir / "prompts_train.jsonl", reward_file, tmp_path)
    probe_file = tmp_path / "probe.json"
    log_file = tmp_path / "train_ppo_ray.log"
    # Ray's socket paths must stay under ~107 characters: a short private dir, not tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="tsdkd_ray_", dir="/tmp")
    env = {**os.environ, "TSDKD_RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, __file__, str(probe_file), str(toy_student_dir), *train_args]
    try:
        returncode = run_child(cmd, env, log_file, RUN_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert returncode == 0, f"train_ppo_ray on CPU failed (exit {returncode}); log tail:\n{log_tail(log_file)}"

    scalars = tensorboard_scalars(tmp_path / "tb")
    for tag in ("train/policy_loss", "train/reward", "train/kl", "train/actor_grad_norm"):
        assert set(scalars.get(tag, {})) == {1, 2}, f"{tag} not logged for steps 1 and 2: {sorted(scalars)}"
    assert scalars["train/actor_grad_norm"][1] > 0
    assert scalars["train/kl"][2] > 0, "step 2 ran with the step-1 weights against the reference: KL must be > 0"

    from safetensors.torch import load_file

    initial = load_file(str(Path(toy_student_dir) / "model.safetensors"))
    trained = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(initial) <= set(trained)
    assert max((trained[k].float() - initial[k].float()).abs().max().item() for k in initial) > 0

    probe = json.loads(probe_file.read_text())
    engine_vs_trained = max_abs_diff(probe["engine"], probe["trained"])
    trained_vs_initial = max_abs_diff(probe["trained"], probe["initial"])
    assert trained_vs_initial > MIN_TRAINED_SHIFT, f"training barely moved the model ({trained_vs_initial})"
    assert engine_vs_trained < SYNC_TOLERANCE, (
        f"vLLM engine log-probs differ from the trained actor's by {engine_vs_trained} "
        f"(initial vs trained: {trained_vs_initial}): weights were not synced"
    )


if __name__ == "__main__":
    run_and_probe(sys.argv[1], sys.argv[2], sys.argv[3:])
