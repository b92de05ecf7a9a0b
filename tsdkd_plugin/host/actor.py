"""The student side: OpenRLHF's policy actor with the TSD-KD loss in its training step.

What is reused unchanged: `PolicyModelActor` (model/optimizer/scheduler set-up,
checkpointing, vLLM weight sync) and `ActorPPOTrainer.ppo_train` (epochs,
gradient-accumulation windows, metric reduction across ranks, progress bar).
What is replaced: `ActorPPOTrainer.training_step` (the PPO loss becomes the
TSD-KD objective) and the replay buffer (which must keep teacher signals and
prompt groups, see `experience.py`).

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
from typing import Dict, Optional

import ray
import torch

import openrlhf.trainer.ray.ppo_actor as upstream_ppo_actor
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
from tsdkd_plugin.host.device import current_device, ema_device
from tsdkd_plugin.host.experience import PER_SAMPLE_SIGNALS, TeacherSignalReplayBuffer, signals_to_device
from tsdkd_plugin.host.model_io import output_embedding, output_head_of, response_hidden_states
from tsdkd_plugin.host.teacher import (
    action_logits,
    in_vocab_action_mask,
    load_causal_lm_for_scoring,
    score_samples,
    where_am_i,
)
from tsdkd_plugin.host.faults import inject_nonfinite_teacher
from tsdkd_plugin.host.lora_sync import is_lora_model, merged_lora_parameters
from tsdkd_plugin.host.numerics import (
    DEFAULT_MAX_NONFINITE_STEPS,
    NonFiniteGuard,
    is_nonfinite_error,
    poison_with_nan,
    response_health,
    zero_surrogate,
)
from tsdkd_plugin.objective import METRIC_KEYS, TSDKDConfig, TeacherSignals, tsdkd_loss


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


def sparse_teacher_signals(signals: Dict[str, torch.Tensor], config: TSDKDConfig) -> TeacherSignals:
    """Rebuild the objective's `TeacherSignals` from the wire dict of a separate teacher group."""
    fields = {k: v for k, v in signals.items() if k != "group_ids"}
    return TeacherSignals.from_wire(fields, temperature=config.temperature)


class TSDKDActorTrainer(ActorPPOTrainer):
    def __init__(self, *args, tsdkd_options: Dict, colocated_teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config: TSDKDConfig = tsdkd_options["loss_config"]
        self.shared_vocab_size: int = tsdkd_options["shared_vocab_size"]
        self.group_size: int = tsdkd_options["group_size"]
        self.colocated_teacher = colocated_teacher
        self.replay_buffer = TeacherSignalReplayBuffer(
            self.micro_train_batch_size,
            group_size=self.group_size,
            limit=self.replay_buffer.limit,
            cpu_offload=self.replay_buffer.cpu_offload,
        )
        if self.actor.temperature == 0:
            # --rollout.temperature 0 = greedy vLLM rollouts (vLLM 0.29 raises any value in (0, 0.01) to
            # 0.01). Upstream's Actor divides its logits by this temperature (1/0 = NaN); the objective
            # wants raw logits anyway, so the student's forward keeps them raw.
            self.actor.temperature = 1.0
        # Non-finite micro-batches are skipped and counted; too many in a row stop the run
        # (host/numerics.py). The hint is computed at the stop, when `latest` is final.
        self.nonfinite_guard = NonFiniteGuard(
            max_consecutive=getattr(self.args.tsdkd, "max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS),
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

    def _objective(self, student_logits, teacher, loss_mask, sequences, num_actions):
        return tsdkd_loss(
            student_logits,
            teacher,
            loss_mask,
            self.loss_config,
            shared_vocab_size=self.shared_vocab_size,
            sampled_ids=sequences[:, -num_actions:].masked_fill(~loss_mask, 0),
            group_size=self.group_size if self.group_size > 1 else None,
        )

    def training_step(
        self, experience: Experience, kl_ctl: float, step: int, loss_batch_info: Optional[Dict] = None
    ) -> Dict:
        self.actor.train()
        device = current_device()
        action_mask = experience.action_mask
        num_actions = action_mask.shape[1]
        sequences = experience.sequences
        signals = signals_to_device(experience.tsdkd, device)

        output = self.actor(
            sequences,
            attention_mask=experience.attention_mask,
            return_output=True,
            ring_attn_group=self.strategy.ring_attn_group,
        )
        student_logits = action_logits(output["logits"], num_actions)
        if self.actor.temperature != 1.0:
            # Actor divides by the rollout temperature; the objective applies its own tau to raw logits.
            student_logits = student_logits * self.actor.temperature

        # Positions that sampled a padding row (id >= len(tokenizer)) are not tokens: skipped, counted.
        loss_mask = in_vocab_action_mask(sequences, action_mask, self.shared_vocab_size)
        poison_teacher = inject_nonfinite_teacher()  # test-only fault hook (host/faults.py); False normally
        nonfinite_reason = None
        try:
            if self.colocated_teacher is not None:
                # Dense transport: the in-process teacher's hidden states; the objective makes its
                # logits chunk by chunk (never the full [tokens x vocab] teacher matrix).
                with torch.no_grad():
                    hidden = response_hidden_states(
                        self.colocated_teacher, sequences, experience.attention_mask, num_actions
                    )
                if poison_teacher:
                    hidden = torch.full_like(hidden, float("nan"))
                with output_embedding(self.colocated_teacher, self.args.ds.zero_stage) as lm_head_weight:
                    teacher = TeacherSignals(hidden=hidden, lm_head_weight=lm_head_weight,
                                             output_head=output_head_of(self.colocated_teacher))
                    loss, terms = self._objective(student_logits, teacher, loss_mask, sequences, num_actions)
            else:
                teacher = sparse_teacher_signals(poison_with_nan(signals) if poison_teacher else signals,
                                                 self.loss_config)
                loss, terms = self._objective(student_logits, teacher, loss_mask, sequences, num_actions)
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
            loss = zero_surrogate(student_logits)  # gradient exactly 0; one backward per micro-batch as usual
            terms = {name: 0.0 for name in METRIC_KEYS}  # same keys as a normal step; 0 = skipped
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
        health = response_health(sequences, action_mask, loss_mask, getattr(self.tokenizer, "eos_token_id", None))
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
        for name in ("response_length", "total_length", "truncated"):
            value = getattr(experience, name, None)
            if isinstance(value, torch.Tensor):
                metrics[name] = value
                weights[name] = "sample"
        return {
            "metrics": metrics,
            "weights": weights,
            "num_samples": float(action_mask.shape[0]),
            "num_action_tokens": float(action_mask.sum().item()),
        }


def actor_trainer_factory(tsdkd_options: Dict):
    """What upstream's `init_model_from_pretrained` calls in place of `ActorPPOTrainer(...)`."""
    return functools.partial(TSDKDActorTrainer, tsdkd_options=tsdkd_options)


class TSDKDPolicyActorImpl(PolicyModelActor.__ray_actor_class__):
    """Policy actor with the TSD-KD trainer, student candidates, and an optional in-process teacher."""

    def init_model_from_pretrained(
        self, strategy, pretrain, max_steps=None, vllm_engines=None, tsdkd_options: Optional[Dict] = None
    ):
        self.tsdkd_options = dict(tsdkd_options)
        self.colocated_teacher = None
        teacher_path = self.tsdkd_options.get("colocated_teacher_path")
        with _actor_trainer_class(actor_trainer_factory(self.tsdkd_options)):
            super().init_model_from_pretrained(strategy, pretrain, max_steps=max_steps, vllm_engines=vllm_engines)
        if teacher_path:
            # The dense transport: the teacher lives beside the student and its full logits
            # never leave the process.
            self.colocated_teacher = load_causal_lm_for_scoring(
                strategy, teacher_path, offload=strategy.args.teacher.offload
            )
            self.trainer.colocated_teacher = self.colocated_teacher
        self.restore_rng_state()

    def restore_rng_state(self) -> None:
        """After a resume (upstream loaded the checkpoint `latest` names), this rank's RNGs continue
        where the saved run left them, so the next step shuffles its replay buffer the same way.
        Called last, after everything that initialising consumes random numbers for."""
        if self.checkpoint_states:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            restore_rank_rng_state(actor_checkpoint_dir(self.strategy.args.ckpt.path), rank)

    def placement(self) -> Dict:
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
        num_actions = action_mask.shape[1]
        self.actor.eval()
        output = self.actor(sequences.to(device), attention_mask=attention_mask.to(device), return_output=True)
        self.actor.train()
        logits = action_logits(output["logits"], num_actions)[..., : self.tsdkd_options["shared_vocab_size"]]
        return logits.topk(self.tsdkd_options["loss_config"].num_candidates, dim=-1).indices.to(torch.int32).cpu()

    def colocated_teacher_scores(self, sequences, action_mask, attention_mask) -> Dict[str, torch.Tensor]:
        """Sequence scores from the in-process teacher (for ranking and logging); the dense
        per-token signals are recomputed in the training step."""
        signals = score_samples(
            self.colocated_teacher, self.strategy.args.ds.zero_stage, self.tsdkd_options["loss_config"],
            self.tsdkd_options["shared_vocab_size"], sequences, action_mask, attention_mask, None,
        )  # fmt: skip
        return {k: v for k, v in signals.items() if k in PER_SAMPLE_SIGNALS}


TSDKDPolicyActor = ray.remote(num_gpus=1)(TSDKDPolicyActorImpl)
