"""CPU mode: run OpenRLHF's Ray + DeepSpeed + vLLM pipeline on machines without GPUs.

OpenRLHF places every model on `{"GPU": 1, "CPU": 1}` bundles and Ray actors with
`num_gpus`. In CPU mode we start Ray with *logical* GPUs (Ray accepts
`num_gpus=M` without hardware), so OpenRLHF's placement code runs untouched and is
exercised as on a GPU cluster; the CUDA-only calls inside the actors are handled
by patches/openrlhf-0.11.2-cpu.patch (its `openrlhf/utils/device.py` helper).

CPU mode is on when torch has no CUDA, or when TSDKD_DEVICE=cpu (or the patch's
OPENRLHF_DEVICE=cpu) forces it. Forcing it on a CUDA host is meant for tests of the
CPU code paths with a CPU build of vLLM; see docs/cpu_mode.md.

Only torch and the standard library are imported at module level: `cpu_launch`
imports this module before Ray or OpenRLHF are loaded.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

# Environment that CPU-mode processes (the driver and every Ray worker) need.
#   OPENRLHF_DEVICE / TSDKD_DEVICE: the patched OpenRLHF and this plugin agree on the device.
#   DS_ACCELERATOR: DeepSpeed would otherwise probe for accelerators in each process.
#   VLLM_CPU_KVCACHE_SPACE: GiB of KV cache per vLLM-CPU engine (its default grabs a large share
#     of RAM); 1 GiB holds thousands of tokens of a tiny model.
#   VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM-CPU otherwise pins its threads to cores that the
#     training processes on the same machine also need.
#   VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM-CPU otherwise runs its model in a third process beside
#     the engine actor and its engine core ("mp" executor, forced on CPU for OpenMP core binding,
#     which nobind above turns off); with 0 the engine core runs the model itself ("uni" executor;
#     OpenRLHF's AsyncLLMEngine keeps its engine-core process either way). An 8-rollout TSD-KD
#     run takes 1.16x as long with the third process (benchmarks/SIDE_BY_SIDE.md), with the same
#     loss on every rollout (stock OpenRLHF sets the same variable for
#     --train.full_determinism_enable).
#   TOKENIZERS_PARALLELISM / RAY_ENABLE_ZERO_COPY_TORCH_TENSORS: what upstream train_ppo_ray's own
#     ray.init would set; it skips its ray.init when a cluster is already initialized.
CPU_MODE_ENV_DEFAULTS: dict[str, str] = {
    "OPENRLHF_DEVICE": "cpu",
    "TSDKD_DEVICE": "cpu",
    "DS_ACCELERATOR": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}

# The vLLM engines' dtype in CPU mode. Stock OpenRLHF creates its engines in bfloat16, with no
# parameter to change that; the CPU patch's `openrlhf.utils.device.vllm_engine_dtype()` reads this
# variable, on the CPU only (on GPUs it is ignored, so GPU launches never depend on it). Weights are
# synced into the engines as the actor holds them, so it must follow --ds.param_dtype.
CPU_VLLM_DTYPE_VAR = "OPENRLHF_CPU_VLLM_DTYPE"
VLLM_DTYPE_OF_PARAM_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Ray's default object store takes 30% of RAM; CPU-mode runs move tiny models and rollouts.
DEFAULT_OBJECT_STORE_BYTES = 1 << 30


def cpu_mode() -> bool:
    """True when training runs on the CPU: torch has no CUDA, or TSDKD_DEVICE/OPENRLHF_DEVICE is "cpu"."""
    for var in ("TSDKD_DEVICE", "OPENRLHF_DEVICE"):
        if os.environ.get(var, "").strip().lower() == "cpu":
            return True
    return not torch.cuda.is_available()


def device_type() -> str:
    """ "cpu" in CPU mode, "cuda" otherwise."""
    return "cpu" if cpu_mode() else "cuda"


def current_device():
    """torch.cuda.current_device() on GPUs (an index, as OpenRLHF uses it), torch.device("cpu") in CPU mode."""
    return torch.device("cpu") if cpu_mode() else torch.cuda.current_device()


def ema_device() -> str:
    """The device argument of DeepspeedStrategy.moving_average: upstream passes "cuda"."""
    return device_type()


def default_threads_per_process() -> int:
    """Intra-op threads for each worker process: half the cores (a trainer and an engine share the machine)."""
    return max(1, (os.cpu_count() or 2) // 2)


def cpu_mode_env(threads_per_process: int | None = None, param_dtype: str | None = None) -> dict[str, str]:
    """The environment CPU-mode processes need; values already set in os.environ win, except
    the engines' dtype, which follows `param_dtype` (the run's --ds.param_dtype) when given.

    OMP_NUM_THREADS is included because Ray otherwise sets it per worker from the
    actor's logical CPU share, which says nothing about the real cores.
    """
    env = dict(CPU_MODE_ENV_DEFAULTS)
    env["OMP_NUM_THREADS"] = str(threads_per_process or default_threads_per_process())
    for name in list(env):
        if name in os.environ:
            env[name] = os.environ[name]
    if param_dtype is not None:
        if param_dtype not in VLLM_DTYPE_OF_PARAM_DTYPE:
            raise ValueError(
                f"--ds.param_dtype {param_dtype!r} has no vLLM dtype; use one of {', '.join(VLLM_DTYPE_OF_PARAM_DTYPE)}"
            )
        env[CPU_VLLM_DTYPE_VAR] = VLLM_DTYPE_OF_PARAM_DTYPE[param_dtype]
    elif CPU_VLLM_DTYPE_VAR in os.environ:
        env[CPU_VLLM_DTYPE_VAR] = os.environ[CPU_VLLM_DTYPE_VAR]
    return env


def apply_cpu_mode_env(threads_per_process: int | None = None, param_dtype: str | None = None) -> dict[str, str]:
    """Set the CPU-mode environment in this process (see cpu_mode_env) and return it."""
    env = cpu_mode_env(threads_per_process, param_dtype)
    os.environ.update(env)
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports with nothing listening (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def set_single_process_dist_env() -> dict[str, str]:
    """Make torch.distributed / DeepSpeed start as a world of one without a launcher.

    Without MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, `deepspeed.init_distributed`
    falls back to MPI discovery and fails. Values already set are kept; returns what is in effect.
    (OpenRLHF's Ray actors set these themselves, per rank.)

    MASTER_PORT defaults to 0: a world of one has no other rank that must find its store, so the
    store's server lets the OS pick the port when it listens. A port picked here and released
    (free_ports) could be taken before the store binds it, and was: two OpenRLHF CLIs started side
    by side (teacher and student SFT) drew the same one, and the second failed with EADDRINUSE.
    (DeepSpeed's CPU shared-memory all-reduce names its segment after MASTER_ADDR and MASTER_PORT,
    but starts only when LOCAL_SIZE is set, which a launcher does, along with MASTER_PORT.)
    """
    defaults = {
        "MASTER_ADDR": "127.0.0.1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_PORT": "0",  # the OS picks the port as the store binds (see above)
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in defaults}


def init_local_ray_cluster(
    num_cpus: int | None = None,
    num_gpus: int = 1,
    *,
    threads_per_process: int | None = None,
    param_dtype: str | None = None,
    temp_dir: str | None = None,
    object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
    **ray_init_kwargs: Any,
) -> dict[str, Any]:
    """Start a private local Ray cluster with `num_gpus` logical GPUs for CPU mode.

    - num_gpus: logical GPUs, at least what the job's placement groups ask for (one per
      actor/engine bundle; colocated models share bundles).
    - num_cpus: logical CPUs (default 2 * num_gpus + 4): each bundle takes one and every
      un-pinned Ray actor needs one to be scheduled. They are not real cores.
    - threads_per_process: OMP_NUM_THREADS for the workers (default: half the cores).
    - param_dtype: the run's --ds.param_dtype; the vLLM engines are created in the matching dtype.
    - temp_dir: Ray's session directory root (default $TSDKD_RAY_TMPDIR, else Ray's /tmp/ray).
    - other keyword arguments go to ray.init.

    Always starts a new cluster (address="local"): connecting to another user's `ray start`
    cluster on the same machine would schedule onto it. Does nothing if Ray is already
    initialized in this process. Returns the ray.init context's address info (empty dict
    when Ray was already up). The cluster lives until ray.shutdown() or process exit.
    """
    import ray

    if ray.is_initialized():
        return {}
    if not cpu_mode():
        raise RuntimeError(
            "init_local_ray_cluster starts a CPU-mode cluster with logical GPUs, but this machine has CUDA; "
            "use ray.init() for GPU runs, or set TSDKD_DEVICE=cpu to force CPU mode."
        )
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1 (OpenRLHF places every model on a GPU bundle), got {num_gpus}.")
    env = apply_cpu_mode_env(threads_per_process, param_dtype)
    runtime_env = dict(ray_init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    temp_dir = temp_dir or os.environ.get("TSDKD_RAY_TMPDIR") or None
    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
        ray_init_kwargs.setdefault("_temp_dir", temp_dir)
    ray_init_kwargs.setdefault("include_dashboard", False)
    context = ray.init(
        address="local",
        num_cpus=num_cpus if num_cpus is not None else 2 * num_gpus + 4,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        runtime_env=runtime_env,
        **ray_init_kwargs,
    )
    return dict(getattr(context, "address_info", {}) or {})


def where_am_i() -> dict:
    """This Ray actor's node and logical GPUs (for the run log and the placement tests)."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
