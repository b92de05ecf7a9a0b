"""The four loss terms, one unit each: what it does per chunk, after the main pass, its metrics.

The engine (engine.py) owns the chunk loop, the student's and teacher's rows of each chunk and
the correction pass; it knows no term by name. A term

- `chunk(chunk)`: reads the chunk's log-probs (and the teacher's), records what it needs later
  and, if it has a dense gradient, writes or adds it into the chunk's gradient buffer;
- `finish(student)`: once every token was seen (whole-batch selections), returns its loss value
  (unweighted) and may hand sparse gradients to the student source;
- `correction`: per-token coefficients of a gradient it could not give in the main pass, or
  None; `correct(chunk, rows)` adds that gradient for the rows the engine recomputed;
- `metrics()`: its logging values (0-dim tensors; keys in engine.METRIC_KEYS).

`uses_teacher_rows(teacher)` says whether it needs the dense teacher's log-probs in the chunks.
See engine.py for why some gradients come after the main pass.
"""

from __future__ import annotations

import torch

from .entropy import add_entropy_grad_, entropy_from_logprobs, entropy_selection, expected_selected_count
from .listmle import add_logprob_grad_, listmle_value_and_grad, sequence_listmle
from .selective_jsd import entropy_gate, gate_selected, generalized_jsd_dense, generalized_jsd_partition


class Term:
    """Defaults: no dense gradient, no teacher rows, nothing after the pass, no correction."""

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


class DirectTerm(Term):
    """L_dir = sum_t w_t JSD_beta(p_t, q_t) / N: the entropy-gated generalized JSD (selective_jsd.py).

    Dense teacher: JSD over the shared vocabulary; sparse: on the K+1 partition. Its gradient is
    known per token in the main pass (w_t is stop-gradient)."""

    loss_key = "loss_direct"
    weight_field = "direct_weight"
    dense_grad = True

    def __init__(self, batch) -> None:
        super().__init__(batch)
        config = batch.config
        self.jsd = batch.per_token()
        self.gate = batch.per_token()
        self.coef = config.direct_weight / batch.num / batch.tau

    @staticmethod
    def uses_teacher_rows(teacher) -> bool:
        return True

    def chunk(self, chunk) -> None:
        config, teacher, index = self.batch.config, self.batch.teacher, chunk.index
        grad = chunk.grad_to_write()
        if chunk.logp is not None:
            jsd = generalized_jsd_dense(
                chunk.logq, chunk.q, chunk.logp, chunk.p, config.beta, grad_out=grad, scratch=chunk.scratch
            )
        else:
            jsd = generalized_jsd_partition(
                chunk.logq, chunk.q, teacher.topk_ids[index], teacher.topk_logprobs[index],
                teacher.tail_logprob[index], config.beta, grad_out=grad, scratch=chunk.scratch,
            )  # fmt: skip
        self.jsd[index] = jsd
        weight = entropy_gate(chunk.entropy, chunk.teacher_entropy, config.gate, config.gate_margin)
        self.gate[index] = weight
        if grad is not None:
            grad.mul_((weight * self.coef).unsqueeze(1))

    def finish(self, student) -> torch.Tensor:
        return (self.gate * self.jsd).sum() / self.batch.num

    def metrics(self) -> dict[str, torch.Tensor]:
        selected = gate_selected(self.gate, self.batch.config.gate).to(self.batch.dtype)
        return {"jsd_mean": self.jsd.mean(), "gate_mean_weight": self.gate.mean(), "gate_selected_fraction": selected.mean()}


class EntropyTerm(Term):
    """L_ent = mean of H_S over the tokens at or above the (1 - f)-quantile of H_S (entropy.py).

    The selection needs every token's entropy. The main pass weights every token by the
    selected count the quantile will keep (known from the token count unless entropies tie);
    the tokens whose weight was wrong are recomputed in the correction pass."""

    loss_key = "loss_entropy"
    weight_field = "entropy_weight"
    dense_grad = True

    def __init__(self, batch) -> None:
        super().__init__(batch)
        config = batch.config
        self.guess = config.entropy_weight / expected_selected_count(batch.num, config.entropy_top_fraction) / batch.tau

    def chunk(self, chunk) -> None:
        grad = chunk.grad_to_add()
        if grad is not None:
            coef = torch.full((chunk.rows,), self.guess, dtype=self.batch.dtype, device=self.batch.device)
            add_entropy_grad_(grad, chunk.logq, chunk.q, chunk.entropy, coef, scratch=chunk.scratch)

    def finish(self, student) -> torch.Tensor:
        batch, config = self.batch, self.batch.config
        entropy = batch.student_entropy
        self.selected, self.threshold = entropy_selection(entropy, config.entropy_top_fraction)
        num_selected = int(self.selected.sum())
        true_coef = self.selected.to(batch.dtype) * (config.entropy_weight / num_selected / batch.tau)
        self.correction = true_coef - self.guess
        return (entropy * self.selected).sum() / num_selected

    def correct(self, chunk, rows: torch.Tensor) -> None:
        entropy = entropy_from_logprobs(chunk.logq, chunk.q, scratch=chunk.scratch)
        add_entropy_grad_(chunk.grad_to_add(), chunk.logq, chunk.q, entropy, self.correction[rows], scratch=chunk.scratch)

    def metrics(self) -> dict[str, torch.Tensor]:
        return {
            "entropy_selected_fraction": self.selected.to(self.batch.dtype).mean(),
            "entropy_threshold": self.threshold.to(self.batch.dtype),
        }


class TokenRankingTerm(Term):
    """L_ind: ListMLE of the student's top-k candidates in the teacher's order, at opener tokens.

    The main pass keeps each token's candidate ids and both models' scores ([N, k]); once the
    openers are known the gradient goes to the student as k logit entries per opener token."""

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
        scale = config.indirect_weight / num_open / batch.tau
        total = batch.zero
        for part in batch.chunks(num_open):
            rows = open_index[part]
            values, grad = listmle_value_and_grad(self.student_scores[rows], self.teacher_scores[rows], config.listmle_form)
            total = total + values.sum()
            if batch.need_grad:
                student.add_sparse_grad(rows, self.ids[rows], grad * scale)
        return total / num_open


class SequenceRankingTerm(Term):
    """L_seq: ListMLE of each prompt's responses, scored by their mean student log-likelihood,
    in the order of the teacher's sequence scores.

    It reaches the logits only through log q_t(y_t): the main pass stores those, the gradient
    w.r.t. them is taken on the [B] scores, and the correction pass adds coef_t * d log q_t(y_t)/dz."""

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
        per_token_grad = score_grad / lengths.clamp_min(1).to(batch.dtype)
        self.correction = per_token_grad[batch.tokens.sequence] * (batch.config.sequence_weight / batch.tau)
        return loss

    def correct(self, chunk, rows: torch.Tensor) -> None:
        add_logprob_grad_(chunk.grad_to_add(), chunk.q, self.batch.sampled_ids[rows], self.correction[rows])


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
