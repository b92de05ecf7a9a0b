"""Driver side: OpenRLHF's PPO trainer loop with a teacher-ranked experience maker.

`PPOTrainer` already does everything TSD-KD needs around the loss: prompt
dataloading and resumption, vLLM rollouts of n candidates per prompt
(`SamplesGenerator`), pushing experiences to the actor group, weight sync to
vLLM after every update, logging to wandb/tensorboard, checkpoints and eval.
We keep all of that and swap only the experience maker: instead of reference
log-probs, critic values and advantages, an experience carries the teacher's
signals for the student's own samples, from whichever teacher the run has
(host/teachers/: the experience maker does not know where it runs).
"""

from __future__ import annotations

import time

import ray
import torch

from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.logging_utils import init_logger

from tsdkd_plugin.host.checkpoint import DRIVER_RNG_KEY, capture_rng_state, restore_rng_state
from tsdkd_plugin.host.experience import group_ids_from_rollout_index
from tsdkd_plugin.host.faults import stop_reason
from tsdkd_plugin.host.off_policy import is_off_policy_step, replace_with_reference_responses
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.seeded_sampling import SeededDispatch
from tsdkd_plugin.host.teachers import DriverTeacher, StepSamples, driver_teacher

logger = init_logger(__name__)


def transport_bytes_per_token(samples_list, signals_list) -> float:
    """Bytes of teacher signals shipped per response token (the sparse transport's cost)."""
    total_bytes = sum(t.numel() * t.element_size() for signals in signals_list for t in signals.values())
    tokens = sum(float(s.action_mask.sum()) for s in samples_list)
    return total_bytes / max(tokens, 1.0)


class TeacherRankedExperienceMaker(RemoteExperienceMaker):
    """Experiences = student samples + teacher signals (+ verifier rewards if configured).

    The teacher (`DriverTeacher`, host/teachers/) returns its signals per micro-batch in the wire
    format; they ride with the experience (`experience.tsdkd`) to the policy actors, where the
    teacher's actor-side half turns them (or its own model) into the objective's TeacherSignals.
    """

    def __init__(self, actor_model_group, teacher: DriverTeacher, kl_controller, strategy, tokenizer):
        super().__init__(actor_model_group, None, None, None, kl_controller, strategy, tokenizer)
        self.teacher = teacher
        self.last_timing: dict = {}  # seconds per phase of the last batch (tsdkd/time_*: upstream sums timing/* into step_total)

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples) -> list[Experience]:
        started = time.time()
        samples_list = self.split_rollout_samples(rollout_samples)
        step_samples = StepSamples(
            sequences=[s.sequences for s in samples_list],
            action_mask=[s.action_mask for s in samples_list],
            attention_mask=[s.attention_mask for s in samples_list],
        )
        times: dict[str, float] = {}
        signals_list = self.teacher.signals(step_samples, times)
        times["tsdkd/transport_bytes_per_token"] = transport_bytes_per_token(samples_list, signals_list)
        self.last_timing = times

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


class SeededSamplesGenerator(SeededDispatch, SamplesGenerator):
    """Upstream's sample generator with a seed per sample and a content-fixed rollout order
    (host/seeded_sampling.py), so a resumed run samples what the uninterrupted one did."""


class TSDKDTrainerImpl(PPOTrainer.__ray_actor_class__):
    def __init__(self, pretrain, strategy, actor_model_group, teacher_model_group, vllm_engines, run: RunConfig,
                 **generate_kwargs):
        """`teacher_model_group`: the teacher's Ray group when it has one (host/launch.py), else None;
        `run`: the run's options (validated by the CLI)."""
        # The prompt DataLoader built by super().__init__ shuffles with this process's global torch RNG
        # (torch.distributed is not initialized here, so upstream's seeded DistributedSampler is not
        # used), which every process seeds at random: seed it, so the same command draws the same
        # prompt order (a resume restores the order from the checkpointed loader state either way).
        torch.manual_seed(strategy.args.train.seed)
        super().__init__(pretrain, strategy, actor_model_group, None, None, None, vllm_engines, **generate_kwargs)
        self.run = run
        teacher = driver_teacher(
            run, policy_group=actor_model_group, teacher_group=teacher_model_group,
            duplicate_factor=strategy.args.ds.ring_attn_size * strategy.args.ds.tensor_parallel_size,
            ckpt_path=strategy.args.ckpt.path,
        )  # fmt: skip
        self.experience_maker = TeacherRankedExperienceMaker(actor_model_group, teacher, self.kl_ctl, strategy,
                                                             self.tokenizer)
        self.samples_generator = SeededSamplesGenerator(
            strategy=strategy,
            prompts_dataloader=self.prompts_dataloader,
            eval_dataloader=self.eval_dataloader,
            tokenizer=self.tokenizer,
            vllm_engines=vllm_engines,
        )
        self.samples_generator.sampling_seed = strategy.args.train.seed

    def init_checkpoint_states(self) -> dict:
        """Upstream's resume states (step, episode, consumed prompts, prompt loader); on a resume also
        this process's RNG states and the sample seeds' position in the prompt stream."""
        states = super().init_checkpoint_states()
        self.samples_generator.prompts_dispatched = states.get("total_consumed_prompts", 0)
        restore_rng_state(states.get(DRIVER_RNG_KEY))
        return states

    def save_logs_and_checkpoints(self, global_step: int, logs_dict=None, client_states=None) -> None:
        if client_states is not None:  # saved with the checkpoint (DeepSpeed client states) when one is due
            client_states[DRIVER_RNG_KEY] = capture_rng_state()
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

    def fit(self, global_step: int = 0) -> None:
        try:
            super().fit(global_step)
        except Exception as error:
            if stop_reason(error) is not None:
                # A stopped run keeps what it logged: upstream closes (flushes) the trackers only
                # after the last step.
                for tracker in (self.wandb_logger, self.tensorboard_logger):
                    if tracker is not None:
                        tracker.close()
            raise

    def train_step(self, rollout_samples, global_step: int):
        off_policy = is_off_policy_step(self.run.on_policy_fraction, self.args.train.seed, global_step)
        if off_policy:
            rollout_samples = replace_with_reference_responses(
                rollout_samples, self.tokenizer, self.args.rollout.max_new_tokens, self.args.data.max_len
            )
        status, global_step = super().train_step(rollout_samples, global_step)
        status["tsdkd/off_policy_step"] = float(off_policy)
        status.update(self.experience_maker.last_timing)
        return status, global_step


TSDKDTrainer = ray.remote(TSDKDTrainerImpl)
