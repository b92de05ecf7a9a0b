"""The student's output head in the fused path: logits = softcap(scale * hidden @ W.T).

Gemma-2 caps its final logits at 30 (`final_logit_softcapping`); other families scale them.
`tsdkd_loss_fused(student_head=...)` must give the loss and gradients of the naive float64
objective on logits made through the same head by autograd -- including the ListMLE's
candidate gradient, which reaches the hidden states and weight through k rows of W only.
"""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.objective import (
    IDENTITY_HEAD,
    OutputHead,
    TeacherSignals,
    TSDKDConfig,
    teacher_signals_from_logits,
    tsdkd_loss,
    tsdkd_loss_fused,
)

HEADS = {
    "identity": IDENTITY_HEAD,
    "scale": OutputHead(scale=0.6),
    "gemma2 softcap 30": OutputHead(softcap=30.0),
    "softcap 2 (bites)": OutputHead(softcap=2.0),
    "scale + softcap 1.5": OutputHead(scale=1.7, softcap=1.5),
}


def naive_head(raw: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """The head written with autograd ops, independently of OutputHead.apply_."""
    logits = raw * head.scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


def batch(seed: int, logit_scale: float):
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64) * logit_scale
    w_s = torch.randn(31, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(4, 6, 33, generator=generator, dtype=torch.float64) * 3
    mask = torch.ones(4, 6)
    mask[0, :2] = 0
    mask[3, 4:] = 0
    sampled = torch.randint(0, 29, (4, 6), generator=generator)
    return h_s, w_s, teacher, mask, sampled


@pytest.mark.parametrize("head_name", list(HEADS))
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_fused_head_matches_naive_autograd(head_name, chunk_size, reference, assert_close):
    head = HEADS[head_name]
    h_s, w_s, teacher_logits, mask, sampled = batch(seed=chunk_size, logit_scale=2.0)
    cfg = TSDKDConfig(num_candidates=4, chunk_size=chunk_size, indirect_level="both", temperature=1.3, beta=0.7)
    h, w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss_fused(
        h, w, TeacherSignals(logits=teacher_logits), mask, cfg,
        shared_vocab_size=29, sampled_ids=sampled, group_size=2, student_head=head,
    )  # fmt: skip
    loss.backward()
    nh, nw = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    expected, terms = reference.loss(
        naive_head(nh @ nw.t(), head), teacher_logits, mask, cfg,
        shared=29, sampled_ids=sampled, group_size=2, return_terms=True,
    )  # fmt: skip
    expected.backward()
    if head.softcap is not None and head.softcap < 3:  # the cap really bites: logits near +-cap
        raw = (h_s @ w_s.t()).abs() * head.scale
        assert float((raw > 2 * head.softcap).double().mean()) > 0.2
    assert_close(loss.detach(), expected.detach(), what="loss")
    assert_close(h.grad, nh.grad, what="grad hidden")
    assert_close(w.grad, nw.grad, what="grad weight")
    assert metrics["loss_indirect_token"] == pytest.approx(float(terms["token"]), rel=1e-9)
    assert float(terms["token"]) > 0 and float(terms["direct"]) > 0


@pytest.mark.parametrize("head_name", ["gemma2 softcap 30", "softcap 2 (bites)"])
def test_fused_head_with_sparse_teacher_equals_plain_on_headed_logits(head_name, assert_close):
    head = HEADS[head_name]
    h_s, w_s, teacher_logits, mask, sampled = batch(seed=7, logit_scale=2.0)
    cfg = TSDKDConfig(num_candidates=4, chunk_size=3, indirect_level="both", sparse_top_k=6)
    candidates = torch.topk(naive_head(h_s @ w_s.t(), head)[..., :29], 4).indices
    signals = teacher_signals_from_logits(
        teacher_logits, cfg, mask=mask, shared_vocab_size=29, candidate_ids=candidates, sampled_ids=sampled
    )
    kwargs = dict(shared_vocab_size=29, sampled_ids=sampled, group_size=2)
    h, w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, _ = tsdkd_loss_fused(h, w, signals, mask, cfg, student_head=head, **kwargs)
    loss.backward()
    ph, pw = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    plain, _ = tsdkd_loss(naive_head(ph @ pw.t(), head), signals, mask, cfg, **kwargs)
    plain.backward()
    assert_close(loss.detach(), plain.detach(), what="loss")
    assert_close(h.grad, ph.grad, what="grad hidden")
    assert_close(w.grad, pw.grad, what="grad weight")


def test_gradcheck_through_a_biting_softcap():
    generator = torch.Generator().manual_seed(3)
    h_s = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64) * 2
    w_s = torch.randn(11, 3, generator=generator, dtype=torch.float64)
    teacher = TeacherSignals(logits=torch.randn(2, 4, 11, generator=generator, dtype=torch.float64))
    mask = torch.ones(2, 4)
    sampled = torch.randint(0, 10, (2, 4), generator=generator)
    # Hard gate: the soft gate is stop-gradient by design, which finite differences would see.
    cfg = TSDKDConfig(num_candidates=3, chunk_size=3, indirect_level="both", entropy_top_fraction=0.6, gate="hard")

    def fused(hidden, weight):  # x2: an upstream gradient != 1 keeps the copying backward path
        return 2.0 * tsdkd_loss_fused(
            hidden, weight, teacher, mask, cfg, shared_vocab_size=10, sampled_ids=sampled, group_size=2,
            student_head=OutputHead(scale=1.3, softcap=1.5),
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(fused, (h_s.requires_grad_(True), w_s.requires_grad_(True)), eps=1e-6, atol=1e-7)


def test_student_head_must_be_an_output_head():
    h, w = torch.randn(1, 2, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="student_head must be an OutputHead"):
        tsdkd_loss_fused(
            h, w, TeacherSignals(logits=torch.randn(1, 2, 5)), torch.ones(1, 2), TSDKDConfig(num_candidates=2),
            shared_vocab_size=5, student_head=30.0,
        )  # fmt: skip
