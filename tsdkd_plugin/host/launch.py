"""Wiring of the TSD-KD Ray job: vLLM engines, policy group, teacher group, trainer.

Mirrors the shape of upstream `train_ppo_ray.train` (same placement-group rules
and group classes), with the reference/critic/reward groups replaced by one
teacher group (for a teacher that has one: `TeacherConfig.has_own_group`).
Everything is placed by `--*.num_nodes` / `--*.num_gpus_per_node`, so the same
command runs on one node or many under `ray job submit`. Upstream's flags are read
from `args`; TSD-KD's own options from the typed `run` (host/run_config.py), which
every actor receives as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import ray
from ray.util.placement_group import placement_group

from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
from openrlhf.utils import get_strategy

from tsdkd_plugin.host.actor import TSDKDPolicyActor
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers import TeacherModelActor
from tsdkd_plugin.host.trainer import TSDKDTrainer


@dataclass
class TSDKDJob:
    """Handles of a launched (initialized, not yet trained) TSD-KD job."""

    trainer: Any
    actor_group: RayActorGroup
    teacher_group: RayActorGroup | None
    vllm_engines: list[Any]


# Each upstream call below takes its arguments from one small builder, by keyword: the same
# builders feed tests/host/test_stock_contract.py, which binds them to the PRISTINE openrlhf
# 0.11.2 signatures (the CPU patch must not be what makes a GPU launch work).


def vllm_engine_arguments(args: SimpleNamespace, shared_pg) -> dict[str, Any]:
    """Keyword arguments of upstream `create_vllm_engines` for the student's rollout engines."""
    return dict(
        num_engines=args.vllm.num_engines,
        tensor_parallel_size=args.vllm.tensor_parallel_size,
        pretrain=args.actor.model_name_or_path,
        seed=args.train.seed,
        full_determinism=args.train.full_determinism_enable,
        enable_prefix_caching=args.vllm.enable_prefix_caching,
        enforce_eager=args.vllm.enforce_eager,
        max_model_len=args.data.max_len,
        shared_pg=shared_pg,
        gpu_memory_utilization=args.vllm.gpu_memory_utilization,
        vllm_enable_sleep=args.vllm.enable_sleep,
        logprobs_mode=None,
        agent_func_path=args.train.agent_func_path,
        remote_rm_url=args.reward.remote_url,
        # No dtype: stock OpenRLHF creates its engines in bf16. In CPU mode the engines follow
        # --ds.param_dtype through the environment (host/device.py, CPU_VLLM_DTYPE_VAR).
    )


def policy_group_arguments(args: SimpleNamespace, shared_pg) -> dict[str, Any]:
    """Keyword arguments of upstream `RayActorGroup` for the student (policy) group."""
    return dict(
        num_nodes=args.actor.num_nodes,
        num_gpus_per_node=args.actor.num_gpus_per_node,
        ray_actor_type=TSDKDPolicyActor,
        pg=shared_pg,
        num_gpus_per_actor=0.2 if shared_pg else 1,
        duplicate_actors=args.ds.ring_attn_size * args.ds.tensor_parallel_size,
    )


def teacher_group_arguments(run: RunConfig) -> dict[str, Any]:
    """Keyword arguments of upstream `RayActorGroup` for a separate teacher group (own GPUs)."""
    return dict(
        num_nodes=run.teacher.num_nodes,
        num_gpus_per_node=run.teacher.num_gpus_per_node,
        ray_actor_type=TeacherModelActor,
        pg=None,
        num_gpus_per_actor=1,
    )


def trainer_arguments(
    args: SimpleNamespace, run: RunConfig, strategy, actor_group, teacher_group, vllm_engines
) -> dict[str, Any]:
    """Keyword arguments of `TSDKDTrainer` (upstream `PPOTrainer` underneath)."""
    return dict(
        pretrain=args.actor.model_name_or_path,
        strategy=strategy,
        actor_model_group=actor_group,
        teacher_model_group=teacher_group,
        vllm_engines=vllm_engines,
        run=run,
        do_sample=True,
        max_len=args.data.max_len,
        max_new_tokens=args.rollout.max_new_tokens,
        temperature=args.rollout.temperature,
        top_p=args.rollout.top_p,
    )


def policy_init_arguments(
    args: SimpleNamespace, run: RunConfig, shared_vocab_size: int, strategy, max_steps: int, vllm_engines
) -> dict[str, Any]:
    """Keyword arguments of each policy actor's `init_model_from_pretrained`."""
    return dict(
        strategy=strategy,
        pretrain=args.actor.model_name_or_path,
        max_steps=max_steps,
        vllm_engines=vllm_engines,
        run=run,
        shared_vocab_size=shared_vocab_size,
    )


def teacher_init_arguments(run: RunConfig, shared_vocab_size: int, strategy) -> dict[str, Any]:
    """Keyword arguments of each teacher actor's `init_model_from_pretrained`."""
    return dict(
        strategy=strategy,
        pretrain=run.teacher.model_name_or_path,
        run=run,
        shared_vocab_size=shared_vocab_size,
    )


def launch(args: SimpleNamespace, run: RunConfig, shared_vocab_size: int) -> TSDKDJob:
    """Create the vLLM engines and the policy/teacher groups, load the models."""
    strategy = get_strategy(args)
    strategy.print(args)

    shared_pg = None
    if args.train.colocate_all:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.actor.num_nodes * args.actor.num_gpus_per_node)]
        shared_pg = placement_group(bundles, strategy="PACK")
        ray.get(shared_pg.ready())

    vllm_engines = create_vllm_engines(**vllm_engine_arguments(args, shared_pg))
    actor_group = RayActorGroup(**policy_group_arguments(args, shared_pg))
    teacher_group = None
    if run.teacher.has_own_group:
        teacher_group = RayActorGroup(**teacher_group_arguments(run))

    trainer = TSDKDTrainer.remote(**trainer_arguments(args, run, strategy, actor_group, teacher_group, vllm_engines))
    max_steps = ray.get(trainer.get_max_steps.remote())

    refs = actor_group.async_init_model_from_pretrained(
        **policy_init_arguments(args, run, shared_vocab_size, strategy, max_steps, vllm_engines)
    )
    if teacher_group is not None:
        refs += teacher_group.async_init_model_from_pretrained(**teacher_init_arguments(run, shared_vocab_size, strategy))
    ray.get(refs)
    return TSDKDJob(trainer, actor_group, teacher_group, vllm_engines)


def train(args: SimpleNamespace, run: RunConfig, shared_vocab_size: int) -> TSDKDJob:
    """Launch, train (upstream PPOTrainer.fit loop: rollouts, experience, updates, weight sync,
    logging, checkpoints), then save the final model to --ckpt.output_dir."""
    job = launch(args, run, shared_vocab_size)
    ray.get(job.trainer.fit.remote())
    ray.get(job.actor_group.async_save_model())
    return job
