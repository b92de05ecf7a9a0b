"""Public entry points: tsdkd_loss (student logits) and tsdkd_loss_fused (hidden + lm_head).

Both validate their inputs (a ValueError naming the argument and what is allowed),
then run the same chunked computation (engine.evaluate) inside an
autograd.Function whose forward already produces the gradient and whose backward
hands it over, scaled by the incoming gradient (first-order only, one backward).
"""

from __future__ import annotations

import torch

from .chunking import IDENTITY_HEAD, HiddenRows, LogitsRows, OutputHead, StudentHidden, StudentLogits
from .config import TSDKDConfig
from .engine import Batch, TeacherView, Tokens, evaluate
from .errors import NonFiniteInputError
from .transport import TeacherSignals, check_shared_vocab


class _Job:
    """Everything the engine needs besides the student tensors; carries metrics back out."""

    def __init__(
        self, teacher, tokens, config, shared, sampled_ids, group_size, compute_dtype, student_head=IDENTITY_HEAD
    ) -> None:
        self.teacher, self.tokens, self.config = teacher, tokens, config
        self.shared, self.sampled_ids, self.group_size = shared, sampled_ids, group_size
        self.compute_dtype = compute_dtype
        self.student_head = student_head
        self.metrics: dict[str, float] = {}

    def run(self, student) -> torch.Tensor:
        batch = Batch(
            self.tokens, self.teacher, self.config, self.sampled_ids, self.group_size, self.compute_dtype,
            need_grad=student.wants_grad, chunk_size=min(self.config.chunk_size, max(self.tokens.num, 1)),
        )  # fmt: skip
        loss, self.metrics = evaluate(student, batch, self.shared)
        return loss


class _PlainObjective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, job: _Job) -> torch.Tensor:
        student = StudentLogits(
            student_logits, job.tokens.positions, job.shared, job.compute_dtype, need_grad=ctx.needs_input_grad[0]
        )
        loss = job.run(student)
        ctx.grad_rows, ctx.positions, ctx.shared = student.grad, job.tokens.positions, job.shared
        ctx.logits_meta = (student_logits.shape, student_logits.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype = ctx.logits_meta
        grad = torch.zeros(shape, dtype=dtype, device=grad_output.device)
        flat = grad.view(-1, shape[-1])[:, : ctx.shared]
        flat.index_copy_(0, ctx.positions, ctx.grad_rows.to(dtype))
        return grad.mul_(grad_output), None


class _FusedObjective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, job: _Job) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, job.tokens.positions)
        student = StudentHidden(
            rows, weight, job.shared, job.compute_dtype,
            need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1],
            head=job.student_head,
        )  # fmt: skip
        loss = job.run(student)
        ctx.grad_hidden_rows, ctx.grad_weight = student.grad_hidden, student.grad_weight
        ctx.positions = job.tokens.positions
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        hidden_shape, hidden_dtype, weight_dtype = ctx.meta
        grad_hidden = grad_weight = None
        # Fresh tensors scaled in place: the saved gradients stay intact, so
        # retain_graph / gradcheck may call backward again.
        if ctx.grad_hidden_rows is not None:
            grad_hidden = torch.zeros(hidden_shape, dtype=hidden_dtype, device=grad_output.device)
            grad_hidden.view(-1, hidden_shape[-1]).index_copy_(0, ctx.positions, ctx.grad_hidden_rows.to(hidden_dtype))
            grad_hidden.mul_(grad_output)
        if getattr(ctx, "weight_grad_given_away", False):
            raise RuntimeError(
                "tsdkd_loss_fused: this graph was already backpropagated with an upstream gradient of exactly 1, "
                "which hands the lm_head gradient buffer to autograd instead of copying it (one [V, H] tensor "
                "less at the memory peak); run the forward again instead of using retain_graph"
            )
        if ctx.grad_weight is not None:
            if ctx.grad_weight.dtype == weight_dtype and float(grad_output) == 1.0:
                # Plain loss.backward(): hand the accumulator itself to autograd instead of
                # copying it -- saves one [V, H] tensor at the memory peak.
                grad_weight, ctx.grad_weight = ctx.grad_weight, None
                ctx.weight_grad_given_away = True
            else:
                grad_weight = ctx.grad_weight.to(weight_dtype, copy=True).mul_(grad_output)
        return grad_hidden, grad_weight, None


# ----------------------------------------------------------------------------- validation


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name, tensor, shape, device, *, floating=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if len(shape) != tensor.dim() or any(want is not None and want != got for want, got in zip(shape, tensor.shape)):
        pretty = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{pretty}], got {list(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, but the student is on {device}; put all inputs on one device")
    if floating is True and not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if floating is False and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _check_ids(name: str, ids: torch.Tensor, valid: torch.Tensor, shared: int, *, distinct: bool = False) -> None:
    picked = ids[valid]
    if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= shared):
        raise ValueError(f"{name} must lie in [0, shared_vocab_size={shared}) on response tokens")
    if distinct and picked.numel():
        ordered = picked.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"{name} must be distinct within each token (a top-K / top-k list)")


def _check_finite(name: str, tensor: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    bad = torch.isnan(tensor) | (tensor == float("inf"))
    if not allow_neg_inf:
        bad |= tensor == float("-inf")
    if bool(bad.any()):
        raise NonFiniteInputError(f"{name} contains NaN or inf on response tokens; teacher inputs must be finite")


def _prepare(
    student_batch_shape, student_rows: int, device, teacher, mask, config, sampled_ids, shared_vocab_size, group_size
):
    """Validate call-time inputs; returns (Tokens, TeacherView, shared, sampled [N] or None)."""
    if not isinstance(config, TSDKDConfig):
        raise ValueError(f"config must be a TSDKDConfig, got {type(config).__name__}")
    if not isinstance(teacher, TeacherSignals):
        raise ValueError(f"teacher must be a TeacherSignals, got {type(teacher).__name__}")
    bsz, seqlen = student_batch_shape
    _check_tensor("mask", mask, (bsz, seqlen), device)
    shared = check_shared_vocab(shared_vocab_size, student_rows, teacher.vocab_rows)
    if config.num_candidates > shared and config.token_level_on:
        raise ValueError(
            f"TSDKDConfig.num_candidates={config.num_candidates} exceeds the vocabulary "
            f"(shared_vocab_size={shared}); it must be <= {shared}"
        )
    tokens = Tokens.from_mask(mask)
    valid = tokens.mask
    positions = tokens.positions

    def rows_of(tensor):  # [B, T, ...] -> [N, ...]
        return tensor.reshape(bsz * seqlen, *tensor.shape[2:]).index_select(0, positions)

    view = TeacherView()
    kind = teacher.kind
    if kind == "logits":
        _check_tensor("teacher.logits", teacher.logits, (bsz, seqlen, None), device, floating=True)
        view.rows = LogitsRows(teacher.logits, positions, shared)
    elif kind == "hidden":
        _check_tensor("teacher.hidden", teacher.hidden, (bsz, seqlen, None), device, floating=True)
        hidden_size = teacher.hidden.shape[-1]
        _check_tensor("teacher.lm_head_weight", teacher.lm_head_weight, (None, hidden_size), device, floating=True)
        if teacher.hidden.dtype != teacher.lm_head_weight.dtype:
            raise ValueError("teacher.hidden and teacher.lm_head_weight must have the same dtype")
        view.rows = HiddenRows(rows_of(teacher.hidden), teacher.lm_head_weight, shared, teacher.output_head)
    else:
        if teacher.temperature != config.temperature:
            raise ValueError(
                f"sparse teacher signals were computed at temperature {teacher.temperature}, "
                f"but TSDKDConfig.temperature is {config.temperature}; they must match"
            )
        top_k = teacher.topk_logprobs.shape[-1] if teacher.topk_logprobs.dim() == 3 else None
        _check_tensor("teacher.topk_logprobs", teacher.topk_logprobs, (bsz, seqlen, None), device, floating=True)
        _check_tensor("teacher.topk_ids", teacher.topk_ids, (bsz, seqlen, top_k), device, floating=False)
        _check_tensor("teacher.tail_logprob", teacher.tail_logprob, (bsz, seqlen), device, floating=True)
        _check_tensor("teacher.entropy", teacher.entropy, (bsz, seqlen), device, floating=True)
        if top_k > shared:
            raise ValueError(f"teacher top-K ({top_k}) exceeds shared_vocab_size={shared}")
        _check_ids("teacher.topk_ids", teacher.topk_ids, valid, shared, distinct=True)
        view.topk_logprobs = rows_of(teacher.topk_logprobs)
        view.topk_ids = rows_of(teacher.topk_ids).long()
        view.tail_logprob = rows_of(teacher.tail_logprob)
        view.entropy = rows_of(teacher.entropy)
        _check_finite("teacher.topk_logprobs", view.topk_logprobs)
        _check_finite("teacher.tail_logprob", view.tail_logprob, allow_neg_inf=True)
        _check_finite("teacher.entropy", view.entropy)
        if config.token_level_on and teacher.candidate_ids is None:
            raise ValueError(
                "the sparse transport needs teacher.candidate_ids and teacher.candidate_logprobs for the "
                "token-level ListMLE (indirect_level 'token'/'both'); build them with teacher_signals_from_logits"
            )
    if teacher.candidate_ids is not None and config.token_level_on:
        k = config.num_candidates
        _check_tensor("teacher.candidate_ids", teacher.candidate_ids, (bsz, seqlen, k), device, floating=False)
        _check_ids("teacher.candidate_ids", teacher.candidate_ids, valid, shared, distinct=True)
        view.candidate_ids = rows_of(teacher.candidate_ids).long()
        if teacher.candidate_logprobs is not None:
            _check_tensor("teacher.candidate_logprobs", teacher.candidate_logprobs, (bsz, seqlen, k), device, floating=True)
            view.candidate_scores = rows_of(teacher.candidate_logprobs)
            _check_finite("teacher.candidate_logprobs", view.candidate_scores)
        elif kind == "sparse":
            raise ValueError("the sparse transport needs teacher.candidate_logprobs together with candidate_ids")

    sampled = None
    if config.sequence_level_on:
        if sampled_ids is None:
            raise ValueError("sampled_ids [B, T] is required for the sequence-level ListMLE (indirect_level 'sequence'/'both')")
        _check_tensor("sampled_ids", sampled_ids, (bsz, seqlen), device, floating=False)
        _check_ids("sampled_ids", sampled_ids, valid, shared)
        sampled = rows_of(sampled_ids).long()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 for the sequence-level ListMLE, got {group_size!r}")
        if bsz % group_size:
            raise ValueError(f"batch size {bsz} is not a multiple of group_size={group_size} (groups are consecutive rows)")
        if teacher.sequence_scores is not None:
            _check_tensor("teacher.sequence_scores", teacher.sequence_scores, (bsz,), device, floating=True)
            _check_finite("teacher.sequence_scores", teacher.sequence_scores)
            view.sequence_scores = teacher.sequence_scores
        elif kind == "sparse":
            raise ValueError("the sparse transport needs teacher.sequence_scores for the sequence-level ListMLE")
    return tokens, view, shared, sampled


def _cast_view(view: TeacherView, dtype: torch.dtype) -> TeacherView:
    for name in ("topk_logprobs", "tail_logprob", "entropy", "candidate_scores", "sequence_scores"):
        value = getattr(view, name)
        if value is not None:
            setattr(view, name, value.to(dtype))
    return view


# ----------------------------------------------------------------------------- public API


def tsdkd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherSignals,
    mask: torch.Tensor,
    config: TSDKDConfig,
    *,
    shared_vocab_size: int,
    sampled_ids: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TSD-KD loss from student logits [B, T, Vs].

    teacher: TeacherSignals (dense logits / hidden, or sparse). mask [B, T]: 1 on
    response tokens; position t of every tensor predicts response token t.
    shared_vocab_size: compare on token ids [0, shared_vocab_size) (<= both models'
    logit rows). sampled_ids [B, T] and group_size (responses per prompt, rows
    grouped consecutively) are needed for the sequence-level ListMLE.
    Returns (scalar loss, metrics dict of floats).
    """
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 3:
        raise ValueError("student_logits must be a [B, T, V] tensor")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    tokens, view, shared, sampled = _prepare(
        tuple(student_logits.shape[:2]), student_logits.shape[-1], student_logits.device,
        teacher, mask, config, sampled_ids, shared_vocab_size, group_size,
    )  # fmt: skip
    dtype = _compute_dtype(student_logits.dtype)
    job = _Job(_cast_view(view, dtype), tokens, config, shared, sampled, group_size, dtype)
    loss = _PlainObjective.apply(student_logits, job)
    return loss, job.metrics


def tsdkd_loss_fused(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher: TeacherSignals,
    mask: torch.Tensor,
    config: TSDKDConfig,
    *,
    shared_vocab_size: int,
    sampled_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    student_head: OutputHead = IDENTITY_HEAD,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TSD-KD loss from student hidden states [B, T, H] and lm_head weight [Vs, H].

    Same arguments and result as tsdkd_loss, but the student's logits
    student_head(hidden @ W.T) exist only config.chunk_size tokens at a time; gradients
    w.r.t. hidden states and weight (through the head's scale and softcap) are computed
    chunk by chunk and equal the unchunked ones. student_head: what the student's model
    family does after its lm_head (e.g. OutputHead(softcap=30.0) for Gemma-2). With a dense
    teacher, pass TeacherSignals(hidden=..., lm_head_weight=..., output_head=...) so the
    teacher's logits are chunked too.
    """
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() != 3:
        raise ValueError("student_hidden must be a [B, T, H] tensor")
    if not student_hidden.is_floating_point():
        raise ValueError(f"student_hidden must be floating point, got {student_hidden.dtype}")
    device = student_hidden.device
    _check_tensor(
        "student_lm_head_weight", student_lm_head_weight, (None, student_hidden.shape[-1]), device, floating=True
    )
    if not isinstance(student_head, OutputHead):
        raise ValueError(f"student_head must be an OutputHead (scale, softcap), got {type(student_head).__name__}")
    if student_lm_head_weight.dtype != student_hidden.dtype:
        raise ValueError(
            f"student_hidden ({student_hidden.dtype}) and student_lm_head_weight ({student_lm_head_weight.dtype}) "
            "must have the same dtype"
        )
    tokens, view, shared, sampled = _prepare(
        tuple(student_hidden.shape[:2]), student_lm_head_weight.shape[0], device,
        teacher, mask, config, sampled_ids, shared_vocab_size, group_size,
    )  # fmt: skip
    dtype = _compute_dtype(student_hidden.dtype)
    job = _Job(_cast_view(view, dtype), tokens, config, shared, sampled, group_size, dtype, student_head)
    loss = _FusedObjective.apply(student_hidden, student_lm_head_weight, job)
    return loss, job.metrics
