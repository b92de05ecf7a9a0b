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
from typing import Any, Callable, List

import ray
import torch

from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.logging_utils import init_logger

from tsdkd_plugin.host.args import DEFAULT_TEACHER_MAX_RETRIES, DEFAULT_TEACHER_TIMEOUT_S
from tsdkd_plugin.host.checkpoint import DRIVER_RNG_KEY, capture_rng_state, restore_rng_state, resume_hint
from tsdkd_plugin.host.experience import group_ids_from_rollout_index
from tsdkd_plugin.host.faults import TrainingStoppedError, stop_reason, worker_error_line
from tsdkd_plugin.host.off_policy import is_off_policy_step, replace_with_reference_responses
from tsdkd_plugin.host.seeded_sampling import SeededDispatch

logger = init_logger(__name__)

# Pause between teacher attempts (capped by the timeout): a restarting node or a transient
# object-store error gets a moment; a dead actor fails again at once, so the total stays bounded.
TEACHER_RETRY_PAUSE_S = 2.0


class TeacherUnavailableError(TrainingStoppedError):
    """The teacher group failed, or did not answer in time, on every attempt."""


class TeacherFailedError(TrainingStoppedError):
    """The teacher raised an error that a retry would raise again."""


class RetriesExhausted(Exception):
    """Every attempt of `get_with_retries` failed; carries the count and the last error."""

    def __init__(self, attempts: int, last_error: BaseException):
        super().__init__(attempts, last_error)
        self.attempts, self.last_error = attempts, last_error


def first_line(error: BaseException, limit: int = 300) -> str:
    """A Ray error's str() is often a multi-line traceback; its first line says what happened."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_transient(error: BaseException) -> bool:
    """Can the same call succeed when tried again? Yes for what happens to a process, a node or a
    connection (a dead or restarting actor, a timeout, a lost object or connection); no for an
    exception the teacher's own code raised (a ValueError stays a ValueError on the same batch)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return isinstance(error.cause, (ConnectionError, TimeoutError))
    return isinstance(error, (ray.exceptions.RayError, TimeoutError))


def get_with_retries(
    submit: Callable[[], List[Any]],
    *,
    timeout_s: float,
    max_retries: int,
    what: str,
    get: Callable = ray.get,
    sleep: Callable[[float], None] = time.sleep,
) -> List[Any]:
    """get(submit(), timeout=timeout_s), re-submitting after a transient failure (`is_transient`),
    at most max_retries times; then RetriesExhausted. Any other error is raised at once.
    Total time <= (max_retries + 1) x (timeout_s + pause)."""
    last_error = None
    for attempt in range(1, max_retries + 2):
        refs = submit()
        try:
            return get(refs, timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as error:
            if not is_transient(error):
                raise
            last_error = error
            for ref in refs:  # best effort: drop queued work of a hung attempt
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            logger.warning(f"{what}: attempt {attempt}/{max_retries + 1} failed ({first_line(error)})")
            if attempt <= max_retries:
                sleep(min(TEACHER_RETRY_PAUSE_S, timeout_s))
    raise RetriesExhausted(max_retries + 1, last_error)


def transport_bytes_per_token(samples_list, signals_list) -> float:
    """Bytes of teacher signals shipped per response token (the sparse transport's cost)."""
    total_bytes = sum(t.numel() * t.element_size() for signals in signals_list for t in signals.values())
    tokens = sum(float(s.action_mask.sum()) for s in samples_list)
    return total_bytes / max(tokens, 1.0)


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
        self.last_timing: dict = {}  # seconds per phase of the last batch (tsdkd/time_*: upstream sums timing/* into step_total)

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
        phase_started = time.time()
        if self.teacher_model_group is None:
            refs = self.actor_model_group.async_run_method_batch(method_name="colocated_teacher_scores", **batch)
            signals_list = self._flatten_results(refs, duplicate_factor)
            self.last_timing = {"tsdkd/time_teacher_scoring": time.time() - phase_started}
        else:
            refs = self.actor_model_group.async_run_method_batch(method_name="student_candidates", **batch)
            candidates = self._flatten_results(refs, duplicate_factor)
            candidates_done = time.time()
            signals_list = self._teacher_signals(candidates, batch)
            self.last_timing = {
                "tsdkd/time_student_candidates": candidates_done - phase_started,
                "tsdkd/time_teacher_scoring": time.time() - candidates_done,  # forward + sparse signals + transport
            }
        self.last_timing["tsdkd/transport_bytes_per_token"] = transport_bytes_per_token(samples_list, signals_list)

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

    def _teacher_signals(self, candidates, batch) -> List:
        """The separate teacher group's signals, each attempt bounded by --teacher.timeout_s and
        retried --teacher.max_retries times; then the run stops with TeacherUnavailableError.
        (A dead teacher actor is not restarted: its retries fail at once, and the run stops.)"""
        teacher = self.args.teacher
        timeout_s = getattr(teacher, "timeout_s", DEFAULT_TEACHER_TIMEOUT_S)
        max_retries = getattr(teacher, "max_retries", DEFAULT_TEACHER_MAX_RETRIES)

        def submit():
            return self.teacher_model_group.async_run_method_batch(
                method_name="forward", candidate_ids=candidates, **batch
            )

        try:
            results = get_with_retries(submit, timeout_s=timeout_s, max_retries=max_retries, what="teacher forward")
        except ray.exceptions.RayTaskError as error:  # raised by the teacher's code: reported at once
            raise TeacherFailedError(
                f"TSD-KD stopped: the teacher group (--teacher.model_name_or_path {teacher.model_name_or_path}) "
                f"raised {worker_error_line(error)}; a retry would raise it again, so it was not retried; fix the "
                f"cause, then {resume_hint(self.args.ckpt.path)}"
            ) from None
        except RetriesExhausted as exhausted:
            raise TeacherUnavailableError(
                f"TSD-KD stopped: the teacher group (--teacher.model_name_or_path {teacher.model_name_or_path}) "
                f"failed to return its signals {exhausted.attempts} times (--teacher.max_retries {max_retries}, "
                f"--teacher.timeout_s {timeout_s:g} each); last error: {first_line(exhausted.last_error)}; "
                f"{resume_hint(self.args.ckpt.path)}"
            ) from None
        teacher_duplicates = 1  # the teacher group runs without ring attention / TP
        return [signals for chunk in results[::teacher_duplicates] for signals in chunk]


class SeededSamplesGenerator(SeededDispatch, SamplesGenerator):
    """Upstream's sample generator with a seed per sample and a content-fixed rollout order
    (host/seeded_sampling.py), so a resumed run samples what the uninterrupted one did."""


class TSDKDTrainerImpl(PPOTrainer.__ray_actor_class__):
    def __init__(self, pretrain, strategy, actor_model_group, teacher_model_group, vllm_engines, **generate_kwargs):
        # The prompt DataLoader built by super().__init__ shuffles with this process's global torch RNG
        # (torch.distributed is not initialized here, so upstream's seeded DistributedSampler is not
        # used), which every process seeds at random: seed it, so the same command draws the same
        # prompt order (a resume restores the order from the checkpointed loader state either way).
        torch.manual_seed(strategy.args.train.seed)
        super().__init__(pretrain, strategy, actor_model_group, None, None, None, vllm_engines, **generate_kwargs)
        self.teacher_model_group = teacher_model_group
        self.experience_maker = TeacherRankedExperienceMaker(
            actor_model_group, teacher_model_group, self.kl_ctl, strategy, self.tokenizer
        )
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
        off_policy = is_off_policy_step(self.args.tsdkd.on_policy_fraction, self.args.train.seed, global_step)
        if off_policy:
            rollout_samples = replace_with_reference_responses(
                rollout_samples, self.tokenizer, self.args.rollout.max_new_tokens, self.args.data.max_len
            )
        status, global_step = super().train_step(rollout_samples, global_step)
        status["tsdkd/off_policy_step"] = float(off_policy)
        status.update(self.experience_maker.last_timing)
        return status, global_step


TSDKDTrainer = ray.remote(TSDKDTrainerImpl)
