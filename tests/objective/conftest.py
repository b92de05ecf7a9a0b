"""Shared helpers for the objective tests, exposed as fixtures.

`reference` is an independent, deliberately naive float64 implementation of the
TSD-KD objective written from the formulas in docs/objective.md: full logits,
plain autograd, Python loops over sequences, positions and list items. It shares
no code with tsdkd_plugin.objective.
"""

from __future__ import annotations

import math

import pytest
import torch


class NaiveReference:
    @staticmethod
    def distributions(logits, shared, tau):
        z = logits[..., :shared].double() / tau
        logprob = torch.log_softmax(z, dim=-1)
        return logprob, logprob.exp()

    @staticmethod
    def entropy(logprob, prob):
        return -(prob * logprob).sum(-1)

    @staticmethod
    def jsd(logp, p, logq, q, beta):
        """TRL convention: beta=0 forward KL(p||q), beta=1 reverse KL(q||p)."""
        if beta == 0:
            return (p * (logp - logq)).sum(-1)
        if beta == 1:
            return (q * (logq - logp)).sum(-1)
        mix = beta * p + (1 - beta) * q
        return beta * (p * (logp - mix.log())).sum(-1) + (1 - beta) * (q * (logq - mix.log())).sum(-1)

    @staticmethod
    def gate(h_s, h_t, kind, margin):
        gap = (h_s - h_t).detach()
        if kind == "soft":
            return torch.sigmoid(gap)
        if kind == "hard":
            return (gap > margin).double()
        return torch.ones_like(gap)

    @staticmethod
    def plackett_luce(scores, form):
        """-sum_i [s_i - logsumexp(s_{i..n})] (suffix) or logsumexp(s_{1..i}) (prefix), one list."""
        total = 0.0
        n = scores.shape[0]
        for i in range(n):
            group = scores[i:] if form == "suffix" else scores[: i + 1]
            total = total - (scores[i] - torch.logsumexp(group, 0))
        return total

    @staticmethod
    def opener_lengths(entropy_rows, fraction):
        """d per sequence: smallest j with sum_{t<=j} H_t >= fraction * sum H (entropy_rows: list of 1-D)."""
        lengths = []
        for row in entropy_rows:
            total = float(row.sum())
            running = 0.0
            for j, value in enumerate(row.tolist(), start=1):
                running += value
                if running >= fraction * total:
                    lengths.append(j)
                    break
        return lengths

    @classmethod
    def loss(
        cls,
        student_logits,
        teacher_logits,
        mask,
        cfg,
        *,
        shared,
        sampled_ids=None,
        group_size=None,
        teacher_sequence_scores=None,
        candidate_ids=None,
        return_terms=False,
    ):
        tau = cfg.temperature
        logq, q = cls.distributions(student_logits, shared, tau)
        logp, p = cls.distributions(teacher_logits, shared, tau)
        h_s, h_t = cls.entropy(logq, q), cls.entropy(logp, p)
        valid = mask.bool()
        n = int(valid.sum())
        zero = student_logits.sum() * 0.0
        terms = {"direct": zero, "entropy": zero, "token": zero, "sequence": zero}
        if n == 0:
            return (zero, terms) if return_terms else zero
        jsd = cls.jsd(logp, p, logq, q, cfg.beta)
        w = cls.gate(h_s, h_t, cfg.gate, cfg.gate_margin)
        responses = [b for b in range(mask.shape[0]) if valid[b].any()]
        if cfg.direct_reduction == "response":  # each response's token mean, then the mean over responses
            terms["direct"] = torch.stack([(w * jsd)[b][valid[b]].mean() for b in responses]).mean()
        else:
            terms["direct"] = (w * jsd)[valid].sum() / n

        def top_entropy_mean(h_valid):
            threshold = torch.quantile(h_valid.detach(), 1.0 - cfg.entropy_top_fraction)
            return h_valid[h_valid.detach() >= threshold].mean()

        if cfg.entropy_reduction == "response":  # the top fraction of each response
            terms["entropy"] = torch.stack([top_entropy_mean(h_s[b][valid[b]]) for b in responses]).mean()
        else:
            terms["entropy"] = top_entropy_mean(h_s[valid])

        rows = range(mask.shape[0])
        opener_losses = []
        for b in rows:
            positions = valid[b].nonzero().squeeze(1).tolist()
            if not positions:
                continue
            d = cls.opener_lengths([h_s[b, positions].detach()], cfg.opener_fraction)[0]
            for t in positions[:d]:
                if candidate_ids is not None:
                    cands = candidate_ids[b, t].long()
                else:
                    cands = torch.topk(logq[b, t].detach(), cfg.num_candidates).indices
                teacher_scores = logp[b, t, cands].tolist()
                order = sorted(range(len(cands)), key=lambda i: -teacher_scores[i])
                scores = logq[b, t, cands[order]]
                opener_losses.append(cls.plackett_luce(scores, cfg.listmle_form))
        terms["token"] = torch.stack(opener_losses).mean()

        if cfg.indirect_level in ("sequence", "both"):
            group_losses = []
            for g in range(mask.shape[0] // group_size):
                members = []
                for b in range(g * group_size, (g + 1) * group_size):
                    positions = valid[b].nonzero().squeeze(1)
                    if positions.numel() == 0:
                        continue
                    ids = sampled_ids[b, positions]
                    student_score = logq[b, positions, ids].mean()
                    if teacher_sequence_scores is not None:
                        teacher_score = float(teacher_sequence_scores[b])
                    else:
                        teacher_score = float(logp[b, positions, ids].mean())
                    members.append((teacher_score, student_score))
                if len(members) < 2:
                    continue
                members.sort(key=lambda m: -m[0])
                group_losses.append(cls.plackett_luce(torch.stack([m[1] for m in members]), cfg.listmle_form))
            terms["sequence"] = torch.stack(group_losses).mean() if group_losses else zero

        total = cfg.direct_weight * terms["direct"] + cfg.entropy_weight * terms["entropy"]
        if cfg.indirect_level in ("token", "both"):
            total = total + cfg.indirect_weight * terms["token"]
        if cfg.indirect_level in ("sequence", "both"):
            total = total + cfg.sequence_weight * terms["sequence"]
        return (total, terms) if return_terms else total


@pytest.fixture
def reference():
    return NaiveReference


def _random_mask(batch, seqlen, generator, *, min_len=1):
    """Right-padded response masks with random lengths (>= min_len), plus a random prompt prefix."""
    mask = torch.zeros(batch, seqlen)
    for b in range(batch):
        start = int(torch.randint(0, 3, (1,), generator=generator))
        length = int(torch.randint(min_len, seqlen - start + 1, (1,), generator=generator))
        mask[b, start : start + length] = 1
    return mask


@pytest.fixture
def make_batch():
    """make_batch(B, T, Vs, Vt, seed, dtype, scale) -> dict of student/teacher logits, mask, sampled ids."""

    def build(batch, seqlen, student_rows, teacher_rows=None, *, seed=0, dtype=torch.float64, scale=2.0, shared=None):
        teacher_rows = teacher_rows or student_rows
        shared = shared or min(student_rows, teacher_rows)
        generator = torch.Generator().manual_seed(seed)
        teacher = torch.randn(batch, seqlen, teacher_rows, generator=generator, dtype=torch.float64) * scale
        noise = torch.randn(batch, seqlen, student_rows, generator=generator, dtype=torch.float64)
        student = noise * scale
        overlap = min(student_rows, teacher_rows)
        student[..., :overlap] = 0.6 * teacher[..., :overlap] + 0.8 * student[..., :overlap]
        mask = _random_mask(batch, seqlen, generator)
        sampled = torch.randint(0, shared, (batch, seqlen), generator=generator)
        return {
            "student": student.to(dtype),
            "teacher": teacher.to(dtype),
            "mask": mask,
            "sampled": sampled,
            "shared": shared,
        }

    return build


@pytest.fixture
def assert_close():
    def check(actual, expected, *, rtol=1e-9, atol=1e-10, what=""):
        actual = torch.as_tensor(actual, dtype=torch.float64)
        expected = torch.as_tensor(expected, dtype=torch.float64)
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        bound = atol + rtol * expected.abs().max().item() if expected.numel() else atol
        assert err <= bound and math.isfinite(err), f"{what}: max abs err {err:.3e} > {bound:.3e}"

    return check


@pytest.fixture
def plain_loss():
    """plain_loss(batch, cfg, group_size=None) -> (loss, metrics, gradient w.r.t. the student's logits)
    of tsdkd_loss on a make_batch batch with its dense teacher logits (the code under test)."""
    from tsdkd_plugin.objective import TeacherSignals, tsdkd_loss

    def run(batch, cfg, *, group_size=None):
        student = batch["student"].clone().requires_grad_(True)
        loss, metrics = tsdkd_loss(
            student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg,
            shared_vocab_size=batch["shared"], sampled_ids=batch["sampled"], group_size=group_size,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), metrics, student.grad

    return run


@pytest.fixture
def sparse_vs_dense():
    """sparse_vs_dense(batch, cfg) -> (metrics with the dense teacher logits, metrics with the sparse
    signals built from them at K = cfg.sparse_top_k and the student's top-k candidates) of tsdkd_loss
    on a make_batch batch (group size 2); with K = the vocabulary both describe the same teacher."""
    from tsdkd_plugin.objective import TeacherSignals, teacher_signals_from_logits, tsdkd_loss

    def run(batch, cfg):
        shared = batch["shared"]
        candidates = torch.topk(torch.log_softmax(batch["student"][..., :shared], -1), cfg.num_candidates).indices
        sparse = teacher_signals_from_logits(
            batch["teacher"], cfg, mask=batch["mask"], shared_vocab_size=shared, candidate_ids=candidates,
            sampled_ids=batch["sampled"],
        )  # fmt: skip
        kwargs = dict(shared_vocab_size=shared, sampled_ids=batch["sampled"], group_size=2)
        _, dense = tsdkd_loss(batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, **kwargs)
        _, got = tsdkd_loss(batch["student"], sparse, batch["mask"], cfg, **kwargs)
        return dense, got

    return run
