"""Each TSD-KD term and the total against the naive float64 reference (values and gradients)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tsdkd_plugin.objective import (
    TeacherSignals,
    TSDKDConfig,
    entropy_selection,
    listmle,
    opener_mask,
    tsdkd_loss,
)

OFF = {"direct_weight": 0.0, "entropy_weight": 0.0, "indirect_weight": 0.0, "sequence_weight": 0.0}


def only(term: str, **overrides) -> TSDKDConfig:
    weights = dict(OFF)
    weights[term] = {"direct_weight": 1.0, "entropy_weight": 1.0, "indirect_weight": 1.0, "sequence_weight": 1.0}[term]
    level = "sequence" if term == "sequence_weight" else "token"
    return TSDKDConfig(**{**weights, "indirect_level": level, "num_candidates": 4, "chunk_size": 5, **overrides})


def run_both(batch, cfg, reference, *, group_size=None, teacher=None):
    student = batch["student"].clone().requires_grad_(True)
    teacher_signals = teacher or TeacherSignals(logits=batch["teacher"])
    loss, metrics = tsdkd_loss(
        student, teacher_signals, batch["mask"], cfg,
        shared_vocab_size=batch["shared"], sampled_ids=batch["sampled"], group_size=group_size,
    )  # fmt: skip
    loss.backward()
    naive_student = batch["student"].clone().requires_grad_(True)
    expected, terms = reference.loss(
        naive_student, batch["teacher"], batch["mask"], cfg,
        shared=batch["shared"], sampled_ids=batch["sampled"], group_size=group_size, return_terms=True,
    )  # fmt: skip
    expected.backward()
    return loss, metrics, student.grad, expected, terms, naive_student.grad


SHAPES = [(2, 7, 23), (3, 9, 40), (4, 6, 31)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gate": "hard", "gate_margin": 0.1, "beta": 0.5, "temperature": 1.7},
        {"gate": "none", "beta": 0.0, "entropy_top_fraction": 0.3, "opener_fraction": 0.4},
        {"beta": 1.0, "listmle_form": "prefix", "opener_fraction": 1.0, "temperature": 0.8},
    ],
)
def test_total_matches_reference(shape, overrides, make_batch, reference, assert_close):
    batch = make_batch(*shape, seed=sum(shape))
    cfg = TSDKDConfig(num_candidates=5, chunk_size=4, **overrides)
    loss, metrics, grad, expected, terms, expected_grad = run_both(batch, cfg, reference)
    assert_close(loss.detach(), expected.detach(), what="total")
    assert_close(grad, expected_grad, what="grad")
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-9)
    assert metrics["loss_direct"] == pytest.approx(float(terms["direct"]), rel=1e-9, abs=1e-12)
    assert metrics["loss_entropy"] == pytest.approx(float(terms["entropy"]), rel=1e-9)
    assert metrics["loss_indirect_token"] == pytest.approx(float(terms["token"]), rel=1e-9)


@pytest.mark.parametrize("term", ["direct_weight", "entropy_weight", "indirect_weight", "sequence_weight"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_term_alone(term, seed, make_batch, reference, assert_close):
    batch = make_batch(4, 8, 29, seed=seed)
    cfg = only(term)
    group = 2 if term == "sequence_weight" else None
    loss, metrics, grad, expected, _, expected_grad = run_both(batch, cfg, reference, group_size=group)
    assert float(expected) != 0.0
    assert_close(loss.detach(), expected.detach(), what=term)
    assert_close(grad, expected_grad, what=term + " grad")
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-9)


def test_sequence_and_token_levels_together_with_given_teacher_scores(make_batch, reference, assert_close):
    batch = make_batch(6, 7, 19, seed=3)
    batch["mask"][4] = 0  # an empty response in the second group is left out of its ranking
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1, 5.0, -0.5], dtype=torch.float64)
    cfg = TSDKDConfig(indirect_level="both", sequence_weight=0.7, num_candidates=3, chunk_size=4)
    student = batch["student"].clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(
        student, TeacherSignals(logits=batch["teacher"], sequence_scores=scores), batch["mask"], cfg,
        shared_vocab_size=19, sampled_ids=batch["sampled"], group_size=3,
    )  # fmt: skip
    loss.backward()
    naive = batch["student"].clone().requires_grad_(True)
    expected, terms = reference.loss(
        naive, batch["teacher"], batch["mask"], cfg, shared=19, sampled_ids=batch["sampled"],
        group_size=3, teacher_sequence_scores=scores, return_terms=True,
    )  # fmt: skip
    expected.backward()
    assert_close(loss.detach(), expected.detach(), what="total")
    assert_close(student.grad, naive.grad, what="grad")
    assert metrics["loss_indirect_sequence"] == pytest.approx(float(terms["sequence"]), rel=1e-9)


def test_float32_inputs_match_float64_reference(make_batch, reference, assert_close):
    batch = make_batch(3, 8, 37, seed=5, dtype=torch.float32)
    cfg = TSDKDConfig(num_candidates=4, chunk_size=3, indirect_level="both", entropy_top_fraction=0.5)
    loss, _, grad, expected, _, expected_grad = run_both(batch, cfg, reference, group_size=3)
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6, what="fp32 total")
    assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6, what="fp32 grad")


# ----------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL (test extra) is not installed")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_unweighted_direct_term_matches_trl(beta, temperature, trl_generalized_jsd, make_batch, assert_close):
    batch = make_batch(3, 6, 33, seed=11)
    cfg = only("direct_weight", gate="none", beta=beta, temperature=temperature)
    student = batch["student"].clone().requires_grad_(True)
    ours, _ = tsdkd_loss(student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=33)
    ours.backward()
    theirs_student = batch["student"].clone().requires_grad_(True)
    labels = torch.where(batch["mask"].bool(), 0, -100)
    theirs = trl_generalized_jsd(
        theirs_student, batch["teacher"], labels=labels, beta=beta, temperature=temperature, reduction="batchmean"
    )
    theirs.backward()
    assert_close(ours.detach(), theirs.detach(), rtol=1e-10, what="TRL value")
    assert_close(student.grad, theirs_student.grad, rtol=1e-9, atol=1e-12, what="TRL grad")


# ----------------------------------------------------------------------------- ListMLE


def test_listmle_rewards_agreeing_with_the_teacher_and_prefix_form_is_reversed():
    teacher_order_scores = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])  # items already in the teacher's order
    agree = teacher_order_scores.clone()  # student ranks them the same way
    reverse = teacher_order_scores.flip(0)  # student ranks them the opposite way
    assert listmle(agree, "suffix") < listmle(reverse, "suffix")
    # The reference code's prefix form prefers the reversed order: it trains the wrong way.
    assert listmle(reverse, "prefix") < listmle(agree, "prefix")


@pytest.mark.parametrize("form", ["suffix", "prefix"])
def test_token_listmle_through_the_loss_orders(form, reference):
    # One token, one opener position: candidates' teacher order is 0 > 1 > 2 > 3.
    teacher = torch.tensor([[[4.0, 3.0, 2.0, 1.0, -9.0, -9.0]]], dtype=torch.float64)
    agree = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -9.0, -9.0]]], dtype=torch.float64)
    reverse = torch.tensor([[[0.0, 1.0, 2.0, 3.0, -9.0, -9.0]]], dtype=torch.float64)
    cfg = only("indirect_weight", num_candidates=4, listmle_form=form)
    mask = torch.ones(1, 1)
    values = {}
    for name, logits in (("agree", agree), ("reverse", reverse)):
        loss, metrics = tsdkd_loss(logits, TeacherSignals(logits=teacher), mask, cfg, shared_vocab_size=6)
        values[name] = metrics["loss_indirect_token"]
        assert float(loss) == pytest.approx(float(reference.loss(logits, teacher, mask, cfg, shared=6)))
    if form == "suffix":
        assert values["agree"] < values["reverse"]
    else:
        assert values["reverse"] < values["agree"]


# ----------------------------------------------------------------------------- opener


@pytest.mark.parametrize(
    "profile, fraction, expected",
    [
        ([1.0] * 10, 0.1, 1),  # uniform: 10% of the entropy is the first token
        ([1.0] * 10, 0.25, 3),
        ([4.0, 0.5, 0.5, 5.0], 0.5, 3),  # cumulative 4, 4.5, 5 reaches exactly half at j = 3
        ([0.0, 0.0, 6.0, 2.0, 2.0], 0.1, 3),  # leading zero-entropy tokens belong to the opener
        ([9.0, 1.0], 0.1, 1),
        ([1.0, 1.0, 1.0, 0.0, 0.0], 1.0, 3),  # c = 1 stops at the last uncertain token
        ([0.0, 0.0, 0.0], 0.5, 1),  # no entropy at all: just the first token
    ],
)
def test_opener_length_on_hand_built_profiles(profile, fraction, expected, reference):
    entropy = torch.tensor([profile])
    mask = torch.ones_like(entropy)
    got = opener_mask(entropy, mask, fraction)
    assert int(got.sum()) == expected
    assert got[0, :expected].all()
    if expected == reference.opener_lengths([entropy[0]], fraction)[0] or sum(profile) == 0:
        return
    raise AssertionError("hand-computed expectation disagrees with the reference")


def test_opener_is_per_sequence_and_skips_prompt_and_padding():
    # Row 0: prompt of 2, response entropies [1, 1, 1, 1], padding. Row 1: response [5, 1, 1, 1, 1, 1].
    entropy = torch.tensor([[50.0, 50.0, 1.0, 1.0, 1.0, 1.0, 99.0, 99.0], [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 99.0, 99.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    got = opener_mask(entropy, mask, 0.5)
    assert got[0].nonzero().squeeze(1).tolist() == [2, 3]  # 2 of 4 units
    assert got[1].nonzero().squeeze(1).tolist() == [0]  # 5 of 10 units at once
    # The reference code computed one length for the whole flattened micro-batch instead.


def test_opener_length_metric_end_to_end():
    # Student logits with hand-set entropy profile: uniform rows (entropy log V) vs peaked rows (~0).
    vocab = 8
    uniform, peaked = torch.zeros(vocab), torch.tensor([30.0] + [0.0] * (vocab - 1))
    rows = [[uniform, uniform, peaked, peaked], [peaked, peaked, uniform, uniform]]
    student = torch.stack([torch.stack(r) for r in rows]).double()
    cfg = TSDKDConfig(opener_fraction=0.4, num_candidates=2)
    _, metrics = tsdkd_loss(
        student, TeacherSignals(logits=student.clone()), torch.ones(2, 4), cfg, shared_vocab_size=vocab
    )
    # Row 0: the first uniform token holds ~half the entropy -> d = 1.
    # Row 1: two ~0-entropy tokens, then a uniform one -> d = 3.
    assert metrics["opener_mean_length"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- entropy selection


def test_entropy_selection_matches_quantile_and_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(101, generator=generator, dtype=torch.float64)
    for fraction in (0.9, 0.5, 0.1, 1.0):
        chosen, threshold = entropy_selection(values, fraction)
        assert float(threshold) == pytest.approx(float(torch.quantile(values, 1 - fraction)))
        assert torch.equal(chosen, values >= torch.quantile(values, 1 - fraction))
    # Padding has huge "entropy" in the logits but never counts.
    vocab = 16
    student = torch.randn(2, 5, vocab, generator=generator, dtype=torch.float64) * 3
    student[:, 3:] = 0.0  # uniform rows = max entropy, but they are padding
    mask = torch.ones(2, 5)
    mask[:, 3:] = 0
    cfg = only("entropy_weight", entropy_top_fraction=0.5)
    _, metrics = tsdkd_loss(student, TeacherSignals(logits=student), mask, cfg, shared_vocab_size=vocab)
    assert metrics["entropy_threshold"] < 0.999 * torch.log(torch.tensor(float(vocab))).item()
    assert metrics["entropy_selected_fraction"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- gate


@pytest.mark.parametrize("gate", ["soft", "hard", "none"])
def test_gate_metrics(gate, make_batch):
    batch = make_batch(3, 8, 21, seed=2)
    cfg = TSDKDConfig(gate=gate, gate_margin=0.05, num_candidates=3)
    _, metrics = tsdkd_loss(
        batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=21
    )
    logq = torch.log_softmax(batch["student"], -1)
    logp = torch.log_softmax(batch["teacher"], -1)
    gap = (-(logq.exp() * logq).sum(-1) + (logp.exp() * logp).sum(-1))[batch["mask"].bool()]
    weight = {"soft": torch.sigmoid(gap), "hard": (gap > 0.05).double(), "none": torch.ones_like(gap)}[gate]
    picked = {"soft": weight > 0.5, "hard": weight == 1, "none": weight == 1}[gate]
    assert metrics["gate_mean_weight"] == pytest.approx(float(weight.mean()))
    assert metrics["gate_selected_fraction"] == pytest.approx(float(picked.double().mean()))
    assert metrics["entropy_student_mean"] == pytest.approx(
        float(-(logq.exp() * logq).sum(-1)[batch["mask"].bool()].mean())
    )


def test_every_term_can_be_switched_off(make_batch):
    batch = make_batch(2, 6, 17, seed=4)
    cfg = TSDKDConfig(**OFF)
    student = batch["student"].clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(
        student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=17
    )
    loss.backward()
    assert float(loss) == 0.0 and torch.count_nonzero(student.grad) == 0
    cfg = dataclasses.replace(cfg, entropy_weight=2.0)
    loss, metrics = tsdkd_loss(
        batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=17
    )
    assert float(loss) == pytest.approx(2.0 * metrics["loss_entropy"])
