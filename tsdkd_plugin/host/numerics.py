"""Numerical safety of the TSD-KD training step, as small pure pieces.

Policy (docs/reliability.md):
- A micro-batch whose loss is NaN/inf, or whose teacher signals are (the objective refuses
  them), is skipped: the step backpropagates `zero_surrogate(student_logits)` instead, a
  zero tied to the student's graph, so every rank still runs one backward per micro-batch
  and DeepSpeed's gradient-accumulation boundaries (and ZeRO's gradient reductions) stay
  aligned; its gradient is exactly zero. The skip is counted (`tsdkd/nonfinite_skipped`).
- All ranks decide together (the flag is all-reduced with max), so they skip, count and
  stop in lockstep instead of one rank raising while the others wait in a collective.
- `max_consecutive` non-finite micro-batches in a row stop the run (`NonFiniteLossStop`)
  before anything non-finite can reach the weights; the last checkpoint stays the resume point.

Data-quality counters the step logs per sample (`response_health`): responses with no
trainable token (empty generation, or every sampled id a padding row) and responses
that do not end with EOS (cut by --rollout.max_new_tokens or --data.max_len). Both are
trained on as they are (an empty one contributes nothing); they are counted, not dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsdkd_plugin.host.faults import TrainingStoppedError
from tsdkd_plugin.objective import TeacherSignals

DEFAULT_MAX_NONFINITE_STEPS = 8


class NonFiniteLossStop(TrainingStoppedError):
    """Too many consecutive micro-batches with a non-finite loss."""


def is_nonfinite_error(error: BaseException) -> bool:
    """The objective's refusal of non-finite inputs (a data fault, handled by skipping), as
    opposed to any other ValueError (a bug, which must surface).

    `tsdkd_plugin.objective.NonFiniteInputError` is that exception once the objective
    exports it; until then its messages ("... contain(s) NaN or inf", "... not finite") are matched."""
    import tsdkd_plugin.objective as objective

    exported = getattr(objective, "NonFiniteInputError", None)
    if exported is not None and isinstance(error, exported):
        return True
    message = str(error)
    return isinstance(error, ValueError) and ("NaN or inf" in message or "not finite" in message)


def zero_surrogate(student_logits: torch.Tensor) -> torch.Tensor:
    """A scalar 0 whose gradient w.r.t. the logits is exactly 0 (non-finite logits are zeroed
    first: 0 * inf would be NaN)."""
    return torch.nan_to_num(student_logits.float(), nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0


def poison_teacher(signals: TeacherSignals) -> TeacherSignals:
    """The teacher's outputs replaced by NaN, whichever the transport (test-only fault injection of a
    broken teacher): every floating tensor but the output embedding, which is the model's weight."""
    nan = {name: torch.full_like(tensor, float("nan")) for name, tensor in signals.tensors().items()
           if tensor.is_floating_point() and name != "lm_head_weight"}
    return dataclasses.replace(signals, **nan)


@dataclass
class NonFiniteGuard:
    """Counts skipped micro-batches and decides when the run must stop.

    `resume_hint()` says how to continue (where the last checkpoint is); it is called
    when the stop happens, because `latest` moves during the run."""

    max_consecutive: int = DEFAULT_MAX_NONFINITE_STEPS
    resume_hint: Callable[[], str] | None = None
    consecutive: int = 0
    skipped_total: int = 0

    def __post_init__(self):
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")

    def record(self, nonfinite: bool, reason: str | None = None) -> bool:
        """Record one micro-batch; True = skip it. Raises NonFiniteLossStop at the limit."""
        if not nonfinite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_consecutive:
            then = self.resume_hint() if self.resume_hint else "rerun"
            raise NonFiniteLossStop(
                f"TSD-KD stopped: {self.consecutive} consecutive micro-batches had a non-finite loss "
                f"(last: {reason or 'NaN or inf'}); they were skipped, so the weights hold no NaN; "
                f"check the teacher and lower --actor.adam.lr, then {then} "
                f"(--tsdkd.max_nonfinite_steps {self.max_consecutive} sets this limit)"
            )
        return True


def response_health(
    sequences: torch.Tensor, action_mask: torch.Tensor, loss_mask: torch.Tensor, eos_token_id: int | None
) -> dict[str, torch.Tensor]:
    """Per-sample 0/1 indicators [B] (float): `empty_response` (no trainable response token)
    and `no_eos` (a non-empty response whose last token is not EOS).

    Responses sit at the last A = action_mask.shape[1] positions of `sequences`, right-padded."""
    action_mask = action_mask.bool()
    num_actions = action_mask.shape[1]
    sampled = sequences[:, -num_actions:]
    positions = torch.arange(1, num_actions + 1, device=action_mask.device)
    last = (action_mask * positions).amax(dim=1) - 1  # index of the last response token, -1 if none
    last_token = sampled.gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1)
    has_response = last >= 0
    ends_with_eos = last_token == eos_token_id if eos_token_id is not None else torch.ones_like(has_response)
    return {
        "empty_response": (~loss_mask.bool().any(dim=1)).float(),
        "no_eos": (has_response & ~ends_with_eos).float(),
    }
