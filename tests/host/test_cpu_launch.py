"""tsdkd_plugin.host.device and cpu_launch: CPU-mode detection, environment, logical-GPU sizing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tsdkd_plugin.host import cpu_launch, device


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_cpu_mode_follows_cuda_and_the_override(monkeypatch):
    monkeypatch.delenv("TSDKD_DEVICE", raising=False)
    monkeypatch.delenv("OPENRLHF_DEVICE", raising=False)
    assert device.cpu_mode() is (not _has_cuda())
    monkeypatch.setenv("TSDKD_DEVICE", "cpu")
    assert device.cpu_mode() is True
    assert device.device_type() == "cpu" == device.ema_device()
    assert str(device.current_device()) == "cpu"


def test_cpu_mode_env_keeps_values_the_user_set(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = device.cpu_mode_env(threads_per_process=2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["OPENRLHF_DEVICE"] == env["TSDKD_DEVICE"] == env["DS_ACCELERATOR"] == "cpu"


def test_engine_dtype_follows_param_dtype(monkeypatch):
    """Stock create_vllm_engines has no dtype parameter; in CPU mode the engines' dtype travels in
    an environment variable (read by the CPU patch only), set from --ds.param_dtype."""
    monkeypatch.delenv(device.CPU_VLLM_DTYPE_VAR, raising=False)
    assert device.CPU_VLLM_DTYPE_VAR not in device.cpu_mode_env()
    assert device.cpu_mode_env(param_dtype="fp32")[device.CPU_VLLM_DTYPE_VAR] == "float32"
    assert device.cpu_mode_env(param_dtype="bf16")[device.CPU_VLLM_DTYPE_VAR] == "bfloat16"
    monkeypatch.setenv(device.CPU_VLLM_DTYPE_VAR, "bfloat16")
    assert device.cpu_mode_env()[device.CPU_VLLM_DTYPE_VAR] == "bfloat16"  # kept without a flag
    assert device.cpu_mode_env(param_dtype="fp32")[device.CPU_VLLM_DTYPE_VAR] == "float32"  # the flag wins
    with pytest.raises(ValueError, match="--ds.param_dtype 'fp8'"):
        device.cpu_mode_env(param_dtype="fp8")


def test_cpu_launch_sets_the_engine_dtype_before_the_module_runs(tmp_path, monkeypatch):
    names = [*device.CPU_MODE_ENV_DEFAULTS, "OMP_NUM_THREADS", device.CPU_VLLM_DTYPE_VAR,
             "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"]  # fmt: skip
    for name in names:  # restored after the test: cpu_launch writes os.environ directly
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TSDKD_DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    seen = tmp_path / "seen.txt"
    (tmp_path / "tsdkd_env_probe.py").write_text(
        f"import os\nopen({str(seen)!r}, 'w').write(os.environ.get({device.CPU_VLLM_DTYPE_VAR!r}, 'unset'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cpu_launch.main(["--no-ray", "tsdkd_env_probe", "--ds.param_dtype", "fp32"])
    assert seen.read_text() == "float32"
    monkeypatch.delenv(device.CPU_VLLM_DTYPE_VAR)
    cpu_launch.main(
        ["--no-ray", "tsdkd_env_probe", "--ds.param_dtype", "not-a-dtype"]
    )  # the module's parser rejects it
    assert seen.read_text() == "unset"


def test_single_process_dist_env_fills_only_missing_values(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        # setenv first so monkeypatch restores each variable's original state (often: unset)
        # after the test; the function under test writes os.environ directly.
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASTER_PORT", "29511")
    env = device.set_single_process_dist_env()
    expected = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29511"}
    assert env == expected


def test_a_world_of_one_lets_the_os_pick_its_store_port(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    assert device.set_single_process_dist_env()["MASTER_PORT"] == "0"


WORLD_OF_ONE_SCRIPT = """
import datetime, sys
import deepspeed, torch
from tsdkd_plugin.host.device import apply_cpu_mode_env, set_single_process_dist_env
apply_cpu_mode_env()
set_single_process_dist_env()
sys.stdin.read()  # every world starts initialising at once
deepspeed.init_distributed(timeout=datetime.timedelta(seconds=60))
total = torch.ones(2)
torch.distributed.all_reduce(total)
store = torch.distributed.distributed_c10d._get_default_store()
while isinstance(store, torch.distributed.PrefixStore):
    store = store.underlying_store
print("store port", store.port, "sum", int(total.sum()))
"""


def test_worlds_of_one_started_side_by_side_each_get_a_store(tmp_path):
    """Teacher and student SFT (and --jobs 2 comparisons) start DeepSpeed worlds of one at the same
    moment; each must listen on its own port, chosen as it binds, not on one picked beforehand."""
    env = {name: value for name, value in os.environ.items() if name not in ("MASTER_ADDR", "MASTER_PORT")}
    env["TSDKD_DEVICE"] = "cpu"
    worlds = [
        subprocess.Popen(
            [sys.executable, "-c", WORLD_OF_ONE_SCRIPT],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(3)
    ]
    outputs = [world.communicate("", timeout=240) for world in worlds]
    for world, (_, err) in zip(worlds, outputs, strict=True):
        assert world.returncode == 0, err[-2000:]
    ports = [int(out.split("store port ")[1].split()[0]) for out, _ in outputs]
    assert all(port > 0 for port in ports) and len(set(ports)) == 3
    assert all(out.rstrip().endswith("sum 2") for out, _ in outputs)


@pytest.mark.parametrize(
    "args, gpus",
    [
        # colocate_all: engines, reference and actor share the actor's bundles.
        (
            [
                "--actor.num_gpus_per_node",
                "1",
                "--vllm.num_engines",
                "1",
                "--train.colocate_all",
                "--reward.remote_url",
                "r.py",
                "--algo.advantage.estimator",
                "group_norm",
            ],
            1,
        ),
        # separate placement: engine + actor + reference (KL coef defaults to 0.01).
        (
            [
                "--actor.num_gpus_per_node",
                "1",
                "--ref.num_gpus_per_node",
                "1",
                "--vllm.num_engines",
                "1",
                "--reward.remote_url",
                "r.py",
                "--algo.advantage.estimator",
                "group_norm",
            ],
            3,
        ),
        # no KL, no reference.
        (
            [
                "--actor.num_gpus_per_node",
                "1",
                "--vllm.num_engines",
                "2",
                "--algo.kl.init_coef",
                "0",
                "--reward.remote_url",
                "r.py",
                "--algo.advantage.estimator",
                "rloo",
            ],
            3,
        ),
        # PPO with GAE: critic and reward model too; colocate_critic_reward shares them.
        (
            [
                "--actor.num_gpus_per_node",
                "2",
                "--ref.num_gpus_per_node",
                "2",
                "--critic.num_gpus_per_node",
                "2",
                "--reward.num_gpus_per_node",
                "2",
                "--vllm.num_engines",
                "2",
                "--train.colocate_actor_ref",
                "--train.colocate_critic_reward",
            ],
            2 + 2 + 2,
        ),
        # upstream defaults: 8 GPUs per group, reference + critic + reward model.
        ([], 8 + 8 + 8 + 8),
    ],
)
def test_logical_gpus_match_what_train_ppo_ray_requests(args, gpus):
    assert cpu_launch.logical_gpus_for_ppo_ray(args) == gpus


def test_flash_attention_is_refused_with_a_clear_sentence():
    problem = cpu_launch.flash_attention_problem("openrlhf.cli.train_sft", ["--model.model_name_or_path", "m"])
    assert "--ds.attn_implementation sdpa" in problem
    assert cpu_launch.flash_attention_problem("openrlhf.cli.train_sft", ["--ds.attn_implementation=sdpa"]) is None
    assert "packing_samples" in cpu_launch.flash_attention_problem(
        "openrlhf.cli.train_ppo_ray", ["--ds.attn_implementation", "sdpa", "--ds.packing_samples"]
    )
    assert cpu_launch.flash_attention_problem("some.other.module", []) is None


def test_cpu_launch_exits_2_before_starting_anything(capsys, monkeypatch):
    monkeypatch.setenv("TSDKD_DEVICE", "cpu")
    with pytest.raises(SystemExit) as excinfo:
        cpu_launch.main(["openrlhf.cli.train_dpo", "--model.model_name_or_path", "m"])
    assert excinfo.value.code == 2
    assert "needs CUDA" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.network
def test_local_ray_cluster_has_logical_gpus_and_the_cpu_env(tmp_path):
    script = """
import os, sys, tempfile
import ray
from tsdkd_plugin.host import device
tmp = tempfile.mkdtemp(prefix="tsdkd_ray_", dir="/tmp")
device.init_local_ray_cluster(num_gpus=2, temp_dir=tmp)
resources = ray.cluster_resources()

NAMES = ("OPENRLHF_DEVICE", "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR")

@ray.remote(num_gpus=1)
def worker_view():
    return ray.get_gpu_ids(), [os.environ.get(name) for name in NAMES]

gpu_ids, env = ray.get(worker_view.remote())
ray.shutdown()
import shutil; shutil.rmtree(tmp, ignore_errors=True)
print(resources["GPU"], resources["CPU"], len(gpu_ids), *env)
"""
    env = {**os.environ, "TSDKD_DEVICE": "cpu"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "2.0 8.0 1 cpu 1 cpu"
