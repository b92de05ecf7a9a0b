"""The TSD-KD objective, computed chunk by chunk over tokens (both entry points).

Value and gradient are produced in the forward pass, Liger-Kernel style: for
each chunk of C tokens the student's logits [C, V] are made (or read), every
per-token term and its exact gradient w.r.t. those logits is computed, and the
gradient is handed to the student source (which turns it into gradients of
hidden states and lm_head weight, or stores it). Memory is a handful of [C, V]
buffers, independent of the number of tokens.

Three parts of the objective need the whole batch before a token's gradient is
known: the entropy-quantile selection (L_ent), the per-sequence opener (L_ind)
and the sequence-level ListMLE (L_seq). Doing a no-grad pass first to find them
would cost one more student matmul over all tokens (~25% of the time at 150k
vocabularies). Instead:

- L_ent: the main pass weights every token by 1/n_sel with n_sel the count the
  quantile will keep (known from the token count alone unless entropies tie);
  afterwards a correction pass recomputes the logits of the tokens whose weight
  was wrong -- the (1 - fraction) least uncertain ones, or all on a tie -- and
  adds the difference. Exact, and ~10% of the tokens at the default.
- L_ind: its gradient lives on the k candidate logits only, so the main pass keeps
  each token's candidate ids and scores ([N, k]); once the openers are known the
  ListMLE gradient is applied as k rows of W per opener token.
- L_seq: reaches the logits only through log q_t(y_t); the main pass stores those,
  the gradient of L_seq w.r.t. them is taken on a [B] tensor, and the correction
  pass adds coef_t * d log q_t(y_t) / dz_t (the surrogate coef_t * log q_t(y_t)).

All math is in float32 (float64 if the inputs are float64), whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunking import ChunkRows
from .config import TSDKDConfig
from .entropy import add_entropy_grad_, entropy_from_logprobs, entropy_selection, expected_selected_count
from .errors import NonFiniteInputError
from .listmle import add_logprob_grad_, listmle_value_and_grad, opener_mask, sequence_listmle
from .selective_jsd import entropy_gate, gate_selected, generalized_jsd_dense, generalized_jsd_partition

METRIC_KEYS = (
    "loss",
    "loss_direct",
    "loss_entropy",
    "loss_indirect_token",
    "loss_indirect_sequence",
    "jsd_mean",
    "gate_mean_weight",
    "gate_selected_fraction",
    "opener_mean_length",
    "opener_token_fraction",
    "entropy_student_mean",
    "entropy_teacher_mean",
    "entropy_selected_fraction",
    "entropy_threshold",
    "num_tokens",
    "correction_token_fraction",
)


@dataclass
class Tokens:
    """The valid (response) tokens of a [B, T] batch, flattened in row-major order."""

    mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [N] flat index b * T + t
    sequence: torch.Tensor  # [N] row b of each token

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Tokens:
        valid = mask.bool()
        positions = valid.reshape(-1).nonzero().squeeze(1)
        return cls(valid, positions, torch.div(positions, valid.shape[1], rounding_mode="floor"))

    @property
    def num(self) -> int:
        return self.positions.numel()

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]


@dataclass
class TeacherView:
    """The teacher restricted to the valid tokens (built by loss.py from TeacherSignals)."""

    rows: object | None = None  # LogitsRows / HiddenRows (dense) or None (sparse)
    topk_logprobs: torch.Tensor | None = None  # [N, K]
    topk_ids: torch.Tensor | None = None  # [N, K] int64
    tail_logprob: torch.Tensor | None = None  # [N]
    entropy: torch.Tensor | None = None  # [N]
    candidate_ids: torch.Tensor | None = None  # [N, k] int64
    candidate_scores: torch.Tensor | None = None  # [N, k]
    sequence_scores: torch.Tensor | None = None  # [B]


class _Workspace:
    """[chunk, V] buffers allocated once per call and reused for every chunk."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self._shape = (rows, cols)
        self._dtype, self._device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        return self._buffers[name][:rows]


def _log_softmax_rows_(rows: torch.Tensor, tau: float) -> torch.Tensor:
    """rows <- log_softmax(rows / tau) in place; returns the [C, 1] log-sum-exp it subtracted."""
    if tau != 1.0:
        rows.div_(tau)
    lse = torch.logsumexp(rows, dim=1, keepdim=True)
    rows.sub_(lse)
    return lse


def _chunks(num: int, size: int):
    for start in range(0, num, size):
        yield slice(start, min(start + size, num))


def run_objective(
    student,
    teacher: TeacherView,
    tokens: Tokens,
    config: TSDKDConfig,
    *,
    shared: int,
    sampled_ids: torch.Tensor | None,
    group_size: int | None,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Value of the objective; its gradient is accumulated into `student` as a side effect.

    student: StudentLogits or StudentHidden; sampled_ids: [N] int64 (needed for the
    sequence level). Returns (loss 0-dim tensor, metrics).
    """
    device = tokens.positions.device
    num = tokens.num
    zero = torch.zeros((), dtype=compute_dtype, device=device)
    if num == 0:
        return zero, dict.fromkeys(METRIC_KEYS, 0.0)

    tau = float(config.temperature)
    chunk = min(config.chunk_size, num)
    work = _Workspace(chunk, shared, compute_dtype, device)
    dense_teacher = teacher.rows is not None
    need_grad = student.wants_grad
    # Only L_dir and L_ent put a dense gradient on every token in the main pass.
    main_pass_grad = need_grad and (config.direct_on or config.entropy_on)
    token_on, seq_on = config.token_level_on, config.sequence_level_on
    need_teacher_rows = dense_teacher and (
        config.direct_on
        or (token_on and teacher.candidate_scores is None)
        or (seq_on and teacher.sequence_scores is None)
    )
    need_teacher_token_logprob = dense_teacher and seq_on and teacher.sequence_scores is None

    def per_token():
        return torch.zeros(num, dtype=compute_dtype, device=device)

    student_entropy = per_token()
    have_teacher_entropy = need_teacher_rows or not dense_teacher
    teacher_entropy = per_token() if need_teacher_rows else (teacher.entropy if not dense_teacher else None)
    jsd = per_token() if config.direct_on else None
    gate = per_token() if config.direct_on else None
    k = config.num_candidates
    if token_on:
        cand_ids = torch.zeros(num, k, dtype=torch.long, device=device)
        cand_student = torch.zeros(num, k, dtype=compute_dtype, device=device)
        cand_teacher = torch.zeros(num, k, dtype=compute_dtype, device=device)
    if seq_on:
        student_token_logprob = per_token()
        teacher_token_logprob = per_token() if need_teacher_token_logprob else None

    # Every token's L_ent weight before the selection is known (see module docstring).
    n_sel_guess = expected_selected_count(num, config.entropy_top_fraction) if config.entropy_on else 0
    entropy_coef_guess = config.entropy_weight / n_sel_guess / tau if config.entropy_on else 0.0
    direct_coef = config.direct_weight / num / tau
    bad_student = torch.zeros((), dtype=torch.bool, device=device)
    bad_teacher = torch.zeros((), dtype=torch.bool, device=device)

    # ---------------- main pass ----------------
    for index in _chunks(num, chunk):
        c = index.stop - index.start
        logq = work.get("logq", c)
        student.fill(index, logq)
        lse = _log_softmax_rows_(logq, tau)
        q = torch.exp(logq, out=work.get("q", c))
        grad = work.get("grad", c)
        scratch = work.get("scratch", c)
        h_s = entropy_from_logprobs(logq, q, scratch=scratch)
        # A NaN or +-inf anywhere in a row makes its entropy NaN (inf - inf, 0 * -inf):
        # checking [C] entropies replaces a pass over the [C, V] logits.
        bad_student |= ~torch.isfinite(h_s).all()
        student_entropy[index] = h_s

        if need_teacher_rows:
            logp = work.get("logp", c)
            teacher.rows.fill(index, logp)
            _log_softmax_rows_(logp, tau)
            p = torch.exp(logp, out=work.get("p", c))
            h_t = entropy_from_logprobs(logp, p, scratch=scratch)
            bad_teacher |= ~torch.isfinite(h_t).all()  # see the student's check above
            teacher_entropy[index] = h_t

        if config.direct_on:
            if dense_teacher:
                jsd[index] = generalized_jsd_dense(
                    logq, q, logp, p, config.beta, grad_out=grad if main_pass_grad else None, scratch=scratch
                )
            else:
                jsd[index] = generalized_jsd_partition(
                    logq, q, teacher.topk_ids[index], teacher.topk_logprobs[index],
                    teacher.tail_logprob[index], config.beta, grad_out=grad if main_pass_grad else None, scratch=scratch,
                )  # fmt: skip
            w = entropy_gate(h_s, teacher_entropy[index], config.gate, config.gate_margin)
            gate[index] = w
            if main_pass_grad:
                grad.mul_((w * direct_coef).unsqueeze(1))
        elif main_pass_grad:
            grad.zero_()

        if config.entropy_on and main_pass_grad:
            coef = torch.full((c,), entropy_coef_guess, dtype=compute_dtype, device=device)
            add_entropy_grad_(grad, logq, q, h_s, coef, scratch=scratch)

        if token_on:
            if teacher.candidate_ids is not None:
                ids = teacher.candidate_ids[index]
            else:
                ids = torch.topk(logq, k, dim=1).indices
            cand_ids[index] = ids
            cand_student[index] = logq.gather(1, ids)
            if teacher.candidate_scores is not None:
                cand_teacher[index] = teacher.candidate_scores[index]
            else:
                cand_teacher[index] = logp.gather(1, ids)

        if seq_on:
            sampled = sampled_ids[index].unsqueeze(1)
            student_token_logprob[index] = logq.gather(1, sampled).squeeze(1)
            if need_teacher_token_logprob:
                teacher_token_logprob[index] = logp.gather(1, sampled).squeeze(1)

        if main_pass_grad:
            student.add_grad(index, grad, ChunkRows(logq, lse, tau, scratch))

    if bool(bad_teacher):
        raise NonFiniteInputError("teacher logits contain NaN or inf; teacher inputs must be finite")
    if bool(bad_student):
        raise NonFiniteInputError("student logits contain NaN or inf")

    # ---------------- whole-batch selections ----------------
    loss_direct = (gate * jsd).sum() / num if config.direct_on else zero
    loss_entropy, loss_token, loss_sequence = zero, zero, zero
    correction_coef_entropy = None
    if config.entropy_on:
        selected, threshold = entropy_selection(student_entropy, config.entropy_top_fraction)
        n_sel = int(selected.sum())
        loss_entropy = (student_entropy * selected).sum() / n_sel
        true_coef = selected.to(compute_dtype) * (config.entropy_weight / n_sel / tau)
        correction_coef_entropy = true_coef - entropy_coef_guess

    entropy_grid = torch.zeros(tokens.mask.shape, dtype=compute_dtype, device=device)
    entropy_grid.view(-1)[tokens.positions] = student_entropy
    opener = opener_mask(entropy_grid, tokens.mask, config.opener_fraction).view(-1)[tokens.positions]
    n_open = int(opener.sum())
    if token_on:
        open_index = opener.nonzero().squeeze(1)
        scale = config.indirect_weight / n_open / tau
        total_pl = zero
        for part in _chunks(n_open, chunk):
            rows = open_index[part]
            pl, pl_grad = listmle_value_and_grad(cand_student[rows], cand_teacher[rows], config.listmle_form)
            total_pl = total_pl + pl.sum()
            if need_grad:
                student.add_sparse_grad(rows, cand_ids[rows], pl_grad * scale)
        loss_token = total_pl / n_open

    correction_coef_sequence = None
    if seq_on:
        lengths = tokens.mask.sum(1)
        student_scores = _per_sequence_mean(student_token_logprob, tokens, lengths)
        if teacher.sequence_scores is not None:
            teacher_scores = teacher.sequence_scores.to(compute_dtype)
        else:
            teacher_scores = _per_sequence_mean(teacher_token_logprob, tokens, lengths)
        loss_sequence, score_grad, _ = sequence_listmle(
            student_scores, teacher_scores, lengths > 0, group_size, config.listmle_form
        )
        per_token_grad = score_grad / lengths.clamp_min(1).to(compute_dtype)
        correction_coef_sequence = per_token_grad[tokens.sequence] * (config.sequence_weight / tau)

    # ---------------- correction pass ----------------
    needs_fix = torch.zeros(num, dtype=torch.bool, device=device)
    if need_grad and correction_coef_entropy is not None:
        needs_fix |= correction_coef_entropy != 0
    if need_grad and correction_coef_sequence is not None:
        needs_fix |= correction_coef_sequence != 0
    fix_index = needs_fix.nonzero().squeeze(1)
    for part in _chunks(fix_index.numel(), chunk):
        rows = fix_index[part]
        c = rows.numel()
        logq = work.get("logq", c)
        student.fill(rows, logq)
        lse = _log_softmax_rows_(logq, tau)
        q = torch.exp(logq, out=work.get("q", c))
        grad = work.get("grad", c).zero_()
        scratch = work.get("scratch", c)
        if correction_coef_entropy is not None:
            h_s = entropy_from_logprobs(logq, q, scratch=scratch)
            add_entropy_grad_(grad, logq, q, h_s, correction_coef_entropy[rows], scratch=scratch)
        if correction_coef_sequence is not None:
            add_logprob_grad_(grad, q, sampled_ids[rows], correction_coef_sequence[rows])
        student.add_grad(rows, grad, ChunkRows(logq, lse, tau, scratch))

    total = (
        config.direct_weight * loss_direct
        + config.entropy_weight * loss_entropy
        + config.indirect_weight * loss_token
        + config.sequence_weight * loss_sequence
    )

    # ---------------- metrics (one device sync) ----------------
    lengths_open = torch.zeros(tokens.batch_size, dtype=compute_dtype, device=device)
    lengths_open.index_add_(0, tokens.sequence, opener.to(compute_dtype))
    nonempty = tokens.mask.any(1)
    stats = {
        "loss": total,
        "loss_direct": loss_direct,
        "loss_entropy": loss_entropy,
        "loss_indirect_token": loss_token,
        "loss_indirect_sequence": loss_sequence,
        "jsd_mean": jsd.mean() if config.direct_on else zero,
        "gate_mean_weight": gate.mean() if config.direct_on else zero,
        "gate_selected_fraction": gate_selected(gate, config.gate).to(compute_dtype).mean()
        if config.direct_on
        else zero,
        "opener_mean_length": lengths_open[nonempty].mean(),
        "opener_token_fraction": opener.to(compute_dtype).mean(),
        "entropy_student_mean": student_entropy.mean(),
        "entropy_teacher_mean": teacher_entropy.to(compute_dtype).mean() if have_teacher_entropy else zero,
        "entropy_selected_fraction": selected.to(compute_dtype).mean() if config.entropy_on else zero,
        "entropy_threshold": threshold.to(compute_dtype) if config.entropy_on else zero,
        "num_tokens": torch.tensor(float(num), dtype=compute_dtype, device=device),
        "correction_token_fraction": torch.tensor(fix_index.numel() / num, dtype=compute_dtype, device=device),
    }
    values = torch.stack([stats[key].reshape(()).to(compute_dtype) for key in METRIC_KEYS]).tolist()
    metrics = dict(zip(METRIC_KEYS, (float(v) for v in values)))
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteInputError(
            "TSD-KD loss is not finite although every input is finite (e.g. sparse signals whose tail_logprob is "
            "-inf while K < vocabulary); check the teacher signals"
        )
    return total, metrics


def _per_sequence_mean(token_values: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values over each sequence's valid tokens ([B]; 0 for empty sequences)."""
    sums = torch.zeros(tokens.batch_size, dtype=token_values.dtype, device=token_values.device)
    sums.index_add_(0, tokens.sequence, token_values)
    return sums / lengths.clamp_min(1).to(token_values.dtype)
