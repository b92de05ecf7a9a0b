"""Teacher transports (dense / sparse) and vocabulary alignment."""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.objective import (
    TeacherSignals,
    TSDKDConfig,
    generalized_jsd_dense,
    generalized_jsd_partition,
    teacher_signals_from_hidden,
    teacher_signals_from_logits,
    tsdkd_loss,
)


def run(student, teacher, batch, cfg, **kwargs):
    x = student.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(x, teacher, batch["mask"], cfg, shared_vocab_size=batch["shared"], **kwargs)
    loss.backward()
    return loss.detach(), metrics, x.grad


@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0])
def test_sparse_with_full_vocabulary_equals_dense(beta, make_batch, assert_close):
    batch = make_batch(4, 6, 24, 26, seed=1, shared=24)
    cfg = TSDKDConfig(beta=beta, num_candidates=4, sparse_top_k=24, indirect_level="both", chunk_size=5)
    logq = torch.log_softmax(batch["student"][..., :24], -1)
    candidates = torch.topk(logq, 4).indices  # fixed at experience time; on-policy = current top-k
    sparse = teacher_signals_from_logits(
        batch["teacher"], cfg, mask=batch["mask"], shared_vocab_size=24,
        candidate_ids=candidates, sampled_ids=batch["sampled"],
    )  # fmt: skip
    assert torch.isneginf(sparse.tail_logprob[batch["mask"].bool()]).all()  # K = V: empty tail
    kwargs = dict(sampled_ids=batch["sampled"], group_size=2)
    dense = run(batch["student"], TeacherSignals(logits=batch["teacher"]), batch, cfg, **kwargs)
    got = run(batch["student"], sparse, batch, cfg, **kwargs)
    assert_close(got[0], dense[0], rtol=1e-6, what="loss")  # sparse fields travel as float32
    assert_close(got[2], dense[2], rtol=1e-5, atol=1e-8, what="grad")
    for key in ("loss_direct", "loss_entropy", "loss_indirect_token", "loss_indirect_sequence", "gate_mean_weight"):
        assert got[1][key] == pytest.approx(dense[1][key], rel=1e-5, abs=1e-9), key


def test_partition_jsd_gradient_matches_autograd(assert_close):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 30, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(5, 30, generator=generator, dtype=torch.float64) * 2
    logp = torch.log_softmax(teacher, -1)
    top, ids = torch.topk(logp, 6)
    tail = torch.log1p(-top.exp().sum(-1))
    for beta in (0.0, 0.4, 1.0):
        z = student.clone().requires_grad_(True)
        logq = torch.log_softmax(z, -1)
        # autograd version on the K+1 partition, written directly
        q_top = logq.gather(1, ids).exp()
        q_part = torch.cat([q_top, (1 - q_top.sum(1, keepdim=True))], 1)
        p_part = torch.cat([top.exp(), tail.exp().unsqueeze(1)], 1)
        if beta == 0:
            expected = (p_part * (p_part.log() - q_part.log())).sum(1)
        elif beta == 1:
            expected = (q_part * (q_part.log() - p_part.log())).sum(1)
        else:
            mix = beta * p_part + (1 - beta) * q_part
            expected = beta * (p_part * (p_part / mix).log()).sum(1) + (1 - beta) * (q_part * (q_part / mix).log()).sum(1)
        expected.sum().backward()
        grad = torch.empty_like(student)
        with torch.no_grad():
            lq = torch.log_softmax(student, -1)
            value = generalized_jsd_partition(lq, lq.exp(), ids, top, tail, beta, grad_out=grad, scratch=torch.empty_like(lq))
        assert_close(value, expected.detach(), what=f"value beta={beta}")
        assert_close(grad, z.grad, rtol=1e-8, atol=1e-12, what=f"grad beta={beta}")


def test_dense_jsd_kernel_matches_autograd(assert_close):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 25, generator=generator, dtype=torch.float64)
    logp = torch.log_softmax(torch.randn(4, 25, generator=generator, dtype=torch.float64) * 3, -1)
    for beta in (0.0, 0.2, 0.9, 1.0):
        z = student.clone().requires_grad_(True)
        logq = torch.log_softmax(z, -1)
        q, p = logq.exp(), logp.exp()
        if beta == 0:
            expected = (p * (logp - logq)).sum(1)
        elif beta == 1:
            expected = (q * (logq - logp)).sum(1)
        else:
            mix = (beta * p + (1 - beta) * q).log()
            expected = beta * (p * (logp - mix)).sum(1) + (1 - beta) * (q * (logq - mix)).sum(1)
        expected.sum().backward()
        grad = torch.empty_like(student)
        with torch.no_grad():
            lq = torch.log_softmax(student, -1)
            value = generalized_jsd_dense(lq, lq.exp(), logp, logp.exp(), beta, grad_out=grad, scratch=torch.empty_like(lq))
        assert_close(value, expected.detach(), what="value")
        assert_close(grad, z.grad, what="grad")


def test_sparse_small_k_is_close_on_peaked_teachers(make_batch):
    batch = make_batch(2, 8, 200, seed=2, scale=6.0)  # peaked: logits std 6
    cfg = TSDKDConfig(num_candidates=4, sparse_top_k=16)
    sparse = teacher_signals_from_logits(
        batch["teacher"], cfg, mask=batch["mask"], shared_vocab_size=200,
        candidate_ids=torch.topk(batch["student"], 4).indices,
    )  # fmt: skip
    dense = run(batch["student"], TeacherSignals(logits=batch["teacher"]), batch, cfg)
    got = run(batch["student"], sparse, batch, cfg)
    assert abs(got[1]["loss_direct"] - dense[1]["loss_direct"]) < 0.05 * dense[1]["loss_direct"]
    # Entropy gate and ListMLE see the exact teacher entropy and candidate scores.
    assert got[1]["loss_indirect_token"] == pytest.approx(dense[1]["loss_indirect_token"], rel=1e-6)
    assert got[1]["gate_mean_weight"] == pytest.approx(dense[1]["gate_mean_weight"], rel=1e-6)


def test_teacher_signals_from_hidden_equals_from_logits(assert_close):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 8, generator=generator)
    weight = torch.randn(40, 8, generator=generator)
    mask = torch.ones(3, 5)
    mask[0, :2] = 0
    candidates = torch.randint(0, 37, (3, 5, 4), generator=generator)
    sampled = torch.randint(0, 37, (3, 5), generator=generator)
    cfg = TSDKDConfig(sparse_top_k=7, chunk_size=4, temperature=1.5)
    kwargs = dict(mask=mask, shared_vocab_size=37, candidate_ids=candidates, sampled_ids=sampled)
    a = teacher_signals_from_hidden(hidden, weight, cfg, **kwargs)
    b = teacher_signals_from_logits(hidden @ weight.t(), cfg, **kwargs)
    for name, tensor in a.tensors().items():
        other = getattr(b, name)
        if tensor.is_floating_point():
            finite = torch.isfinite(other)
            assert_close(tensor[finite], other[finite], rtol=1e-5, atol=1e-5, what=name)
        else:
            assert torch.equal(tensor, other), name
    assert a.topk_ids.dtype == torch.int32 and a.temperature == 1.5
    # Entropy is the teacher's full-distribution entropy at tau over the shared ids.
    logp = torch.log_softmax((hidden @ weight.t())[..., :37] / 1.5, -1)
    assert_close(a.entropy[mask.bool()], (-(logp.exp() * logp).sum(-1))[mask.bool()], rtol=1e-5, what="entropy")
    # bytes per token: K ids (int32) + K log-probs + entropy + tail + k ids + k log-probs (+ score per row)
    per_token = 7 * 8 + 4 + 4 + 4 * 8
    assert a.nbytes() == 15 * per_token + 3 * 4


def test_vocabulary_alignment_with_different_row_counts(make_batch, assert_close):
    # Student 29 logit rows, teacher 33, tokenizer 27 tokens: rows 27.. are padding, not tokens.
    batch = make_batch(3, 6, 29, 33, seed=4, shared=27)
    cfg = TSDKDConfig(num_candidates=3, indirect_level="both", chunk_size=4)
    kwargs = dict(sampled_ids=batch["sampled"], group_size=3)
    got = run(batch["student"], TeacherSignals(logits=batch["teacher"]), batch, cfg, **kwargs)
    # Same as if both models had exactly the 27 token rows.
    trimmed = run(batch["student"][..., :27], TeacherSignals(logits=batch["teacher"][..., :27]), batch, cfg, **kwargs)
    assert_close(got[0], trimmed[0], what="loss")
    assert_close(got[2][..., :27], trimmed[2], what="grad")
    assert got[2][..., 27:].abs().max() == 0
    # Padding rows with huge logits change nothing.
    student = batch["student"].clone()
    student[..., 27:] = 1e3
    teacher = batch["teacher"].clone()
    teacher[..., 27:] = -1e3
    padded = run(student, TeacherSignals(logits=teacher), batch, cfg, **kwargs)
    assert_close(padded[0], got[0], what="loss with padding rows")


@pytest.mark.parametrize("shared, message", [(30, "student"), (34, "student"), (0, ">= 1")])
def test_shared_vocab_size_must_fit_both_models(shared, message, make_batch):
    batch = make_batch(2, 4, 29, 33, seed=5, shared=27)
    with pytest.raises(ValueError, match=message):
        tsdkd_loss(batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], TSDKDConfig(num_candidates=3), shared_vocab_size=shared)


def test_shared_vocab_size_exceeding_teacher_rows(make_batch):
    batch = make_batch(2, 4, 35, 33, seed=5, shared=27)
    with pytest.raises(ValueError, match="teacher's 33 logit rows"):
        tsdkd_loss(batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], TSDKDConfig(num_candidates=3), shared_vocab_size=34)
    with pytest.raises(ValueError, match="teacher's 33 logit rows"):
        teacher_signals_from_logits(batch["teacher"], TSDKDConfig(), mask=batch["mask"], shared_vocab_size=34)


# ----------------------------------------------------------------------------- wire format


def sparse_signals(batch, cfg, *, scale=1.0):
    candidates = torch.topk(batch["student"][..., : batch["shared"]], cfg.num_candidates).indices
    return teacher_signals_from_logits(
        batch["teacher"] * scale, cfg, mask=batch["mask"], shared_vocab_size=batch["shared"],
        candidate_ids=candidates, sampled_ids=batch["sampled"],
    )  # fmt: skip


def test_wire_round_trip_dtypes_and_size(make_batch):
    batch = make_batch(3, 6, 40, seed=8)
    cfg = TSDKDConfig(num_candidates=5, sparse_top_k=9, indirect_level="both")
    signals = sparse_signals(batch, cfg)
    wire = signals.to_wire()
    assert set(wire) == set(signals.tensors())  # same field names: the replay buffer needs no change
    dtypes = {name: tensor.dtype for name, tensor in wire.items()}
    assert dtypes == {
        "topk_logprobs": torch.float16, "topk_ids": torch.int32, "tail_logprob": torch.float16,
        "entropy": torch.float32, "candidate_ids": torch.int32, "candidate_logprobs": torch.float16,
        "sequence_scores": torch.float32,
    }  # fmt: skip
    nbytes = sum(t.numel() * t.element_size() for t in wire.values())
    assert nbytes == 18 * (6 * 9 + 6 * 5 + 6) + 3 * 4  # 6K + 6k + 6 per token, 4 per response
    decoded = TeacherSignals.from_wire(wire, temperature=cfg.temperature)
    assert decoded.kind == "sparse" and decoded.temperature == cfg.temperature
    assert decoded.topk_logprobs.dtype == torch.float32 and torch.equal(decoded.topk_ids, signals.topk_ids)
    # The candidates arrive in the teacher's order, with their log-probs: the same set per token.
    order = torch.sort(signals.candidate_logprobs, dim=-1, descending=True, stable=True).indices
    assert torch.equal(decoded.candidate_ids, signals.candidate_ids.gather(-1, order))
    assert (decoded.candidate_logprobs.diff(dim=-1) <= 0).all()
    assert_rounded = lambda a, b: torch.allclose(a, b.float(), rtol=1e-3, atol=1e-3)  # noqa: E731
    assert assert_rounded(decoded.topk_logprobs, signals.topk_logprobs)
    assert assert_rounded(decoded.candidate_logprobs, signals.candidate_logprobs.gather(-1, order))
    assert torch.equal(decoded.entropy, signals.entropy) and torch.equal(decoded.sequence_scores, signals.sequence_scores)


def test_wire_keeps_the_loss_and_the_teachers_ranking(make_batch, assert_close):
    batch = make_batch(4, 6, 30, seed=9)
    cfg = TSDKDConfig(num_candidates=4, sparse_top_k=8, indirect_level="both", chunk_size=5)
    signals = sparse_signals(batch, cfg)
    # Candidates 0.0002 apart in log-prob: equal after float16 rounding, so only the order they are
    # sent in can keep the teacher's ranking (the loss sorts stably).
    base = -2.0 - 0.0002 * torch.arange(cfg.num_candidates, dtype=torch.float32).flip(0)  # ascending in position
    signals.candidate_logprobs = base.expand_as(signals.candidate_logprobs).clone()
    decoded = TeacherSignals.from_wire(signals.to_wire(), temperature=cfg.temperature)
    assert (decoded.candidate_logprobs == decoded.candidate_logprobs[..., :1]).all()  # all tied on the wire
    kwargs = dict(sampled_ids=batch["sampled"], group_size=2)
    exact = run(batch["student"], signals, batch, cfg, **kwargs)
    shipped = run(batch["student"], decoded, batch, cfg, **kwargs)
    assert shipped[1]["loss_indirect_token"] == pytest.approx(exact[1]["loss_indirect_token"], rel=1e-12)
    assert_close(shipped[0], exact[0], rtol=2e-3, what="loss")
    assert_close(shipped[2], exact[2], rtol=2e-3, atol=1e-6, what="grad")


def test_wire_keeps_an_empty_tail_and_saturates_tiny_logprobs(make_batch):
    batch = make_batch(2, 5, 12, seed=10)
    cfg = TSDKDConfig(num_candidates=3, sparse_top_k=12)
    full = sparse_signals(batch, cfg, scale=1e5)  # K = V: empty tail; log-probs far below float16's range
    wire = full.to_wire()
    valid = batch["mask"].bool()
    assert torch.isneginf(wire["tail_logprob"][valid]).all()
    assert torch.isfinite(wire["topk_logprobs"][valid]).all()
    assert float(wire["topk_logprobs"][valid].min()) == float(torch.finfo(torch.float16).min)
    loss, _ = tsdkd_loss(
        batch["student"], TeacherSignals.from_wire(wire, 1.0), batch["mask"], cfg, shared_vocab_size=12
    )
    assert torch.isfinite(loss)


def test_wire_errors(make_batch):
    batch = make_batch(2, 4, 10, seed=11)
    with pytest.raises(ValueError, match="only the sparse transport is shipped"):
        TeacherSignals(logits=batch["teacher"]).to_wire()
    wire = sparse_signals(batch, TSDKDConfig(num_candidates=2, sparse_top_k=3)).to_wire()
    with pytest.raises(ValueError, match=r"unknown fields \['group_ids'\]"):
        TeacherSignals.from_wire({**wire, "group_ids": torch.zeros(2)}, temperature=1.0)
