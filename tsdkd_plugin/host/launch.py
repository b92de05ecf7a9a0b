"""Wiring of the TSD-KD Ray job: vLLM engines, policy group, teacher group, trainer.

Mirrors the shape of upstream `train_ppo_ray.train` (same placement-group rules
and group classes), with the reference/critic/reward groups replaced by one
teacher group. Everything is placed by `--*.num_nodes` / `--*.num_gpus_per_node`,
so the same command runs on one node or many under `ray job submit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, List, Optional

import ray
from ray.util.placement_group import placement_group

from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
from openrlhf.utils import get_strategy

from tsdkd_plugin.host.actor import TSDKDPolicyActor
from tsdkd_plugin.host.args import teacher_signal_options, tsdkd_options
from tsdkd_plugin.host.teacher import TeacherModelActor
from tsdkd_plugin.host.trainer import TSDKDTrainer
from tsdkd_plugin.objective import TSDKDConfig


@dataclass
class TSDKDJob:
    """Handles of a launched (initialized, not yet trained) TSD-KD job."""

    trainer: Any
    actor_group: RayActorGroup
    teacher_group: Optional[RayActorGroup]
    vllm_engines: List[Any]


def launch(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> TSDKDJob:
    """Create the vLLM engines and the policy/teacher groups, load the models."""
    strategy = get_strategy(args)
    strategy.print(args)

    ring_tp = args.ds.ring_attn_size * args.ds.tensor_parallel_size
    shared_pg = None
    if args.train.colocate_all:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.actor.num_nodes * args.actor.num_gpus_per_node)]
        shared_pg = placement_group(bundles, strategy="PACK")
        ray.get(shared_pg.ready())

    vllm_engines = create_vllm_engines(
        args.vllm.num_engines,
        args.vllm.tensor_parallel_size,
        args.actor.model_name_or_path,
        args.train.seed,
        args.train.full_determinism_enable,
        args.vllm.enable_prefix_caching,
        args.vllm.enforce_eager,
        args.data.max_len,
        shared_pg,
        args.vllm.gpu_memory_utilization,
        args.vllm.enable_sleep,
        None,
        agent_func_path=args.train.agent_func_path,
        remote_rm_url=args.reward.remote_url,
        # The engine samples from the same numerics the actor trains in (fp32 on CPU runs).
        dtype="float32" if args.ds.param_dtype == "fp32" else "bfloat16",
    )

    actor_group = RayActorGroup(
        args.actor.num_nodes,
        args.actor.num_gpus_per_node,
        TSDKDPolicyActor,
        pg=shared_pg,
        num_gpus_per_actor=0.2 if shared_pg else 1,
        duplicate_actors=ring_tp,
    )
    teacher_group = None
    if args.teacher.placement == "separate":
        teacher_group = RayActorGroup(
            args.teacher.num_nodes, args.teacher.num_gpus_per_node, TeacherModelActor, pg=None, num_gpus_per_actor=1
        )

    trainer = TSDKDTrainer.remote(
        args.actor.model_name_or_path,
        strategy,
        actor_group,
        teacher_group,
        vllm_engines,
        do_sample=True,
        max_len=args.data.max_len,
        max_new_tokens=args.rollout.max_new_tokens,
        temperature=args.rollout.temperature,
        top_p=args.rollout.top_p,
    )
    max_steps = ray.get(trainer.get_max_steps.remote())

    refs = actor_group.async_init_model_from_pretrained(
        strategy,
        args.actor.model_name_or_path,
        max_steps,
        vllm_engines,
        tsdkd_options=tsdkd_options(args, config, shared_vocab_size),
    )
    if teacher_group is not None:
        refs += teacher_group.async_init_model_from_pretrained(
            strategy, args.teacher.model_name_or_path, teacher_signal_options(args, config, shared_vocab_size)
        )
    ray.get(refs)
    return TSDKDJob(trainer, actor_group, teacher_group, vllm_engines)


def train(args: SimpleNamespace, config: TSDKDConfig, shared_vocab_size: int) -> TSDKDJob:
    """Launch, train (upstream PPOTrainer.fit loop: rollouts, experience, updates, weight sync,
    logging, checkpoints), then save the final model to --ckpt.output_dir."""
    job = launch(args, config, shared_vocab_size)
    ray.get(job.trainer.fit.remote())
    ray.get(job.actor_group.async_save_model())
    return job
