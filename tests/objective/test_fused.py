"""Chunked / fused computation equals the plain one; gradcheck; edge cases stay finite."""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.objective import (
    TeacherSignals,
    TSDKDConfig,
    teacher_signals_from_logits,
    tsdkd_loss,
    tsdkd_loss_fused,
)


def hidden_batch(batch, seqlen, hidden, student_rows, teacher_rows, *, seed, dtype=torch.float64, shared=None):
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(batch, seqlen, hidden, generator=generator, dtype=torch.float64)
    w_s = torch.randn(student_rows, hidden, generator=generator, dtype=torch.float64) * 0.7
    h_t = torch.randn(batch, seqlen, hidden, generator=generator, dtype=torch.float64)
    w_t = torch.randn(teacher_rows, hidden, generator=generator, dtype=torch.float64) * 0.7
    h_t = 0.5 * h_t + h_s  # correlated teacher, as after distillation starts
    mask = torch.zeros(batch, seqlen)
    for b in range(batch):
        start = b % 3
        mask[b, start : seqlen - (b % 2)] = 1
    sampled = torch.randint(0, shared or min(student_rows, teacher_rows), (batch, seqlen), generator=generator)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(h_s), cast(w_s), cast(h_t), cast(w_t), mask, sampled


def plain_reference(h_s, w_s, teacher, mask, cfg, **kwargs):
    """tsdkd_loss on logits made by autograd from (hidden, weight): gradients via the chain rule."""
    h = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(h @ w.t(), teacher, mask, cfg, **kwargs)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


def fused(h_s, w_s, teacher, mask, cfg, **kwargs):
    h = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss_fused(h, w, teacher, mask, cfg, **kwargs)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


CONFIGS = [
    dict(),
    dict(indirect_level="both", sequence_weight=0.5, gate="hard", beta=0.3, temperature=1.3),
    dict(indirect_level="sequence", entropy_top_fraction=0.25, opener_fraction=0.6, beta=1.0),
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "sparse"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_fused_equals_plain(overrides, teacher_kind, chunk_size, assert_close):
    shared = 27
    h_s, w_s, h_t, w_t, mask, sampled = hidden_batch(4, 7, 6, 29, 33, seed=chunk_size, shared=shared)
    cfg = TSDKDConfig(num_candidates=4, chunk_size=chunk_size, sparse_top_k=8, **overrides)
    teacher_logits = h_t @ w_t.t()
    if teacher_kind == "logits":
        teacher = TeacherSignals(logits=teacher_logits)
    elif teacher_kind == "hidden":
        teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
    else:
        student_logits = (h_s @ w_s.t())[..., :shared]
        candidates = torch.topk(torch.log_softmax(student_logits / cfg.temperature, -1), 4).indices
        teacher = teacher_signals_from_logits(
            teacher_logits, cfg, mask=mask, shared_vocab_size=shared, candidate_ids=candidates, sampled_ids=sampled
        )
    kwargs = dict(shared_vocab_size=shared, sampled_ids=sampled, group_size=2)
    expected = plain_reference(h_s, w_s, teacher, mask, TSDKDConfig(**{**cfg.to_dict(), "chunk_size": 1000}), **kwargs)
    got = fused(h_s, w_s, teacher, mask, cfg, **kwargs)
    assert_close(got[0], expected[0], what="loss")
    assert_close(got[2], expected[2], what="grad hidden")
    assert_close(got[3], expected[3], what="grad weight")
    assert got[3][shared:].abs().max() == 0  # padding rows of the lm_head get no gradient
    for key, value in expected[1].items():
        if key != "correction_token_fraction":
            assert got[1][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_plain_chunking_does_not_change_anything(make_batch, assert_close):
    batch = make_batch(3, 9, 25, seed=7)
    results = []
    for chunk_size in (1, 2, 7, 100):
        cfg = TSDKDConfig(num_candidates=3, chunk_size=chunk_size, indirect_level="both")
        student = batch["student"].clone().requires_grad_(True)
        loss, _ = tsdkd_loss(
            student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg,
            shared_vocab_size=25, sampled_ids=batch["sampled"], group_size=3,
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), student.grad))
    for loss, grad in results[1:]:
        assert_close(loss, results[0][0], what="loss")
        assert_close(grad, results[0][1], what="grad")


def test_entropy_ties_take_the_full_correction_path(reference, assert_close):
    # Every response token has the same distribution, so all entropies tie and the quantile
    # keeps all of them, not the 90% the single-pass guess assumed.
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(19, generator=generator, dtype=torch.float64)
    student = row.expand(2, 6, 19).clone()
    teacher = torch.randn(2, 6, 19, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 6)
    cfg = TSDKDConfig(num_candidates=3, chunk_size=4)
    s = student.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(s, TeacherSignals(logits=teacher), mask, cfg, shared_vocab_size=19)
    loss.backward()
    assert metrics["entropy_selected_fraction"] == 1.0
    assert metrics["correction_token_fraction"] == 1.0
    naive = student.clone().requires_grad_(True)
    expected = reference.loss(naive, teacher, mask, cfg, shared=19)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), what="loss")
    assert_close(s.grad, naive.grad, what="grad")


def test_gradcheck_plain_and_fused():
    h_s, w_s, h_t, w_t, mask, sampled = hidden_batch(2, 4, 3, 11, 12, seed=1, shared=10)
    # The soft gate is stop-gradient by design, so finite differences would see it move;
    # the hard gate (like the selections) is locally constant.
    cfg = TSDKDConfig(
        num_candidates=3, chunk_size=3, indirect_level="both", entropy_top_fraction=0.6, gate="hard", beta=0.7
    )
    teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
    kwargs = dict(shared_vocab_size=10, sampled_ids=sampled, group_size=2)

    def plain(logits):
        return tsdkd_loss(logits, teacher, mask, cfg, **kwargs)[0]

    def fused_fn(hidden, weight):
        # gradcheck backpropagates the same graph several times: an upstream gradient != 1
        # keeps the copying path (see test_fused_backward_twice).
        return tsdkd_loss_fused(hidden, weight, teacher, mask, cfg, **kwargs)[0] * 2.0

    logits = (h_s @ w_s.t()).requires_grad_(True)
    assert torch.autograd.gradcheck(plain, (logits,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        fused_fn, (h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("path", ["plain", "fused", "sparse"])
def test_all_masked_batch_gives_zero_and_finite_gradients(path):
    h_s, w_s, h_t, w_t, _, sampled = hidden_batch(2, 5, 4, 13, 13, seed=3)
    mask = torch.zeros(2, 5)
    cfg = TSDKDConfig(num_candidates=3, indirect_level="both", sparse_top_k=5)
    kwargs = dict(shared_vocab_size=13, sampled_ids=sampled, group_size=2)
    h = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    if path == "plain":
        loss, metrics = tsdkd_loss(h @ w.t(), TeacherSignals(logits=h_t @ w_t.t()), mask, cfg, **kwargs)
    else:
        teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
        if path == "sparse":
            teacher = teacher_signals_from_logits(
                h_t @ w_t.t(), cfg, mask=mask, shared_vocab_size=13,
                candidate_ids=torch.zeros(2, 5, 3, dtype=torch.long), sampled_ids=sampled,
            )  # fmt: skip
        loss, metrics = tsdkd_loss_fused(h, w, teacher, mask, cfg, **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and metrics["num_tokens"] == 0.0
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_bf16_and_extreme_logits_stay_finite(path):
    generator = torch.Generator().manual_seed(0)
    vocab = 37
    cfg = TSDKDConfig(num_candidates=4, indirect_level="both", chunk_size=3)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    sampled = torch.randint(0, vocab, (2, 6), generator=generator)
    kwargs = dict(shared_vocab_size=vocab, sampled_ids=sampled, group_size=2)
    for beta in (0.0, 0.9, 1.0):
        cfg_beta = TSDKDConfig(**{**cfg.to_dict(), "beta": beta})
        # +-1e4 logits: one-hot-like student and teacher that disagree; bf16 storage.
        sign = torch.where(torch.rand(2, 6, vocab, generator=generator) > 0.5, 1.0, -1.0)
        student = (sign * 1e4).to(torch.bfloat16)
        teacher = (-sign * 1e4).to(torch.bfloat16)
        if path == "plain":
            x = student.clone().requires_grad_(True)
            loss, metrics = tsdkd_loss(x, TeacherSignals(logits=teacher), mask, cfg_beta, **kwargs)
            loss.backward()
            grads = [x.grad]
        else:
            hidden = (torch.randn(2, 6, 8, generator=generator) * 300).to(torch.bfloat16).requires_grad_(True)
            weight = (torch.randn(vocab, 8, generator=generator) * 30).to(torch.bfloat16).requires_grad_(True)
            teacher_h = TeacherSignals(hidden=hidden.detach().flip(0), lm_head_weight=weight.detach().flip(0))
            loss, metrics = tsdkd_loss_fused(hidden, weight, teacher_h, mask, cfg_beta, **kwargs)
            loss.backward()
            grads = [hidden.grad, weight.grad]
            assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
        assert torch.isfinite(loss), (path, beta)
        assert all(torch.isfinite(g.float()).all() for g in grads), (path, beta)
        assert all(v == v for v in metrics.values())  # no NaN metric


def test_bf16_fused_close_to_float32(assert_close):
    h_s, w_s, h_t, w_t, mask, sampled = hidden_batch(2, 6, 16, 40, 40, seed=9, dtype=torch.float32)
    cfg = TSDKDConfig(num_candidates=4, chunk_size=4)
    teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
    expected = fused(h_s, w_s, teacher, mask, cfg, shared_vocab_size=40)
    got = fused(h_s.bfloat16(), w_s.bfloat16(), teacher, mask, cfg, shared_vocab_size=40)
    assert got[0].dtype == torch.float32  # the loss itself is always float32 or float64
    assert abs(float(got[0]) - float(expected[0])) < 0.05 * abs(float(expected[0]))


def test_no_gradient_requested_still_gives_the_value(make_batch):
    batch = make_batch(2, 5, 15, seed=1)
    cfg = TSDKDConfig(num_candidates=3)
    teacher = TeacherSignals(logits=batch["teacher"])
    loss, _ = tsdkd_loss(batch["student"], teacher, batch["mask"], cfg, shared_vocab_size=15)
    with_grad, _ = tsdkd_loss(
        batch["student"].clone().requires_grad_(True), teacher, batch["mask"], cfg, shared_vocab_size=15
    )
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(with_grad), rel=1e-12)


def test_backward_scales_with_upstream_gradient(make_batch, assert_close):
    batch = make_batch(2, 5, 15, seed=2)
    cfg = TSDKDConfig(num_candidates=3)
    grads = []
    for scale in (1.0, -2.5):
        student = batch["student"].clone().requires_grad_(True)
        loss, _ = tsdkd_loss(student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=15)
        (loss * scale).backward()
        grads.append(student.grad)
    assert_close(grads[1], -2.5 * grads[0], what="scaled grad")


def test_fused_backward_twice():
    h_s, w_s, h_t, w_t, mask, _ = hidden_batch(2, 4, 3, 11, 11, seed=2)
    cfg = TSDKDConfig(num_candidates=3)
    teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
    h, w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, _ = tsdkd_loss_fused(h, w, teacher, mask, cfg, shared_vocab_size=11)
    (loss * 3.0).backward(retain_graph=True)  # copying path: the graph stays usable
    first = w.grad.clone()
    loss.backward(retain_graph=True)  # upstream gradient 1: the buffer is handed over
    assert torch.allclose(w.grad, first * (4.0 / 3.0))
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()


def test_fused_jsd_only_equals_liger_chunked_jsd(assert_close):
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    h_s, w_s, h_t, w_t, _, _ = hidden_batch(1, 24, 8, 50, 50, seed=6)
    mask = torch.ones(1, 24)
    cfg = TSDKDConfig(gate="none", beta=0.7, temperature=1.5, entropy_weight=0.0, indirect_weight=0.0, chunk_size=5)
    ours = fused(h_s, w_s, TeacherSignals(hidden=h_t, lm_head_weight=w_t), mask, cfg, shared_vocab_size=50)
    liger = chunked_loss.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.7, temperature=1.5, compiled=False, chunk_size=8
    )
    h, w = h_s[0].clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    theirs = liger(h, w, h_t[0], w_t, torch.zeros(24, dtype=torch.long))
    theirs.backward()
    # Liger accumulates its loss in float32 whatever the input dtype.
    assert_close(ours[0], theirs.detach(), rtol=1e-6, what="loss")
    assert_close(ours[2][0], h.grad, rtol=1e-6, atol=1e-9, what="grad hidden")
    assert_close(ours[3], w.grad, rtol=1e-6, atol=1e-9, what="grad weight")
