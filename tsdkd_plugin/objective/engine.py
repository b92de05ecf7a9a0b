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
vocabularies). Instead each term (terms.py) gives what it can in the main pass,
finishes after it, and names the tokens whose gradient is still missing or wrong;
a correction pass recomputes only those tokens' logits:

- L_ent: the main pass weights every token by 1/n_sel with n_sel the count the
  quantile will keep (known from the token counts alone unless entropies tie), or
  by 0 when fewer than half are kept; afterwards the correction pass recomputes
  the tokens whose weight was wrong -- about min(f, 1 - f) of them, or all on a
  tie -- and adds the difference. Exact, and ~10% of the tokens in both presets.
- L_ind: its gradient lives on the k candidate logits only, so the main pass keeps
  each token's candidate ids and scores ([N, k]); once the openers are known the
  ListMLE gradient is applied as k rows of W per opener token.
- L_seq: reaches the logits only through log q_t(y_t); the main pass stores those,
  the gradient of L_seq w.r.t. them is taken on a [B] tensor, and the correction
  pass adds coef_t * d log q_t(y_t) / dz_t (the surrogate coef_t * log q_t(y_t)).

With TSDKDConfig.term_balance = "grad_norm" (an opt-in remedy, docs/objective.md) the computation
above is preceded by a measurement without gradients: the main pass and the selections, then the
diagnostics' pass of exact per-term gradients (`_gradient_sums`); the norms it finds set the extra
terms' weights for the real passes.

This module keeps only what is common: the valid tokens, each chunk's student and
teacher rows, the chunk loop, the per-sequence opener, the correction pass and the
metrics that belong to no term. All math is in float32 (float64 if the inputs are
float64), whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .chunking import ChunkRows
from .config import EXTRA_WEIGHT_FIELDS, TSDKDConfig
from .entropy import entropy_from_logprobs
from .errors import NonFiniteInputError
from .listmle import opener_mask
from .terms import TERM_ORDER, Term, active_terms

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

# Returned besides METRIC_KEYS only with TSDKDConfig.diagnostics (a term that is off gives 0).
# Gradients are of each weighted term (as it enters L) w.r.t. the student's logits over the
# shared vocabulary at the response tokens; cosines are with the direct term's gradient.
DIAGNOSTIC_KEYS = (
    "diag_grad_norm_direct",
    "diag_grad_norm_entropy",
    "diag_grad_norm_indirect_token",
    "diag_grad_norm_indirect_sequence",
    "diag_grad_cos_entropy_direct",
    "diag_grad_cos_indirect_token_direct",
    "diag_grad_cos_indirect_sequence_direct",
    "diag_teacher_mass_on_candidates",
)


# Returned besides METRIC_KEYS only with TSDKDConfig.term_balance = "grad_norm": the factor G_dir / G
# each extra term's weight was multiplied by in this micro-batch (1 when unchanged, e.g. a term that
# is off).
BALANCE_KEYS = (
    "balance_scale_entropy",
    "balance_scale_indirect_token",
    "balance_scale_indirect_sequence",
)
# The terms term_balance rescales: every term but the direct one (the same order as BALANCE_KEYS).
BALANCED_TERMS = tuple(term for term in TERM_ORDER if term.weight_field in EXTRA_WEIGHT_FIELDS)


def metric_keys(config: TSDKDConfig) -> tuple[str, ...]:
    """The metric names the objective returns under `config` (diagnostics and balance scales only
    when asked for)."""
    keys = METRIC_KEYS + DIAGNOSTIC_KEYS if config.diagnostics else METRIC_KEYS
    return keys + BALANCE_KEYS if config.term_balance == "grad_norm" else keys


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


@dataclass
class Batch:
    """The micro-batch as every term sees it: valid tokens, teacher, settings, whole-batch values."""

    tokens: Tokens
    teacher: TeacherView
    config: TSDKDConfig
    sampled_ids: torch.Tensor | None  # [N] int64, for the sequence level
    group_size: int | None
    dtype: torch.dtype  # compute dtype
    need_grad: bool
    chunk_size: int
    measuring: bool = False  # a term_balance measurement: no gradient, exact gradients kept
    student_entropy: torch.Tensor | None = None  # [N], filled by the main pass
    teacher_entropy: torch.Tensor | None = None  # [N], when known
    opener: torch.Tensor | None = None  # [N] bool, set after the main pass

    def fresh(self, **changes) -> Batch:
        """The same micro-batch with `changes` (e.g. another config), before any pass."""
        return replace(self, student_entropy=None, teacher_entropy=None, opener=None, **changes)

    @property
    def exact_grads(self) -> bool:
        """Whether the terms keep what `Term.exact_grad` needs (diagnostics, or measuring)."""
        return self.config.diagnostics or self.measuring

    @property
    def num(self) -> int:
        return self.tokens.num

    @property
    def device(self) -> torch.device:
        return self.tokens.positions.device

    @property
    def tau(self) -> float:
        return float(self.config.temperature)

    @property
    def dense(self) -> bool:
        return self.teacher.rows is not None

    @property
    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device)

    def per_token(self) -> torch.Tensor:
        return torch.zeros(self.num, dtype=self.dtype, device=self.device)

    def chunks(self, num: int):
        """Slices of `num` rows, chunk_size at a time."""
        for start in range(0, num, self.chunk_size):
            yield slice(start, min(start + self.chunk_size, num))

    @property
    def lengths(self) -> torch.Tensor:
        """[B] response tokens per sequence (int64)."""
        return self.tokens.mask.sum(1)

    def grid(self, token_values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[N] per-token values laid out as [B, T], `fill` at prompt and padding positions."""
        out = torch.full(self.tokens.mask.shape, fill, dtype=token_values.dtype, device=self.device)
        out.view(-1)[self.tokens.positions] = token_values
        return out

    def response_token_weights(self) -> torch.Tensor:
        """[N] 1 / (length of the token's response * number of non-empty responses): summing
        values times these is the mean over responses of each response's token mean."""
        lengths = self.lengths.to(self.dtype)
        num_responses = int((lengths > 0).sum())
        return (1.0 / (lengths.clamp_min(1) * num_responses))[self.tokens.sequence]

    def per_sequence_mean(self, token_values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean of per-token values over each sequence's valid tokens ([B]; 0 for empty sequences)."""
        sums = torch.zeros(self.tokens.batch_size, dtype=token_values.dtype, device=token_values.device)
        sums.index_add_(0, self.tokens.sequence, token_values)
        return sums / lengths.clamp_min(1).to(token_values.dtype)


@dataclass
class Chunk:
    """One chunk of tokens in a pass: the student's (and the teacher's) log-probs over the shared
    vocabulary, and the chunk's gradient buffer (None when no dense gradient is wanted).

    The first term with a dense gradient writes the buffer (`grad_to_write`), later ones add to it
    (`grad_to_add`, which zeroes it if nobody wrote yet)."""

    index: slice | torch.Tensor
    rows: int
    logq: torch.Tensor
    q: torch.Tensor
    lse: torch.Tensor  # [C, 1] log-sum-exp subtracted by the log-softmax
    scratch: torch.Tensor
    grad: torch.Tensor | None
    entropy: torch.Tensor | None = None  # [C] H_S
    logp: torch.Tensor | None = None  # dense teacher rows, when a term needs them
    p: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None  # [C] H_T, when known
    grad_written: bool = False

    def grad_to_write(self) -> torch.Tensor | None:
        self.grad_written = self.grad is not None
        return self.grad

    def grad_to_add(self) -> torch.Tensor | None:
        if self.grad is not None and not self.grad_written:
            self.grad.zero_()
            self.grad_written = True
        return self.grad

    def student_rows(self, tau: float) -> ChunkRows:
        return ChunkRows(self.logq, self.lse, tau, self.scratch)


def _log_softmax_rows_(rows: torch.Tensor, tau: float) -> torch.Tensor:
    """rows <- log_softmax(rows / tau) in place; returns the [C, 1] log-sum-exp it subtracted."""
    if tau != 1.0:
        rows.div_(tau)
    lse = torch.logsumexp(rows, dim=1, keepdim=True)
    rows.sub_(lse)
    return lse


def _student_chunk(student, index, rows: int, work: _Workspace, tau: float, with_grad: bool) -> Chunk:
    logq = work.get("logq", rows)
    student.fill(index, logq)
    lse = _log_softmax_rows_(logq, tau)
    q = torch.exp(logq, out=work.get("q", rows))
    grad = work.get("grad", rows) if with_grad else None
    return Chunk(index, rows, logq, q, lse, work.get("scratch", rows), grad)


def _teacher_chunk(chunk: Chunk, teacher: TeacherView, work: _Workspace, tau: float) -> torch.Tensor:
    """Fill the chunk's dense teacher log-probs and probs; returns the teacher's entropies [C]."""
    chunk.logp = work.get("logp", chunk.rows)
    teacher.rows.fill(chunk.index, chunk.logp)
    _log_softmax_rows_(chunk.logp, tau)
    chunk.p = torch.exp(chunk.logp, out=work.get("p", chunk.rows))
    return entropy_from_logprobs(chunk.logp, chunk.p, scratch=chunk.scratch)


def evaluate(student, batch: Batch, shared: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Value of the objective; its gradient is accumulated into `student` as a side effect.

    student: StudentLogits or StudentHidden. Returns (loss 0-dim tensor, metrics)."""
    config = batch.config
    keys = metric_keys(config)
    if batch.num == 0:
        return batch.zero, {key: 1.0 if key in BALANCE_KEYS else 0.0 for key in keys}
    work = _Workspace(batch.chunk_size, shared, batch.dtype, batch.device)
    balance = None
    if config.term_balance == "grad_norm":
        balance = _balance_scales(student, batch, work)
        scaled = {term.weight_field: getattr(config, term.weight_field) * scale for term, scale in balance.items()}
        batch = batch.fresh(config=replace(config, **scaled))
    terms, values, num_corrected = _passes(student, batch, work)

    # L = w_dir*L_dir + lambda_ent*L_ent + alpha*L_ind + alpha_seq*L_seq, in this order (a term
    # that is off contributes weight * 0).
    weighted = [getattr(batch.config, term.weight_field) * values.get(term, batch.zero) for term in TERM_ORDER]
    total = weighted[0] + weighted[1] + weighted[2] + weighted[3]

    # ---------------- metrics (one device sync) ----------------
    stats = dict.fromkeys(METRIC_KEYS, batch.zero)
    for term in terms:
        stats[term.loss_key] = values[type(term)]
        stats.update(term.metrics())
    stats.update(_common_metrics(batch, num_corrected))
    stats["loss"] = total
    if config.diagnostics:
        stats.update(_diagnostics(student, batch, terms, work))
    if balance is not None:
        stats.update({f"balance_scale_{term.name}": batch.zero + balance.get(term, 1.0) for term in BALANCED_TERMS})
    packed = torch.stack([stats[key].reshape(()).to(batch.dtype) for key in keys]).tolist()
    metrics = dict(zip(keys, (float(v) for v in packed), strict=True))
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteInputError(
            "TSD-KD loss is not finite although every input is finite (e.g. sparse signals whose tail_logprob is "
            "-inf while K < vocabulary); check the teacher signals"
        )
    return total, metrics


def _passes(student, batch: Batch, work: _Workspace) -> tuple[list[Term], dict[type, torch.Tensor], int]:
    """The main pass, the whole-batch selections, each term's finish and (with gradients) the
    correction pass. Returns (the active terms, their unweighted values, tokens corrected)."""
    num, tau, device = batch.num, batch.tau, batch.device
    config, teacher = batch.config, batch.teacher
    terms: list[Term] = [term(batch) for term in active_terms(config)]
    need_teacher_rows = batch.dense and any(term.uses_teacher_rows(teacher) for term in terms)
    main_pass_grad = batch.need_grad and any(term.dense_grad for term in terms)  # decided in their set-up
    batch.student_entropy = batch.per_token()
    batch.teacher_entropy = batch.per_token() if need_teacher_rows else (None if batch.dense else teacher.entropy)
    bad_student = torch.zeros((), dtype=torch.bool, device=device)
    bad_teacher = torch.zeros((), dtype=torch.bool, device=device)

    # ---------------- main pass ----------------
    for index in batch.chunks(num):
        chunk = _student_chunk(student, index, index.stop - index.start, work, tau, main_pass_grad)
        chunk.entropy = entropy_from_logprobs(chunk.logq, chunk.q, scratch=chunk.scratch)
        # A NaN or +-inf anywhere in a row makes its entropy NaN (inf - inf, 0 * -inf):
        # checking [C] entropies replaces a pass over the [C, V] logits.
        bad_student |= ~torch.isfinite(chunk.entropy).all()
        batch.student_entropy[index] = chunk.entropy
        if need_teacher_rows:
            h_t = _teacher_chunk(chunk, teacher, work, tau)
            bad_teacher |= ~torch.isfinite(h_t).all()  # see the student's check above
            batch.teacher_entropy[index] = h_t
        if batch.teacher_entropy is not None:
            chunk.teacher_entropy = batch.teacher_entropy[index]
        for term in terms:
            term.chunk(chunk)
        if chunk.grad_written:
            student.add_grad(index, chunk.grad, chunk.student_rows(tau))

    if bool(bad_teacher):
        raise NonFiniteInputError("teacher logits contain NaN or inf; teacher inputs must be finite")
    if bool(bad_student):
        raise NonFiniteInputError("student logits contain NaN or inf")

    # ---------------- whole-batch selections ----------------
    entropy_grid = batch.grid(batch.student_entropy)
    batch.opener = opener_mask(entropy_grid, batch.tokens.mask, config.opener_fraction).view(-1)[batch.tokens.positions]
    values = {type(term): term.finish(student) for term in terms}

    # ---------------- correction pass ----------------
    corrections = [term for term in terms if term.correction is not None] if batch.need_grad else []
    needs_fix = torch.zeros(num, dtype=torch.bool, device=device)
    for term in corrections:
        needs_fix |= term.correction != 0
    fix_index = needs_fix.nonzero().squeeze(1)
    for part in batch.chunks(fix_index.numel()):
        rows = fix_index[part]
        chunk = _student_chunk(student, rows, rows.numel(), work, tau, True)
        for term in corrections:
            term.correct(chunk, rows)
        student.add_grad(rows, chunk.grad, chunk.student_rows(tau))
    return terms, values, fix_index.numel()


def _common_metrics(batch: Batch, num_corrected: int) -> dict[str, torch.Tensor]:
    """Metrics that belong to no term: openers, entropies, token counts."""
    dtype, device, tokens = batch.dtype, batch.device, batch.tokens
    lengths_open = torch.zeros(tokens.batch_size, dtype=dtype, device=device)
    lengths_open.index_add_(0, tokens.sequence, batch.opener.to(dtype))
    nonempty = tokens.mask.any(1)
    teacher_entropy = batch.teacher_entropy
    return {
        "opener_mean_length": lengths_open[nonempty].mean(),
        "opener_token_fraction": batch.opener.to(dtype).mean(),
        "entropy_student_mean": batch.student_entropy.mean(),
        "entropy_teacher_mean": teacher_entropy.to(dtype).mean() if teacher_entropy is not None else batch.zero,
        "num_tokens": torch.tensor(float(batch.num), dtype=dtype, device=device),
        "correction_token_fraction": torch.tensor(num_corrected / batch.num, dtype=dtype, device=device),
    }


def _balance_scales(student, batch: Batch, work: _Workspace) -> dict[type[Term], float]:
    """term_balance="grad_norm": {extra term: G_dir / G_t} for the active extra terms, G_dir the norm
    of the weighted direct term's gradient at the student's logits and G_t that of the unweighted
    term t (1 where G_t or G_dir is 0, or the ratio is not finite; empty when the direct term is off).

    A measurement before the real pass, with no gradient: the main pass and the selections (what the
    terms' gradients depend on), then the diagnostics' pass of exact gradients, with the extra terms
    at weight 1."""
    config = batch.config
    extra = [term for term in active_terms(config) if term in BALANCED_TERMS]
    if not config.direct_on or not extra:
        return {}
    unit = replace(config, **{term.weight_field: 1.0 for term in extra})
    probe = batch.fresh(config=unit, need_grad=False, measuring=True)
    terms, _, _ = _passes(student, probe, work)
    squares, _ = _gradient_sums(student, probe, terms, work)
    norms = dict(zip(squares, torch.stack(list(squares.values())).sqrt().tolist(), strict=True))  # one sync
    scales = {}
    for term in extra:
        ratio = norms["direct"] / norms[term.name] if norms[term.name] > 0 else 1.0
        scales[term] = ratio if 0 < ratio < math.inf else 1.0
    return scales


def _gradient_sums(
    student, batch: Batch, terms: list[Term], work: _Workspace, *, diagnostics: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One more pass over the student's (and a dense teacher's) rows: every term's exact gradient
    w.r.t. the logits (as it enters L), chunk by chunk. Returns ({term name: squared norm},
    {term name: dot product with the direct term's gradient, and under "candidate_mass" the sum
    over opener tokens of the teacher's mass on the student's candidates}); the second only with
    `diagnostics`, else empty."""
    teacher, tau = batch.teacher, batch.tau
    squares = {term.name: batch.zero for term in terms}
    dots = {term.name: batch.zero for term in terms} if diagnostics else {}
    direct = next((term for term in terms if term.name == "direct"), None)
    candidate_mass = batch.zero
    for index in batch.chunks(batch.num):
        chunk = _student_chunk(student, index, index.stop - index.start, work, tau, with_grad=False)
        chunk.entropy = entropy_from_logprobs(chunk.logq, chunk.q, scratch=chunk.scratch)
        if batch.dense:
            _teacher_chunk(chunk, teacher, work, tau)
        if batch.teacher_entropy is not None:
            chunk.teacher_entropy = batch.teacher_entropy[index]
        reference = None
        if direct is not None:
            reference = work.get("grad", chunk.rows)
            direct.exact_grad(chunk, reference)
            squares["direct"] = squares["direct"] + torch.mul(reference, reference, out=chunk.scratch).sum()
        for term in terms:
            if term is direct:
                continue
            grad = work.get("diagnostic", chunk.rows)
            term.exact_grad(chunk, grad)
            squares[term.name] = squares[term.name] + torch.mul(grad, grad, out=chunk.scratch).sum()
            if diagnostics and reference is not None:
                dots[term.name] = dots[term.name] + torch.mul(grad, reference, out=chunk.scratch).sum()
        if diagnostics:
            candidate_mass = candidate_mass + _teacher_candidate_mass(chunk, batch)
    if diagnostics:
        dots["candidate_mass"] = candidate_mass
    return squares, dots


def _diagnostics(student, batch: Batch, terms: list[Term], work: _Workspace) -> dict[str, torch.Tensor]:
    """Every term's gradient norm w.r.t. the logits and its cosine with the direct term's (one more
    pass, `_gradient_sums`); and the teacher's probability mass on the student's top-k candidates
    at opener tokens."""
    stats = {key: batch.zero for key in DIAGNOSTIC_KEYS}
    squares, dots = _gradient_sums(student, batch, terms, work, diagnostics=True)
    direct_on = "direct" in squares
    for term in terms:
        stats[f"diag_grad_norm_{term.name}"] = squares[term.name].sqrt()
        if term.name != "direct" and direct_on:
            norms = squares[term.name].sqrt() * squares["direct"].sqrt()
            stats[f"diag_grad_cos_{term.name}_direct"] = torch.where(norms > 0, dots[term.name] / norms, 0.0)
    num_open = batch.opener.sum()
    stats["diag_teacher_mass_on_candidates"] = dots["candidate_mass"] / num_open.clamp_min(1)
    return stats


def _teacher_candidate_mass(chunk: Chunk, batch: Batch) -> torch.Tensor:
    """Sum over the chunk's opener tokens of the teacher's probability (at tau) on the student's
    top-k candidates: the fixed candidates and their teacher log-probs when the signals carry
    them, else the student's current top-k and the dense teacher's log-probs (0 when neither)."""
    teacher, index = batch.teacher, chunk.index
    if teacher.candidate_scores is not None:
        logprobs = teacher.candidate_scores[index]
    elif chunk.logp is not None:
        if teacher.candidate_ids is not None:
            ids = teacher.candidate_ids[index]
        else:  # k may exceed the vocabulary when the token level is off (it is only checked when on)
            ids = torch.topk(chunk.logq, min(batch.config.num_candidates, chunk.logq.shape[1]), dim=1).indices
        logprobs = chunk.logp.gather(1, ids)
    else:
        return batch.zero
    return (logprobs.exp().sum(1) * batch.opener[index].to(batch.dtype)).sum()
