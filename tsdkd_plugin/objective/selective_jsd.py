"""Direct distillation: generalized JSD weighted per token by the entropy gap.

    JSD_beta(p, q) = beta*KL(p||M) + (1-beta)*KL(q||M),  M = beta*p + (1-beta)*q
    w_t = sigmoid(H_S - H_T)   (soft, stop-gradient)   or   1[H_S - H_T > s]   (hard)

p is the teacher, q the student, both softmax(logits / tau) over the shared vocabulary.
TRL's endpoint convention is kept: beta = 0 is forward KL(p||q), beta = 1 is
reverse KL(q||p).

The kernels work on a chunk of rows [C, V] and return, besides the per-row
value, the exact gradient with respect to the student's tau-scaled logits
zs = z / tau, written into a caller-owned buffer. Writing the gradient by hand
(instead of keeping autograd's graph) is what keeps the chunk's work memory at a
few [C, V] buffers; tests compare it with float64 autograd.

For a per-row function J(q) of q = softmax(zs), with h_v = q_v * dJ/dq_v,
    dJ/dzs_v = h_v - q_v * sum_u h_u.
For the JSD, dJ/dq_v = (1-beta) * log(q_v / M_v) (the M-terms cancel), so
h = (1-beta) * q * (log q - log M) and sum_u h_u = (1-beta) * KL(q||M).

Written that way the gradient q_v * ((log q_v - log M_v) - KL(q||M)) subtracts two numbers
near -log(1-beta) wherever the teacher has little mass under the student's (then
M ~ (1-beta) q): their float32 rounding (~1e-7) swamps the true difference, up to 1e-3 of the
gradient's scale at V = 32k. With u_v = log(M_v / q_v) - log(1-beta)
= softplus(log p_v - log q_v + log(beta / (1-beta))), which is small exactly there and
computed without cancellation, and sum_v q_v = 1:
    dJSD/dzs_v = (1-beta) * q_v * (sum_u q_u u_u - u_v).
"""

from __future__ import annotations

import math

import torch

from .config import GATE_KINDS


def rowdot_(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum_v a[c, v] * b[c, v] for each row c; the products are written into `out` ([C, V], may be a or b).

    torch's sum reduces each row with cascade (multi-level) summation, so its float32 error stays
    near eps * log(V) and each row is reduced on its own. A batched BLAS dot (bmm of [C,1,V] x
    [C,V,1]) writes no products but accumulates 150k float32 terms far worse, and worse as C grows:
    at V = 151,936 it put the JSD's KL sums off by up to 1e-4 relative, which the JSD gradient
    q * ((log q - log M) - KL) turns into percent-level errors where q sits where p has no mass.
    """
    return torch.mul(a, b, out=out).sum(1)


def entropy_gate(student_entropy: torch.Tensor, teacher_entropy: torch.Tensor, kind: str, margin: float) -> torch.Tensor:
    """Per-token JSD weight from the uncertainty gap H_S - H_T (no gradient flows through it)."""
    gap = (student_entropy - teacher_entropy).detach()
    if kind == "soft":
        return torch.sigmoid(gap)
    if kind == "hard":
        return (gap > margin).to(gap.dtype)
    if kind == "none":
        return torch.ones_like(gap)
    raise ValueError(f"gate must be one of {GATE_KINDS}, got {kind!r}")


def gate_selected(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Which tokens count as 'selected' for logging: w > 0.5 (soft), w == 1 (hard), all (none)."""
    if kind == "soft":
        return weight > 0.5
    return weight == 1


def generalized_jsd_dense(
    logq: torch.Tensor,
    q: torch.Tensor,
    logp: torch.Tensor,
    p: torch.Tensor,
    beta: float,
    *,
    grad_out: torch.Tensor | None,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Generalized JSD per row between full distributions.

    logq, q: student log-probs and probs [C, V]; logp, p: teacher's. Returns the
    JSD per row [C]. If grad_out is given it receives dJSD/dzs [C, V]; scratch is
    a [C, V] work buffer (both are overwritten).
    """
    work = grad_out if grad_out is not None else torch.empty_like(logq)
    if beta == 0.0:  # forward KL(p || q); gradient q - p
        torch.sub(logp, logq, out=scratch)
        value = rowdot_(p, scratch, out=scratch)
        if grad_out is not None:
            torch.sub(q, p, out=grad_out)
        return value
    if beta == 1.0:  # reverse KL(q || p)
        torch.sub(logq, logp, out=work)
        value = rowdot_(q, work, out=work)  # work = h = q (log q - log p), sum h = KL(q||p)
        if grad_out is not None:
            grad_out.addcmul_(q, -value.unsqueeze(1))
        return value
    # log M in log space: finite even where both probabilities underflow to 0.
    log_mix = scratch
    torch.add(logq, math.log1p(-beta), out=log_mix)
    torch.add(logp, math.log(beta), out=work)
    torch.logaddexp(log_mix, work, out=log_mix)
    torch.sub(logp, log_mix, out=work)
    kl_teacher = rowdot_(p, work, out=work)
    torch.sub(logq, log_mix, out=work)
    kl_student = rowdot_(q, work, out=work)
    value = beta * kl_teacher + (1.0 - beta) * kl_student
    if grad_out is not None:  # (1-beta) q (sum q u - u), see the module docstring
        u = scratch
        torch.sub(logp, logq, out=u)
        u.add_(_log_odds(beta))
        torch.logaddexp(u, u.new_zeros(()), out=u)  # softplus, accurate for very negative arguments
        mean_u = rowdot_(q, u, out=grad_out)
        torch.sub((1.0 - beta) * mean_u.unsqueeze(1), u, alpha=1.0 - beta, out=grad_out)
        grad_out.mul_(q)
    return value


def _log_odds(beta: float) -> float:
    return math.log(beta) - math.log1p(-beta)


def log_tail_mass(logq: torch.Tensor, ids: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log of the student's probability outside `ids`, per row, computed exactly
    (log-sum-exp over the complement) instead of as 1 - sum(top), which cancels
    catastrophically when the top-K hold almost all the mass."""
    scratch.copy_(logq)
    scratch.scatter_(1, ids, float("-inf"))
    return torch.logsumexp(scratch, dim=1)


def _mass_times_log_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) with the convention 0 * log(0 / .) = 0 (xlogy-style)."""
    finite = torch.isfinite(log_a)
    safe_a = torch.where(finite, log_a, torch.zeros_like(log_a))
    safe_b = torch.where(finite, log_b, torch.zeros_like(log_b))
    return torch.where(finite, safe_a.exp() * (safe_a - safe_b), torch.zeros_like(log_a))


def generalized_jsd_partition(
    logq: torch.Tensor,
    q: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    beta: float,
    *,
    grad_out: torch.Tensor | None,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Generalized JSD per row on the K+1 partition {teacher top-K ids, everything else}.

    The teacher is known only through its top-K log-probs and the log of its
    remaining mass (the sparse transport); the student's side of the partition is
    its probability at those K ids plus its exact tail mass, so the JSD stays a
    proper divergence between two distributions over K+1 buckets. With K equal to
    the vocabulary the tail is empty and this equals generalized_jsd_dense.

    logq, q: student log-probs/probs [C, V]; teacher_ids [C, K] (int64, distinct per
    row); teacher_topk_logprobs [C, K]; teacher_tail_logprob [C] (-inf if empty).
    """
    student_top = logq.gather(1, teacher_ids)
    student_tail = log_tail_mass(logq, teacher_ids, scratch)
    log_q_part = torch.cat([student_top, student_tail.unsqueeze(1)], dim=1)
    log_p_part = torch.cat([teacher_topk_logprobs, teacher_tail_logprob.unsqueeze(1)], dim=1)
    tail_nonempty = torch.isfinite(student_tail)

    # h_c = qpart_c * dJ/dqpart_c per bucket; g_tail = dJ/dq_tail (what a token in the tail gets).
    if beta == 0.0:
        value = _mass_times_log_ratio(log_p_part, log_q_part).sum(1)
        h_part = -log_p_part.exp()
        ratio = torch.where(tail_nonempty, teacher_tail_logprob - student_tail, torch.zeros_like(student_tail))
        g_tail = torch.where(tail_nonempty, -ratio.exp(), torch.zeros_like(student_tail))
    elif beta == 1.0:
        h_part = _mass_times_log_ratio(log_q_part, log_p_part)
        value = h_part.sum(1)
        g_tail = torch.where(tail_nonempty, student_tail - teacher_tail_logprob, torch.zeros_like(student_tail))
    else:
        log_mix = torch.logaddexp(log_q_part + math.log1p(-beta), log_p_part + math.log(beta))
        kl_teacher = _mass_times_log_ratio(log_p_part, log_mix).sum(1)
        value = beta * kl_teacher + (1.0 - beta) * _mass_times_log_ratio(log_q_part, log_mix).sum(1)
        if grad_out is not None:  # (1-beta) (sum qpart u - u_c), cancellation-free (module docstring)
            occupied = torch.isfinite(log_q_part)  # an empty bucket (tail when K = V) has no tokens
            log_ratio = torch.where(occupied, log_p_part - log_q_part, torch.zeros_like(log_q_part))
            u = torch.where(occupied, torch.nn.functional.softplus(log_ratio + _log_odds(beta)), 0.0)
            grad_part = (1.0 - beta) * ((log_q_part.exp() * u).sum(1, keepdim=True) - u)
            top_grad = student_top.exp() * grad_part[:, :-1]
            _write_partition_grad(grad_out, q, teacher_ids, grad_part[:, -1], top_grad)
        return value
    if grad_out is not None:
        h_sum = h_part.sum(1, keepdim=True)
        # tail tokens v: q_v * (g_tail - sum h); top-K tokens: h_v - q_v * sum h.
        top_grad = h_part[:, :-1] - student_top.exp() * h_sum
        _write_partition_grad(grad_out, q, teacher_ids, g_tail - h_sum.squeeze(1), top_grad)
    return value


def _write_partition_grad(grad_out, q, teacher_ids, tail_factor, top_grad) -> None:
    """grad_out[v] = q_v * tail_factor for tail tokens v; top_grad at the top-K ids."""
    torch.mul(q, tail_factor.unsqueeze(1), out=grad_out)
    grad_out.scatter_(1, teacher_ids, top_grad)
