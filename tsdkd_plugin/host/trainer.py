"""Driver side: OpenRLHF's PPO trainer loop with a teacher-ranked experience maker.

`PPOTrainer` already does everything TSD-KD needs around the loss: prompt
dataloading and resumption, vLLM rollouts of n candidates per prompt
(`SamplesGenerator`), pushing experiences to the actor group, weight sync to
vLLM after every update, logging to wandb/tensorboard, checkpoints and eval.
We keep all of that and swap only the experience maker: instead of reference
log-probs, critic values and advantages, an experience carries the teacher's
signals for the student's own samples.
"""

from __future__ import annotations

import time
from typing import List

import ray
import torch

from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.utils.logging_utils import init_logger

from tsdkd_plugin.host.experience import group_ids_from_rollout_index
from tsdkd_plugin.host.off_policy import is_off_policy_step, replace_with_reference_responses

logger = init_logger(__name__)


class TeacherRankedExperienceMaker(RemoteExperienceMaker):
    """Experiences = student samples + teacher signals (+ verifier rewards if configured).

    Separate teacher group (sparse transport): the policy group proposes its top-k
    candidates per position, then the teacher group scores the samples and orders
    the candidates. Colocated teacher (dense transport): the policy group's
    in-process teacher only returns sequence scores here; dense logits are computed
    in the training step.
    """

    def __init__(self, actor_model_group, teacher_model_group, kl_controller, strategy, tokenizer):
        super().__init__(actor_model_group, None, None, None, kl_controller, strategy, tokenizer)
        self.teacher_model_group = teacher_model_group

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples) -> List[Experience]:
        started = time.time()
        samples_list = self.split_rollout_samples(rollout_samples)
        batch = dict(
            sequences=[s.sequences for s in samples_list],
            action_mask=[s.action_mask for s in samples_list],
            attention_mask=[s.attention_mask for s in samples_list],
        )
        duplicate_factor = self.args.ds.ring_attn_size * self.args.ds.tensor_parallel_size
        if self.teacher_model_group is None:
            refs = self.actor_model_group.async_run_method_batch(method_name="colocated_teacher_scores", **batch)
            signals_list = self._flatten_results(refs, duplicate_factor)
        else:
            refs = self.actor_model_group.async_run_method_batch(method_name="student_candidates", **batch)
            candidates = self._flatten_results(refs, duplicate_factor)
            teacher_duplicates = 1  # the teacher group runs without ring attention / TP
            refs = self.teacher_model_group.async_run_method_batch(
                method_name="forward", candidate_ids=candidates, **batch
            )
            signals_list = self._flatten_results(refs, teacher_duplicates)

        n = self.args.rollout.n_samples_per_prompt
        for samples, signals in zip(samples_list, signals_list):
            signals["group_ids"] = group_ids_from_rollout_index(samples.index, n)
            samples.tsdkd = signals
            teacher_scores = signals["sequence_scores"].float()
            samples.info["teacher_score"] = teacher_scores
            if samples.rewards is None:
                # No verifier configured: the teacher's ranking score is the reward that gets logged.
                samples.rewards = teacher_scores
            samples.info["reward"] = samples.rewards.float()
        num_samples = sum(len(s.sequences) for s in samples_list)
        logger.info(f"TSD-KD experience for {num_samples} samples in {time.time() - started:.1f}s")
        return samples_list


class TSDKDTrainerImpl(PPOTrainer.__ray_actor_class__):
    def __init__(self, pretrain, strategy, actor_model_group, teacher_model_group, vllm_engines, **generate_kwargs):
        super().__init__(pretrain, strategy, actor_model_group, None, None, None, vllm_engines, **generate_kwargs)
        self.teacher_model_group = teacher_model_group
        self.experience_maker = TeacherRankedExperienceMaker(
            actor_model_group, teacher_model_group, self.kl_ctl, strategy, self.tokenizer
        )

    def train_step(self, rollout_samples, global_step: int):
        off_policy = is_off_policy_step(self.args.tsdkd.on_policy_fraction, self.args.train.seed, global_step)
        if off_policy:
            rollout_samples = replace_with_reference_responses(
                rollout_samples, self.tokenizer, self.args.rollout.max_new_tokens, self.args.data.max_len
            )
        status, global_step = super().train_step(rollout_samples, global_step)
        status["tsdkd/off_policy_step"] = float(off_policy)
        return status, global_step


TSDKDTrainer = ray.remote(TSDKDTrainerImpl)
