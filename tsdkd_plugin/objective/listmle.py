"""Indirect distillation: the teacher re-ranks what the student proposed (ListMLE).

Plackett-Luce negative log-likelihood of student scores s in the teacher's order pi:

    suffix (correct):  L = -sum_i [ s_pi(i) - log sum_{j >= i} exp s_pi(j) ]
    prefix (reference code's bug, ablation only):
                       L = -sum_i [ s_pi(i) - log sum_{j <= i} exp s_pi(j) ]

The prefix form is lowest when the student's order is the *reverse* of the
teacher's, so it trains the wrong way (tests/objective show it).

Token level: at each opener position the k candidates are the student's top-k
tokens, s their student log-probs (at tau) and pi their order under the teacher's
logits. The opener is computed per sequence (the reference code used one length
for the whole micro-batch).

Sequence level: n responses per prompt (consecutive rows), s the student's
length-normalized log-likelihoods, pi the order of the teacher's sequence scores.

Everything here acts on small tensors ([tokens, k] or [batch]); gradients come
from autograd on those.
"""

from __future__ import annotations

import math

import torch

from .config import LISTMLE_FORMS


def listmle(scores_in_order: torch.Tensor, form: str = "suffix", valid: torch.Tensor | None = None) -> torch.Tensor:
    """ListMLE over the last dimension; items must already be in the teacher's order.

    valid: optional bool mask of the same shape; invalid items must come last in
    the order and are left out of every term (used for groups with empty responses).
    """
    if form not in LISTMLE_FORMS:
        raise ValueError(f"listmle_form must be one of {LISTMLE_FORMS}, got {form!r}")
    scores = scores_in_order
    if valid is not None:
        # A very negative finite score drops an item from every log-sum-exp without the
        # -inf - (-inf) = NaN that -inf would give in the backward pass.
        scores = torch.where(valid, scores, torch.full_like(scores, torch.finfo(scores.dtype).min / 4))
    if form == "suffix":
        normalizer = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    else:
        normalizer = torch.logcumsumexp(scores, dim=-1)
    terms = scores - normalizer
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))
    return -terms.sum(-1)


def listmle_normalizer(num_items: int) -> float:
    """log(n!): the (suffix) ListMLE of n items whose scores are all equal, i.e. its value when the
    scores carry no knowledge of the order; 1 where that is 0 (n <= 1). TSDKDConfig.listmle_normalize
    divides the ListMLE terms by it."""
    value = math.lgamma(num_items + 1)
    return value if value > 0 else 1.0


def teacher_order(teacher_scores: torch.Tensor) -> torch.Tensor:
    """Permutation sorting items by descending teacher score (stable: ties keep the student's order)."""
    return torch.sort(teacher_scores, dim=-1, descending=True, stable=True).indices


def listmle_value_and_grad(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    form: str,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ListMLE of student_scores [..., n] in the order of teacher_scores [..., n].

    Returns (loss [...], d loss / d student_scores [..., n] in the input positions).
    Invalid items (valid == False) are ranked last and left out.
    """
    if valid is not None:
        teacher_scores = torch.where(valid, teacher_scores, torch.full_like(teacher_scores, float("-inf")))
    order = teacher_order(teacher_scores)
    with torch.enable_grad():
        scores = student_scores.detach().requires_grad_(True)
        ordered = scores.gather(-1, order)
        loss = listmle(ordered, form, None if valid is None else valid.gather(-1, order))
        (grad,) = torch.autograd.grad(loss.sum(), scores)
    return loss.detach(), grad


def opener_mask(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Opener positions per sequence.

    entropy, mask: [B, T]. With e_t = H_t / sum H over the sequence's valid tokens
    and d the smallest j with sum_{t<=j} e_t >= fraction, the opener is the valid
    positions 1..d. Equivalently a valid token is in the opener when the entropy
    strictly before it is < fraction * total; the first valid token always is
    (so a sequence with zero total entropy has d = 1). Cumulative sums in float64.
    """
    valid = mask.bool()
    ent = torch.where(valid, entropy.detach().double(), torch.zeros((), dtype=torch.float64, device=entropy.device))
    cumulative = ent.cumsum(1)
    total = cumulative[:, -1:]
    # Entropy strictly before t, as the cumulative sum at t - 1 itself (not cumsum - H_t,
    # which rounds differently), so "t <= d" matches the definition exactly.
    before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    first = valid & (valid.long().cumsum(1) == 1)
    return valid & ((before < fraction * total) | first)


def sequence_listmle(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    nonempty: torch.Tensor,
    group_size: int,
    form: str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean ListMLE over groups of `group_size` consecutive responses.

    student_scores, teacher_scores: [B] sequence scores; nonempty: [B] bool (a
    response without completion tokens cannot be ranked and is left out). Groups
    with fewer than two rankable responses contribute nothing. Returns
    (mean loss 0-dim, d mean loss / d student_scores [B], number of groups used).
    """
    shape = (-1, group_size)
    valid = nonempty.view(shape)
    per_group, grad = listmle_value_and_grad(student_scores.view(shape), teacher_scores.view(shape), form, valid)
    used = valid.sum(1) >= 2
    num_used = int(used.sum())
    if num_used == 0:
        return student_scores.new_zeros(()), torch.zeros_like(student_scores), 0
    used_f = used.to(student_scores.dtype)
    loss = (per_group * used_f).sum() / num_used
    grad = grad * (used_f / num_used).unsqueeze(1)
    return loss, grad.reshape(-1), num_used


def add_logprob_grad_(grad: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, coef: torch.Tensor) -> None:
    """grad += coef[:, None] * d log q(ids) / dzs = coef * (onehot(ids) - q).

    The sequence-level ListMLE reaches the logits only through per-token
    log-probs of the sampled tokens, so its exact gradient is this term with
    coef_t = d L_seq / d log q_t(y_t), computed on a [B] tensor beforehand.
    """
    grad.addcmul_(q, (-coef).unsqueeze(1))
    grad.scatter_add_(1, ids.unsqueeze(1), coef.unsqueeze(1))
