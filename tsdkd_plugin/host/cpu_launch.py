"""Run an unmodified OpenRLHF CLI module on a CPU-only machine.

    python -m tsdkd_plugin.host.cpu_launch [--num-gpus N] [--num-cpus N] [--threads N]
                                           [--ray | --no-ray] MODULE [MODULE ARGS...]

Examples:

    python -m tsdkd_plugin.host.cpu_launch openrlhf.cli.train_ppo_ray --actor.num_gpus_per_node 1 ...
    python -m tsdkd_plugin.host.cpu_launch openrlhf.cli.train_sft --ds.param_dtype fp32 ...

What it does before running MODULE as `__main__` (runpy, same process):
- sets the CPU-mode environment (device.cpu_mode_env: OPENRLHF_DEVICE=cpu, DS_ACCELERATOR=cpu,
  vLLM-CPU KV cache size, thread limits, and the engines' dtype from --ds.param_dtype);
- Ray modules (train_ppo_ray; or --ray): starts a private local Ray cluster with logical GPUs,
  enough for the placement groups the given arguments ask for (or --num-gpus), unless Ray is
  already initialized or RAY_ADDRESS names a cluster to join. Upstream train_ppo_ray only calls
  ray.init() when Ray is not initialized, so it runs on that cluster;
- other modules (train_sft, train_dpo, train_rm: DeepSpeed without a launcher): sets
  MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK for a world of one, and holds the SFT and
  preference datasets' row columns as lists (`tsdkd_plugin.host.dataset_columns`: same samples,
  a fifth less time per toy SFT step).

It refuses to start (exit status 2) when the arguments select flash-attention, which needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence

PROG = "python -m tsdkd_plugin.host.cpu_launch"

# CLI modules that run on Ray and build their placement groups from the arguments.
RAY_MODULES = {"openrlhf.cli.train_ppo_ray"}

# Upstream CLIs whose --ds.attn_implementation defaults to flash_attention_2.
FLASH_ATTENTION_DEFAULT_MODULES = {
    "openrlhf.cli.train_ppo_ray",
    "openrlhf.cli.train_sft",
    "openrlhf.cli.train_dpo",
    "openrlhf.cli.train_rm",
}


def _ppo_ray_placement_parser() -> argparse.ArgumentParser:
    """The train_ppo_ray flags (with upstream 0.11.2 defaults) that decide how many GPU bundles are requested."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for group in ("actor", "ref", "critic", "reward"):
        parser.add_argument(f"--{group}.num_nodes", type=int, default=1)
        parser.add_argument(f"--{group}.num_gpus_per_node", type=int, default=8)
    parser.add_argument("--vllm.num_engines", type=int, default=None)
    parser.add_argument("--vllm.tensor_parallel_size", type=int, default=1)
    parser.add_argument("--algo.kl.init_coef", type=float, default=0.01)
    parser.add_argument("--algo.advantage.estimator", type=str, default="gae")
    parser.add_argument("--reward.remote_url", type=str, default=None)
    parser.add_argument("--train.agent_func_path", type=str, default=None)
    for flag in ("colocate_all", "colocate_actor_ref", "colocate_critic_reward", "async_enable"):
        parser.add_argument(f"--train.{flag}", action="store_true", default=False)
    return parser


def logical_gpus_for_ppo_ray(module_args: Sequence[str]) -> int:
    """How many GPU bundles upstream train_ppo_ray (0.11.2) will request for these arguments.

    Mirrors train_ppo_ray.train: colocate_all puts every model (and the engines) on the actor's
    bundles; otherwise engines, actor, reference (KL coef > 0), critic (GAE) and reward model
    (no remote URL) each get their own, except where colocate_actor_ref / colocate_critic_reward
    share them.
    """
    args, _ = _ppo_ray_placement_parser().parse_known_args(list(module_args))
    a = vars(args)

    def gpus(group: str) -> int:
        return a[f"{group}.num_nodes"] * a[f"{group}.num_gpus_per_node"]

    actor = gpus("actor")
    if a["train.colocate_all"] and not a["train.async_enable"]:
        return actor
    total = actor
    if a["vllm.num_engines"]:
        total += a["vllm.num_engines"] * a["vllm.tensor_parallel_size"]
    if a["algo.kl.init_coef"] > 0 and not (a["train.colocate_actor_ref"] or a["train.colocate_all"]):
        total += gpus("ref")
    has_critic = a["algo.advantage.estimator"] == "gae"
    has_reward_model = not (a["reward.remote_url"] or a["train.agent_func_path"])
    shared_critic_reward = a["train.colocate_critic_reward"] and has_critic
    if a["train.colocate_all"]:  # async: only the DeepSpeed models share the actor's bundles
        return total
    if has_critic:
        total += gpus("critic")
    if has_reward_model and not shared_critic_reward:
        total += gpus("reward")
    return total


def _flag_value(module_args: Sequence[str], flag: str) -> str | None:
    """The last value given for `flag` ("--flag v" or "--flag=v"), or None."""
    value = None
    for i, arg in enumerate(module_args):
        if arg == flag and i + 1 < len(module_args):
            value = module_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def flash_attention_problem(module: str, module_args: Sequence[str]) -> str | None:
    """A sentence explaining why these arguments cannot run on CPU, or None."""
    if module not in FLASH_ATTENTION_DEFAULT_MODULES:
        return None
    if "--ds.packing_samples" in module_args:
        return (
            "--ds.packing_samples needs flash-attention (CUDA); drop it on CPU "
            "(and pass --ds.attn_implementation sdpa)."
        )
    attn = _flag_value(module_args, "--ds.attn_implementation") or "flash_attention_2"
    if "flash" in attn:
        return (
            f"{module} would use --ds.attn_implementation {attn}, which needs CUDA; "
            "on CPU pass --ds.attn_implementation sdpa (or eager)."
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run an OpenRLHF CLI module on CPU (logical-GPU Ray cluster, gloo, vLLM-CPU).",
    )
    parser.add_argument("--num-gpus", type=int, default=None, help="logical GPUs for Ray (default: what the job needs)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for Ray (default: 2 * GPUs + 4)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process (default: cores / 2)")
    ray_choice = parser.add_mutually_exclusive_group()
    ray_choice.add_argument("--ray", dest="ray", action="store_true", default=None, help="start a Ray cluster")
    ray_choice.add_argument("--no-ray", dest="ray", action="store_false", help="do not start a Ray cluster")
    parser.add_argument("module", help="module to run as __main__, e.g. openrlhf.cli.train_ppo_ray")
    parser.add_argument("module_args", nargs=argparse.REMAINDER, help="arguments for the module")
    return parser


def main(argv: list[str] | None = None) -> None:
    options = build_parser().parse_args(argv)
    module, module_args = options.module, list(options.module_args)

    from tsdkd_plugin.host import device

    if not device.cpu_mode():
        sys.stderr.write(
            f"{PROG}: error: this machine has CUDA; run {module} directly (set TSDKD_DEVICE=cpu to force CPU mode).\n"
        )
        sys.exit(2)
    problem = flash_attention_problem(module, module_args)
    if problem:
        sys.stderr.write(f"{PROG}: error: {problem}\n")
        sys.exit(2)

    # The engines' dtype follows --ds.param_dtype (stock create_vllm_engines has no dtype parameter);
    # a value that is no dtype is left to the module's own parser to reject.
    param_dtype = _flag_value(module_args, "--ds.param_dtype")
    device.apply_cpu_mode_env(
        options.threads, param_dtype=param_dtype if param_dtype in device.VLLM_DTYPE_OF_PARAM_DTYPE else None
    )
    use_ray = options.ray if options.ray is not None else module in RAY_MODULES

    started_ray = False
    if use_ray:
        import ray

        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            num_gpus = options.num_gpus
            if num_gpus is None:
                num_gpus = logical_gpus_for_ppo_ray(module_args) if module in RAY_MODULES else 1
            print(f"[cpu_launch] starting a local Ray cluster with {num_gpus} logical GPU(s)", flush=True)
            device.init_local_ray_cluster(
                num_cpus=options.num_cpus, num_gpus=num_gpus, threads_per_process=options.threads
            )
            started_ray = True
    else:
        device.set_single_process_dist_env()
        # train_sft / train_dpo / train_rm read their rows from lazy `datasets` columns (patches/README.md, item 8).
        from tsdkd_plugin.host.dataset_columns import hold_columns_as_lists

        hold_columns_as_lists()

    sys.argv = [module, *module_args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
