"""The four loss terms, one unit each: what it does per chunk, after the main pass, its metrics.

The engine (engine.py) owns the chunk loop, the student's and teacher's rows of each chunk and
the correction pass; it knows no term by name (only the diagnostics compare every term's gradient
with the one named "direct"). A term

- `chunk(chunk)`: reads the chunk's log-probs (and the teacher's), records what it needs later
  and, if it has a dense gradient, writes or adds it into the chunk's gradient buffer;
- `finish(student)`: once every token was seen (whole-batch selections), returns its loss value
  (unweighted) and may hand sparse gradients to the student source;
- `correction`: per-token coefficients of a gradient it could not give in the main pass, or
  None; `correct(chunk, rows)` adds that gradient for the rows the engine recomputed;
- `metrics()`: its logging values (0-dim tensors; keys in engine.METRIC_KEYS);
- `exact_grad(chunk, out)` (diagnostics only): its whole weighted gradient w.r.t. the chunk's
  logits, written into `out`, once `finish` has run.

`uses_teacher_rows(teacher)` says whether it needs the dense teacher's log-probs in the chunks.
See engine.py for why some gradients come after the main pass.
"""

from __future__ import annotations

import torch

from .entropy import add_entropy_grad_, entropy_from_logprobs, entropy_selection, expected_selected_count
from .listmle import add_logprob_grad_, listmle_normalizer, listmle_value_and_grad, sequence_listmle
from .selective_jsd import entropy_gate, gate_selected, generalized_jsd_dense, generalized_jsd_partition


class Term:
    """Defaults: no dense gradient, no teacher rows, nothing after the pass, no correction."""

    name: str  # short name in metric keys
    loss_key: str  # metric key of its unweighted value
    weight_field: str  # the TSDKDConfig field that weights it in L
    dense_grad = False  # puts a gradient on every token's logits in the main pass
    correction: torch.Tensor | None = None

    def __init__(self, batch) -> None:
        self.batch = batch

    @staticmethod
    def uses_teacher_rows(teacher) -> bool:
        return False

    def chunk(self, chunk) -> None:
        pass

    def finish(self, student) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, chunk, rows: torch.Tensor) -> None:
        pass

    def metrics(self) -> dict[str, torch.Tensor]:
        return {}

    def exact_grad(self, chunk, out: torch.Tensor) -> None:
        raise NotImplementedError


def listmle_divisor(config, num_items: int) -> float:
    """What a ListMLE over lists of `num_items` is divided by: log(n!) with
    TSDKDConfig.listmle_normalize (its value at equal scores), else 1 (the paper)."""
    return listmle_normalizer(num_items) if config.listmle_normalize else 1.0


class DirectTerm(Term):
    """L_dir: the entropy-gated generalized JSD w_t JSD_beta(p_t, q_t) (selective_jsd.py), averaged
    over the micro-batch's response tokens, or per response and then over responses.

    Dense teacher: JSD over the shared vocabulary; sparse: on the K+1 partition. Its gradient is
    known per token in the main pass (w_t is stop-gradient, the averaging weights are known)."""

    name = "direct"
    loss_key = "loss_direct"
    weight_field = "direct_weight"
    dense_grad = True

    def __init__(self, batch) -> None:
        super().__init__(batch)
        config = batch.config
        self.jsd = batch.per_token()
        self.gate = batch.per_token()
        if config.direct_reduction == "response":
            self.token_weight = batch.response_token_weights()
            self.coef = self.token_weight * (config.direct_weight / batch.tau)
        else:  # the micro-batch's token mean: one weight for all
            self.token_weight = None
            self.coef = config.direct_weight / batch.num / batch.tau

    @staticmethod
    def uses_teacher_rows(teacher) -> bool:
        return True

    def chunk(self, chunk) -> None:
        config, index = self.batch.config, chunk.index
        grad = chunk.grad_to_write()
        self.jsd[index] = self._jsd(chunk, grad)
        weight = entropy_gate(chunk.entropy, chunk.teacher_entropy, config.gate, config.gate_margin)
        self.gate[index] = weight
        if grad is not None:
            self._weigh(grad, weight, index)

    def _jsd(self, chunk, grad: torch.Tensor | None) -> torch.Tensor:
        """JSD per row; its gradient w.r.t. the tau-scaled logits into `grad` if given."""
        beta, teacher, index = self.batch.config.beta, self.batch.teacher, chunk.index
        if chunk.logp is not None:
            return generalized_jsd_dense(
                chunk.logq, chunk.q, chunk.logp, chunk.p, beta, grad_out=grad, scratch=chunk.scratch
            )
        return generalized_jsd_partition(
            chunk.logq, chunk.q, teacher.topk_ids[index], teacher.topk_logprobs[index],
            teacher.tail_logprob[index], beta, grad_out=grad, scratch=chunk.scratch,
        )  # fmt: skip

    def _weigh(self, grad: torch.Tensor, gate: torch.Tensor, index) -> None:
        coef = self.coef if self.token_weight is None else self.coef[index]
        grad.mul_((gate * coef).unsqueeze(1))

    def exact_grad(self, chunk, out: torch.Tensor) -> None:
        self._jsd(chunk, out)
        self._weigh(out, self.gate[chunk.index], chunk.index)

    def finish(self, student) -> torch.Tensor:
        if self.token_weight is None:
            return (self.gate * self.jsd).sum() / self.batch.num
        return (self.gate * self.jsd * self.token_weight).sum()

    def metrics(self) -> dict[str, torch.Tensor]:
        selected = gate_selected(self.gate, self.batch.config.gate).to(self.batch.dtype)
        return {
            "jsd_mean": self.jsd.mean(),
            "gate_mean_weight": self.gate.mean(),
            "gate_selected_fraction": selected.mean(),
        }


class EntropyTerm(Term):
    """L_ent = mean of H_S over the tokens at or above the (1 - f)-quantile of H_S (entropy.py),
    over the micro-batch's response tokens, or within each response and then over responses.

    The selection needs every token's entropy. The main pass gives each token the weight it would
    have if selected (f >= 1/2) or not (f < 1/2, weight 0): the selected count is known from the
    token count unless entropies tie. The correction pass then recomputes the tokens guessed
    wrong -- about min(f, 1 - f) of them (10% at the reference's 0.9 and the paper's 0.1), all
    of them on a tie -- and adds the difference."""

    name = "entropy"
    loss_key = "loss_entropy"
    weight_field = "entropy_weight"

    def __init__(self, batch) -> None:
        super().__init__(batch)
        config = batch.config
        fraction, scale = config.entropy_top_fraction, config.entropy_weight / batch.tau
        self.per_response = config.entropy_reduction == "response"
        self.dense_grad = fraction >= 0.5  # guess 'selected' (else 0: no main-pass gradient)
        if not self.dense_grad:
            self.guess = 0.0
        elif self.per_response:
            lengths = batch.lengths.tolist()
            num_responses = sum(1 for length in lengths if length)
            counts = [max(expected_selected_count(length, fraction), 1) for length in lengths]
            per_response = torch.tensor([scale / count / num_responses for count in counts], dtype=batch.dtype)
            self.guess = per_response.to(batch.device)[batch.tokens.sequence]
        else:
            self.guess = config.entropy_weight / expected_selected_count(batch.num, fraction) / batch.tau

    def chunk(self, chunk) -> None:
        grad = chunk.grad_to_add() if self.dense_grad else None
        if grad is not None:
            if isinstance(self.guess, torch.Tensor):
                coef = self.guess[chunk.index]
            else:
                coef = torch.full((chunk.rows,), self.guess, dtype=self.batch.dtype, device=self.batch.device)
            add_entropy_grad_(grad, chunk.logq, chunk.q, chunk.entropy, coef, scratch=chunk.scratch)

    def finish(self, student) -> torch.Tensor:
        batch, config = self.batch, self.batch.config
        entropy = batch.student_entropy
        scale = config.entropy_weight / batch.tau
        if self.per_response:
            self.selected, thresholds, counts = per_response_selection(batch, config.entropy_top_fraction)
            nonempty = counts > 0
            num_responses = int(nonempty.sum())
            self.threshold = thresholds[nonempty].mean()
            token_weight = 1.0 / (counts.clamp_min(1).to(batch.dtype) * num_responses)
            per_token = self.selected.to(batch.dtype) * token_weight[batch.tokens.sequence]
            loss = (entropy * per_token).sum()
            true_coef = per_token * scale
        else:
            self.selected, self.threshold = entropy_selection(entropy, config.entropy_top_fraction)
            num_selected = int(self.selected.sum())
            true_coef = self.selected.to(batch.dtype) * (config.entropy_weight / num_selected / batch.tau)
            loss = (entropy * self.selected).sum() / num_selected
        self.true_coef = true_coef
        self.correction = true_coef - self.guess
        return loss

    def correct(self, chunk, rows: torch.Tensor) -> None:
        entropy = entropy_from_logprobs(chunk.logq, chunk.q, scratch=chunk.scratch)
        add_entropy_grad_(
            chunk.grad_to_add(), chunk.logq, chunk.q, entropy, self.correction[rows], scratch=chunk.scratch
        )

    def exact_grad(self, chunk, out: torch.Tensor) -> None:
        out.zero_()
        add_entropy_grad_(out, chunk.logq, chunk.q, chunk.entropy, self.true_coef[chunk.index], scratch=chunk.scratch)

    def metrics(self) -> dict[str, torch.Tensor]:
        """entropy_threshold: the quantile (per response: their mean over non-empty responses)."""
        return {
            "entropy_selected_fraction": self.selected.to(self.batch.dtype).mean(),
            "entropy_threshold": self.threshold.to(self.batch.dtype),
        }


def per_response_selection(batch, top_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """entropy_selection within each response, for all responses at once.

    Returns (selected [N] bool, threshold [B] (0 for empty responses), selected count [B])."""
    valid = batch.tokens.mask
    ordered = torch.sort(batch.grid(batch.student_entropy.detach(), float("inf")), dim=1).values  # valid first
    lengths = batch.lengths
    position = (1.0 - top_fraction) * (lengths - 1).clamp_min(0).to(torch.float64)
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, (lengths - 1).clamp_min(0))
    low_values, high_values = ordered.gather(1, lower[:, None]), ordered.gather(1, upper[:, None])
    weight = (position - lower.to(torch.float64)).to(ordered.dtype)[:, None]
    threshold = torch.where(lengths[:, None] > 0, torch.lerp(low_values, high_values, weight), 0.0)
    selected_grid = valid & (batch.grid(batch.student_entropy) >= threshold)
    selected = selected_grid.view(-1)[batch.tokens.positions]
    return selected, threshold.squeeze(1), selected_grid.sum(1)


class TokenRankingTerm(Term):
    """L_ind: ListMLE of the student's top-k candidates in the teacher's order, at opener tokens.

    The main pass keeps each token's candidate ids and both models' scores ([N, k]); once the
    openers are known the gradient goes to the student as k logit entries per opener token."""

    name = "indirect_token"
    loss_key = "loss_indirect_token"
    weight_field = "indirect_weight"

    def __init__(self, batch) -> None:
        super().__init__(batch)
        config = batch.config
        k = config.num_candidates
        self.ids = torch.zeros(batch.num, k, dtype=torch.long, device=batch.device)
        self.student_scores = torch.zeros(batch.num, k, dtype=batch.dtype, device=batch.device)
        self.teacher_scores = torch.zeros(batch.num, k, dtype=batch.dtype, device=batch.device)

    @staticmethod
    def uses_teacher_rows(teacher) -> bool:
        return teacher.candidate_scores is None

    def chunk(self, chunk) -> None:
        teacher, index = self.batch.teacher, chunk.index
        if teacher.candidate_ids is not None:
            ids = teacher.candidate_ids[index]
        else:
            ids = torch.topk(chunk.logq, self.batch.config.num_candidates, dim=1).indices
        self.ids[index] = ids
        self.student_scores[index] = chunk.logq.gather(1, ids)
        if teacher.candidate_scores is not None:
            self.teacher_scores[index] = teacher.candidate_scores[index]
        else:
            self.teacher_scores[index] = chunk.logp.gather(1, ids)

    def finish(self, student) -> torch.Tensor:
        batch, config = self.batch, self.batch.config
        open_index = batch.opener.nonzero().squeeze(1)
        num_open = open_index.numel()
        divisor = listmle_divisor(config, config.num_candidates)
        scale = config.indirect_weight / num_open / batch.tau / divisor
        total = batch.zero
        self.logit_grad = torch.zeros_like(self.student_scores) if batch.exact_grads else None  # [N, k]
        for part in batch.chunks(num_open):
            rows = open_index[part]
            values, grad = listmle_value_and_grad(
                self.student_scores[rows], self.teacher_scores[rows], config.listmle_form
            )
            total = total + values.sum()
            if batch.need_grad:
                student.add_sparse_grad(rows, self.ids[rows], grad * scale)
            if self.logit_grad is not None:
                self.logit_grad[rows] = grad * scale
        return total / num_open / divisor

    def exact_grad(self, chunk, out: torch.Tensor) -> None:
        out.zero_()
        out.scatter_(1, self.ids[chunk.index], self.logit_grad[chunk.index])


class SequenceRankingTerm(Term):
    """L_seq: ListMLE of each prompt's responses, scored by their mean student log-likelihood,
    in the order of the teacher's sequence scores.

    It reaches the logits only through log q_t(y_t): the main pass stores those, the gradient
    w.r.t. them is taken on the [B] scores, and the correction pass adds coef_t * d log q_t(y_t)/dz."""

    name = "indirect_sequence"
    loss_key = "loss_indirect_sequence"
    weight_field = "sequence_weight"

    def __init__(self, batch) -> None:
        super().__init__(batch)
        self.student_logprob = batch.per_token()
        self.teacher_logprob = batch.per_token() if self.uses_teacher_rows(batch.teacher) and batch.dense else None

    @staticmethod
    def uses_teacher_rows(teacher) -> bool:
        return teacher.sequence_scores is None

    def chunk(self, chunk) -> None:
        sampled = self.batch.sampled_ids[chunk.index].unsqueeze(1)
        self.student_logprob[chunk.index] = chunk.logq.gather(1, sampled).squeeze(1)
        if self.teacher_logprob is not None:
            self.teacher_logprob[chunk.index] = chunk.logp.gather(1, sampled).squeeze(1)

    def finish(self, student) -> torch.Tensor:
        batch = self.batch
        lengths = batch.tokens.mask.sum(1)
        student_scores = batch.per_sequence_mean(self.student_logprob, lengths)
        if batch.teacher.sequence_scores is not None:
            teacher_scores = batch.teacher.sequence_scores.to(batch.dtype)
        else:
            teacher_scores = batch.per_sequence_mean(self.teacher_logprob, lengths)
        loss, score_grad, _ = sequence_listmle(
            student_scores, teacher_scores, lengths > 0, batch.group_size, batch.config.listmle_form
        )
        divisor = listmle_divisor(batch.config, batch.group_size)
        per_token_grad = score_grad / lengths.clamp_min(1).to(batch.dtype) / divisor
        self.correction = per_token_grad[batch.tokens.sequence] * (batch.config.sequence_weight / batch.tau)
        return loss / divisor

    def correct(self, chunk, rows: torch.Tensor) -> None:
        add_logprob_grad_(chunk.grad_to_add(), chunk.q, self.batch.sampled_ids[rows], self.correction[rows])

    def exact_grad(self, chunk, out: torch.Tensor) -> None:
        out.zero_()  # its whole gradient is the correction (the main pass gives none)
        add_logprob_grad_(out, chunk.q, self.batch.sampled_ids[chunk.index], self.correction[chunk.index])


# In the order their weighted values are summed into L (fixed: the total is bit-reproducible).
TERM_ORDER = (DirectTerm, EntropyTerm, TokenRankingTerm, SequenceRankingTerm)


def active_terms(config) -> list[type[Term]]:
    """The terms this config switches on (a weight of 0 or another indirect level switches one off)."""
    on = {
        DirectTerm: config.direct_on,
        EntropyTerm: config.entropy_on,
        TokenRankingTerm: config.token_level_on,
        SequenceRankingTerm: config.sequence_level_on,
    }
    return [term for term in TERM_ORDER if on[term]]
