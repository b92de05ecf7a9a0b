"""The TSD-KD policy actor and teacher in this process: a DeepSpeed world of one, no Ray, no vLLM.

For tests and benchmarks of the real training step (`TSDKDActorTrainer.training_step`): the
actor is built exactly as its Ray worker builds it (`TSDKDPolicyActorImpl.init_model_from_pretrained`
under upstream's `DeepspeedStrategy`, the trainer-class swap included), and a micro-batch is
given the teacher signals the experience maker would attach (student candidates, then the
separate teacher's sparse signals or the colocated teacher's sequence scores). What is left out
is only the placement (Ray actors, placement groups) and the rollout engine: responses are
passed in.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.utils import get_strategy

from tsdkd_plugin.host.actor import TSDKDPolicyActorImpl
from tsdkd_plugin.host.device import set_single_process_dist_env
from tsdkd_plugin.host.experience import group_ids_from_rollout_index
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.teachers import TeacherModelActor


def _world_of_one() -> tuple:
    env = set_single_process_dist_env()
    return 1, 0, env["MASTER_ADDR"], int(env["MASTER_PORT"])


def build_policy_actor(
    args: SimpleNamespace, run: RunConfig, shared_vocab_size: int, max_steps: int = 1
) -> TSDKDPolicyActorImpl:
    """The policy actor (DeepSpeed engine, optimizer, scheduler, TSD-KD trainer; colocated teacher
    with --teacher.placement colocate) as a plain object; its trainer is `.trainer`."""
    actor = TSDKDPolicyActorImpl(*_world_of_one())
    actor.init_model_from_pretrained(get_strategy(args), args.actor.model_name_or_path, max_steps, None,
                                     run=run, shared_vocab_size=shared_vocab_size)
    return actor


def build_separate_teacher(args: SimpleNamespace, run: RunConfig, shared_vocab_size: int):
    """The separate teacher group's actor (`TeacherModelActor`) as a plain object."""
    teacher = TeacherModelActor.__ray_actor_class__(*_world_of_one())
    teacher.init_model_from_pretrained(get_strategy(args), run.teacher.model_name_or_path, run, shared_vocab_size)
    return teacher


def experience_with_signals(
    policy: TSDKDPolicyActorImpl,
    teacher,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    n_samples_per_prompt: int,
    candidate_ids: torch.Tensor | None = None,
) -> Experience:
    """One micro-batch as the training step receives it: rows are [prompt | response] (consecutive
    groups of n per prompt), with the teacher signals `TeacherRankedExperienceMaker` attaches.

    teacher: a `build_separate_teacher` actor (sparse transport), or None when the policy holds a
    colocated teacher. candidate_ids: the student's top-k [B, A, k] to use instead of asking the
    policy (so that two policies can be given the very same signals)."""
    if teacher is None:
        signals = policy.in_process_teacher_signals(sequences, action_mask, attention_mask)
    else:
        if candidate_ids is None:
            candidate_ids = policy.student_candidates(sequences, action_mask, attention_mask)
        signals = teacher.forward(sequences, action_mask, attention_mask, candidate_ids)
    signals["group_ids"] = group_ids_from_rollout_index(list(range(sequences.shape[0])), n_samples_per_prompt)
    experience = Experience(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask)
    experience.tsdkd = signals
    return experience

