"""The student side: OpenRLHF's policy actor with the TSD-KD loss in its training step.

What is reused unchanged: `PolicyModelActor` (model/optimizer/scheduler set-up,
checkpointing, vLLM weight sync) and `ActorPPOTrainer.ppo_train` (epochs,
gradient-accumulation windows, metric reduction across ranks, progress bar).
What is replaced: `ActorPPOTrainer.training_step` (the PPO loss becomes the
TSD-KD objective) and the replay buffer (which must keep teacher signals and
prompt groups, see `experience.py`). The student's forward is upstream
`Actor.forward`; by default its output layer is skipped and the objective gets the
final hidden states and the output embedding instead of [tokens x vocab] logits
(`student_step.py`, `--tsdkd.student_logits`).

The teacher is whatever `teachers.actor_teacher` made for this run (`self.teacher`, an
`ActorTeacher`): the training step asks it for the micro-batch's `TeacherSignals` without knowing
where the teacher runs (host/teachers/). The run's options arrive typed (`run`, host/run_config.py).

`PolicyModelActor.init_model_from_pretrained` builds `ActorPPOTrainer` inline,
by module-global name. Instead of copying that ~90-line method we subclass the
actor and, for the duration of the super() call only, point that name at our
trainer class (`_actor_trainer_class`). This runtime hook is listed in
patches/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import openrlhf.trainer.ray.ppo_actor as upstream_ppo_actor
import ray
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor
from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

from tsdkd_plugin.host.checkpoint import (
    actor_checkpoint_dir,
    fresh_checkpoint_states,
    restore_rank_rng_state,
    resume_hint,
    save_checkpoint_atomically,
    save_rank_rng_state,
)
from tsdkd_plugin.host.device import current_device, ema_device, where_am_i
from tsdkd_plugin.host.experience import TeacherSignalReplayBuffer, signals_to_device
from tsdkd_plugin.host.faults import inject_nonfinite_teacher
from tsdkd_plugin.host.lora_sync import is_lora_model, merged_lora_parameters
from tsdkd_plugin.host.model_io import output_embedding, unwrap_hf_model
from tsdkd_plugin.host.numerics import (
    NonFiniteGuard,
    is_nonfinite_error,
    poison_teacher,
    response_health,
    zero_surrogate,
)
from tsdkd_plugin.host.run_config import RunConfig
from tsdkd_plugin.host.student_step import (
    StudentForward,
    StudentOutputs,
    in_vocab_action_mask,
    objective_at_step,
    student_objective,
    student_top_k,
)
from tsdkd_plugin.host.teachers import ActorTeacher, MicroBatch, actor_teacher
from tsdkd_plugin.objective import metric_keys


@contextlib.contextmanager
def _actor_trainer_class(trainer_factory):
    original = upstream_ppo_actor.ActorPPOTrainer
    upstream_ppo_actor.ActorPPOTrainer = trainer_factory
    try:
        yield
    finally:
        upstream_ppo_actor.ActorPPOTrainer = original


class MergedLoRAView:
    """Stands in for the trainer's `actor` while upstream's `broadcast_to_vllm` runs.

    Upstream reads the weights to send from `self.actor.model.module.named_parameters()`;
    for a LoRA student this view answers with the merged weights under checkpoint names
    (host/lora_sync.py), so the NCCL, CUDA-IPC and CPU sync paths all stay upstream's.
    """

    def __init__(self, actor, zero_stage: int):
        self.is_vlm = getattr(actor, "is_vlm", False)
        self.model = SimpleNamespace(module=self)
        self._peft_model = actor.model.module
        self._zero_stage = zero_stage

    def _gather(self, params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), enabled=self._zero_stage == 3)

    def named_parameters(self, remove_duplicate: bool = True):
        return merged_lora_parameters(self._peft_model, self._gather, remove_duplicate=remove_duplicate)


class TSDKDActorTrainer(ActorPPOTrainer):
    def __init__(self, *args, run: RunConfig, shared_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run
        self.shared_vocab_size = shared_vocab_size
        # Set by the policy actor once the teacher is ready (a colocated one loads after this trainer).
        self.teacher: ActorTeacher | None = None
        self.replay_buffer = TeacherSignalReplayBuffer(
            self.micro_train_batch_size,
            group_size=run.ranking_group_size,
            limit=self.replay_buffer.limit,
            cpu_offload=self.replay_buffer.cpu_offload,
        )
        if self.actor.temperature == 0:
            # --rollout.temperature 0 = greedy vLLM rollouts (vLLM 0.29 raises any value in (0, 0.01) to
            # 0.01). Upstream's Actor divides its logits by this temperature (1/0 = NaN); the objective
            # wants raw logits anyway, so the student's forward keeps them raw.
            self.actor.temperature = 1.0
        if getattr(self.actor, "packing_samples", False):  # upstream's Actor sets it only when it loads the model
            # The objective and the teacher signals are per padded [B, T] row; upstream's packed
            # [1, total] layout (and ring attention, which needs it) is refused before launch too.
            raise ValueError(
                "TSD-KD does not support --ds.packing_samples (or --ds.ring_attn_size > 1, which implies it)"
            )
        # How the student reaches the objective: hidden states + output embedding, chunked (fused,
        # the default), or upstream Actor's full logits (host/student_step.py).
        self.student = StudentForward(unwrap_hf_model(self.actor), run.student_logits)
        # Non-finite micro-batches are skipped and counted; too many in a row stop the run
        # (host/numerics.py). The hint is computed at the stop, when `latest` is final.
        self.nonfinite_guard = NonFiniteGuard(
            max_consecutive=run.max_nonfinite_steps,
            resume_hint=functools.partial(resume_hint, self.args.ckpt.path),
        )

    def ppo_train(self, kl_ctl: float):
        self.replay_buffer.finalize_groups()
        return super().ppo_train(kl_ctl)

    def broadcast_to_vllm(self):
        """Upstream's sync; for a LoRA student, of the merged weights (upstream sends PEFT names)."""
        if not is_lora_model(self.actor.model.module):
            return super().broadcast_to_vllm()
        actor = self.actor
        self.actor = MergedLoRAView(actor, self.strategy.args.ds.zero_stage)
        try:
            return super().broadcast_to_vllm()
        finally:
            self.actor = actor

    def _student_forward(self, sequences, attention_mask, num_actions) -> StudentOutputs:
        """Upstream Actor.forward on the batch, giving the objective hidden states (fused) or logits (full)."""
        return self.student(
            self.actor, sequences, attention_mask, num_actions, ring_attn_group=self.strategy.ring_attn_group
        )

    def _output_weight(self):
        """The student's output embedding for the fused objective (gathered under ZeRO-3), or None."""
        if not self.student.fused:
            return contextlib.nullcontext(None)
        return output_embedding(self.actor, self.args.ds.zero_stage)

    def optimizer_steps_taken(self) -> int:
        """Optimizer steps the student has taken before this micro-batch's (0 throughout the first
        step's gradient accumulation): DeepSpeed's own counter, `global_steps`, which each checkpoint
        saves and a resume (`--ckpt.load_enable`) restores, so a resumed run continues it."""
        return int(self.actor.model.global_steps)

    @torch.no_grad()
    def student_top_k(self, sequences, attention_mask, num_actions) -> torch.Tensor:
        """[B, A, k]: the student's top-k shared token ids at every response position."""
        student = self._student_forward(sequences, attention_mask, num_actions)
        with self._output_weight() as weight:
            return student_top_k(
                student,
                weight,
                self.shared_vocab_size,
                self.run.objective.num_candidates,
                self.run.objective.chunk_size,
            )

    def training_step(
        self, experience: Experience, kl_ctl: float, step: int, loss_batch_info: dict | None = None
    ) -> dict:
        self.actor.train()
        device = current_device()
        action_mask = experience.action_mask
        num_actions = action_mask.shape[1]
        sequences = experience.sequences
        micro_batch = MicroBatch(
            sequences, experience.attention_mask, num_actions, shipped=signals_to_device(experience.tsdkd, device)
        )

        student = self._student_forward(sequences, experience.attention_mask, num_actions)

        # Positions that sampled a padding row (id >= len(tokenizer)) are not tokens: skipped, counted.
        loss_mask = in_vocab_action_mask(sequences, action_mask, self.shared_vocab_size)
        poisoned = inject_nonfinite_teacher()  # test-only fault hook (host/faults.py); False normally
        group_size = self.run.ranking_group_size
        # The extra terms' weights at this optimizer step (--tsdkd.weight_warmup_steps; the run's own otherwise).
        objective, step_metrics = objective_at_step(self.run.objective, self.optimizer_steps_taken())
        nonfinite_reason = None
        try:
            with self.teacher.signals(micro_batch) as teacher, self._output_weight() as output_weight:
                loss, terms = student_objective(
                    student, output_weight, poison_teacher(teacher) if poisoned else teacher, loss_mask,
                    objective,
                    shared_vocab_size=self.shared_vocab_size,
                    sampled_ids=sequences[:, -num_actions:].masked_fill(~loss_mask, 0),
                    group_size=group_size if group_size > 1 else None,
                )  # fmt: skip
            if not bool(torch.isfinite(loss)):
                nonfinite_reason = "the TSD-KD loss is NaN or inf"
        except ValueError as error:
            if not is_nonfinite_error(error):
                raise
            nonfinite_reason = str(error)
        # All ranks skip together (see host/numerics.py), so collectives and accumulation stay aligned.
        any_rank_nonfinite = self.strategy.all_reduce(float(nonfinite_reason is not None), op="max") > 0
        skipped = self.nonfinite_guard.record(any_rank_nonfinite, nonfinite_reason or "on another rank")
        if skipped:
            loss = zero_surrogate(student.graph_tensor)  # gradient exactly 0; one backward per micro-batch as usual
            terms = dict.fromkeys(metric_keys(objective), 0.0)  # same keys as a normal step; 0 = skipped
        terms.update(step_metrics)
        terms["out_of_vocab_fraction"] = float((action_mask.bool() & ~loss_mask).sum().item()) / max(
            float(action_mask.sum().item()), 1.0
        )

        self.strategy.backward(loss, self.actor, self.actor_optim)
        self.strategy.optimizer_step(self.actor_optim, self.actor, self.actor_scheduler, name="actor")
        if self.ema_model:
            self.strategy.moving_average(self.actor, self.ema_model, self.ema_beta, ema_device())

        # `ppo_train` reduces "token"-weighted metrics by action tokens across ranks and
        # expects the main loss under "policy_loss".
        metrics = {"policy_loss": loss.detach()}
        weights = {"policy_loss": "token"}
        for name, value in terms.items():
            metrics[f"tsdkd/{name}"] = value
            weights[f"tsdkd/{name}"] = "token"
        # Per-sample counters, logged as fractions of the step's samples (docs/reliability.md).
        health = response_health(sequences, action_mask, loss_mask, self.tokenizer.eos_token_id)
        metrics["tsdkd/empty_response_fraction"] = health["empty_response"]
        metrics["tsdkd/no_eos_fraction"] = health["no_eos"]
        metrics["tsdkd/nonfinite_skipped"] = float(skipped)
        for name in ("tsdkd/empty_response_fraction", "tsdkd/no_eos_fraction", "tsdkd/nonfinite_skipped"):
            weights[name] = "sample"
        metrics["actor_lr"] = self.actor_scheduler.get_last_lr()[0]
        weights["actor_lr"] = None
        metrics["actor_grad_norm"] = self.strategy.get_grad_norm(self.actor)
        weights["actor_grad_norm"] = None
        for k, v in experience.info.items():  # per-sample values, batched as a tensor or a list
            if isinstance(v, list):
                v = torch.stack([torch.as_tensor(x, dtype=torch.float).reshape(()) for x in v])
            if isinstance(v, torch.Tensor):
                metrics[k] = v
                weights[k] = "token" if v.dim() == 0 else "sample"
        for name, value in (
            ("response_length", experience.response_length),
            ("total_length", experience.total_length),
            ("truncated", experience.truncated),
        ):
            if isinstance(value, torch.Tensor):
                metrics[name] = value
                weights[name] = "sample"
        return {
            "metrics": metrics,
            "weights": weights,
            "num_samples": float(action_mask.shape[0]),
            "num_action_tokens": float(action_mask.sum().item()),
        }


def actor_trainer_factory(run: RunConfig, shared_vocab_size: int):
    """What upstream's `init_model_from_pretrained` calls in place of `ActorPPOTrainer(...)`: our
    trainer with the run's options (upstream's call passes only its own arguments)."""
    return functools.partial(TSDKDActorTrainer, run=run, shared_vocab_size=shared_vocab_size)


class TSDKDPolicyActorImpl(PolicyModelActor.__ray_actor_class__):
    """Policy actor with the TSD-KD trainer, student candidates, and the teacher's actor-side half."""

    def init_model_from_pretrained(
        self,
        strategy,
        pretrain,
        max_steps=None,
        vllm_engines=None,
        run: RunConfig | None = None,
        shared_vocab_size: int | None = None,
    ):
        """`run`: the run's options (validated by the CLI); `shared_vocab_size`: the token ids both models
        share (the preflight's). Both are always given (host/launch.py policy_init_arguments); they default
        to None only because an override may not require what upstream's callers need not pass
        (tests/host/test_stock_contract.py)."""
        if run is None or shared_vocab_size is None:
            raise TypeError("TSDKDPolicyActorImpl.init_model_from_pretrained needs run= and shared_vocab_size=")
        with _actor_trainer_class(actor_trainer_factory(run, shared_vocab_size)):
            super().init_model_from_pretrained(strategy, pretrain, max_steps=max_steps, vllm_engines=vllm_engines)
        # After the student's engine: a colocated teacher is loaded here, beside the student.
        self.teacher = actor_teacher(run, strategy, shared_vocab_size)
        self.trainer.teacher = self.teacher
        self.restore_rng_state()

    def restore_rng_state(self) -> None:
        """After a resume (upstream loaded the checkpoint `latest` names), this rank's RNGs continue
        where the saved run left them, so the next step shuffles its replay buffer the same way.
        Called last, after everything that initialising consumes random numbers for."""
        if self.checkpoint_states:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            restore_rank_rng_state(actor_checkpoint_dir(self.strategy.args.ckpt.path), rank)

    def placement(self) -> dict:
        return where_am_i()

    def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None):
        """Upstream's checkpoint contents (DeepSpeed engine + client states + metric.json, and the
        HF copy with --ckpt.save_hf), written atomically so a kill never leaves an unusable
        `latest` (host/checkpoint.py; upstream deletes old tags before saving the new one)."""
        args = self.strategy.args
        if not self.disable_ds_ckpt:
            save_checkpoint_atomically(
                self.actor.model,
                actor_checkpoint_dir(args.ckpt.path),
                tag,
                client_state=client_states or {},
                max_num=args.ckpt.max_num,
                max_mem_gib=args.ckpt.max_mem,
                is_rank_0=self.strategy.is_rank_0(),
                barrier=torch_dist_barrier_and_cuda_sync,
                write_metric=lambda tag_dir: self.strategy._write_ckpt_metric(tag_dir, metric_value, metric_key),
                write_rank_files=functools.partial(
                    save_rank_rng_state, rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                ),
            )
        if self.save_hf_ckpt:
            model = self.ema_model if args.train.enable_ema else self.actor
            self.strategy.save_model(model, self.tokenizer, os.path.join(args.ckpt.path, f"{tag}_hf"))
        torch_dist_barrier_and_cuda_sync()

    def get_checkpoint_states(self):
        """Upstream returns {} when `_actor` exists but holds no `latest` yet (a run killed before
        its first save completed), and PPOTrainer.fit then fails on a missing key: start at step 0."""
        return self.checkpoint_states or fresh_checkpoint_states()

    @torch.no_grad()
    def student_candidates(self, sequences, action_mask, attention_mask) -> torch.Tensor:
        """The student's top-k tokens at every response position (shared vocabulary only),
        which the teacher then orders for the token-level ListMLE."""
        device = current_device()
        self.actor.eval()
        try:
            ids = self.trainer.student_top_k(sequences.to(device), attention_mask.to(device), action_mask.shape[1])
        finally:
            self.actor.train()
        return ids.to(torch.int32).cpu()

    def in_process_teacher_signals(self, sequences, action_mask, attention_mask) -> dict[str, torch.Tensor]:
        """Experience-time signals of a teacher that lives in this actor (teachers.IN_PROCESS_TEACHER_SIGNALS)."""
        return self.teacher.in_process_signals(sequences, action_mask, attention_mask)


TSDKDPolicyActor = ray.remote(num_gpus=1)(TSDKDPolicyActorImpl)
