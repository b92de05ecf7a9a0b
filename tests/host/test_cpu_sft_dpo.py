"""OpenRLHF's own SFT and DPO CLIs train on CPU and save a model that reloads.

Each runs unmodified in a child process through `tsdkd_plugin.host.cpu_launch`, which
sets the single-process torch.distributed environment (no `deepspeed` launcher) and
the CPU-mode variables; fp32 weights, gloo, 16 examples in 2 optimizer steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RUN_TIMEOUT_S = 300


def run_upstream_cli(module: str, args: list, log_file: Path) -> None:
    cmd = [sys.executable, "-m", "tsdkd_plugin.host.cpu_launch", module, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    log_tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
    assert proc.returncode == 0, f"{module} on CPU failed (exit {proc.returncode}); log tail:\n{log_tail}"


def assert_saved_model_reloads_and_changed(saved_dir: Path, initial_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(str(saved_dir), dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(str(initial_dir), dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(saved_dir))
    saved_state, initial_state = saved.state_dict(), initial.state_dict()
    assert saved_state.keys() == initial_state.keys()
    change = max((saved_state[k] - initial_state[k]).abs().max().item() for k in initial_state)
    assert change > 0, "the saved model equals the initial one: no optimizer step was applied"
    with torch.no_grad():
        logits = saved(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


COMMON_ARGS = [
    "--data.apply_chat_template",
    "--data.max_len",
    "96",
    "--data.max_samples",
    "16",
    "--train.micro_batch_size",
    "4",
    "--train.batch_size",
    "8",
    "--train.max_epochs",
    "1",
    "--ds.param_dtype",
    "fp32",
    "--ds.attn_implementation",
    "sdpa",
    # No warm-up: its first step has lr 0.
    "--adam.lr",
    "1e-3",
    "--lr_warmup_ratio",
    "0",
]


def test_openrlhf_sft_trains_on_cpu(tmp_path, toy_student_dir, arith_data_dir):
    args = [
        "--model.model_name_or_path",
        str(toy_student_dir),
        "--data.dataset",
        str(arith_data_dir / "sft_train.jsonl"),
        "--data.input_key",
        "prompt",
        "--data.output_key",
        "response",
        "--ds.zero_stage",
        "2",
        "--ckpt.output_dir",
        str(tmp_path / "model"),
        "--ckpt.path",
        str(tmp_path / "ckpt"),
        *COMMON_ARGS,
    ]
    run_upstream_cli("openrlhf.cli.train_sft", args, tmp_path / "train_sft.log")
    assert_saved_model_reloads_and_changed(tmp_path / "model", Path(toy_student_dir))


def test_openrlhf_dpo_trains_on_cpu(tmp_path, toy_student_dir, arith_data_dir):
    args = [
        "--model.model_name_or_path",
        str(toy_student_dir),
        "--ref.model_name_or_path",
        str(toy_student_dir),
        "--data.dataset",
        str(arith_data_dir / "dpo_train.jsonl"),
        "--data.prompt_key",
        "prompt",
        "--data.chosen_key",
        "chosen",
        "--data.rejected_key",
        "rejected",
        "--model.beta",
        "0.1",
        "--ds.zero_stage",
        "0",
        "--ckpt.output_dir",
        str(tmp_path / "model"),
        "--ckpt.path",
        str(tmp_path / "ckpt"),
        *COMMON_ARGS,
    ]
    run_upstream_cli("openrlhf.cli.train_dpo", args, tmp_path / "train_dpo.log")
    assert_saved_model_reloads_and_changed(tmp_path / "model", Path(toy_student_dir))
