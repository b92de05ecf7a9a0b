"""Opt-in diagnostics: each term's gradient norm at the student logits, its cosine with the direct
term's, and the teacher's mass on the student's candidates at opener tokens -- against autograd
on the naive float64 reference, term by term."""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.objective import (
    DIAGNOSTIC_KEYS,
    METRIC_KEYS,
    TeacherSignals,
    TSDKDConfig,
    tsdkd_loss,
    tsdkd_loss_fused,
)

TERM_NAMES = {"direct": "direct_weight", "entropy": "entropy_weight", "token": "indirect_weight",
              "sequence": "sequence_weight"}  # fmt: skip
METRIC_NAMES = {"direct": "direct", "entropy": "entropy", "token": "indirect_token", "sequence": "indirect_sequence"}


def expected_diagnostics(batch, cfg, reference):
    """Each weighted term's gradient w.r.t. the logits by autograd, and the candidate mass by loops."""
    logits = batch["student"].clone().requires_grad_(True)
    _, terms = reference.loss(
        logits, batch["teacher"], batch["mask"], cfg, shared=batch["shared"], sampled_ids=batch["sampled"],
        group_size=2, return_terms=True,
    )  # fmt: skip
    grads = {}
    for name, field in TERM_NAMES.items():
        weighted = getattr(cfg, field) * terms[name]
        grads[name] = torch.autograd.grad(weighted, logits, retain_graph=True)[0].flatten()
    out = {f"diag_grad_norm_{METRIC_NAMES[n]}": float(g.norm()) for n, g in grads.items()}
    for name in ("entropy", "token", "sequence"):
        cosine = torch.nn.functional.cosine_similarity(grads[name], grads["direct"], dim=0)
        out[f"diag_grad_cos_{METRIC_NAMES[name]}_direct"] = float(cosine)
    # Teacher mass on the student's top-k at opener positions (per-sequence opener, loops).
    shared, tau = batch["shared"], cfg.temperature
    logq = torch.log_softmax(batch["student"][..., :shared] / tau, -1)
    p = torch.softmax(batch["teacher"][..., :shared] / tau, -1)
    entropy = -(logq.exp() * logq).sum(-1)
    masses = []
    for b in range(batch["mask"].shape[0]):
        positions = batch["mask"][b].bool().nonzero().squeeze(1).tolist()
        if not positions:
            continue
        d = reference.opener_lengths([entropy[b, positions]], cfg.opener_fraction)[0]
        for t in positions[:d]:
            masses.append(float(p[b, t, torch.topk(logq[b, t], cfg.num_candidates).indices].sum()))
    out["diag_teacher_mass_on_candidates"] = sum(masses) / len(masses)
    return out


@pytest.mark.parametrize("preset", ["reference", "paper"])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_diagnostics_match_autograd(preset, path, reference):
    generator = torch.Generator().manual_seed(6)
    h_s = torch.randn(4, 8, 5, generator=generator, dtype=torch.float64)
    w_s = torch.randn(27, 5, generator=generator, dtype=torch.float64) * 1.2
    batch = {
        "student": h_s @ w_s.t(),
        "teacher": torch.randn(4, 8, 27, generator=generator, dtype=torch.float64) * 2,
        "mask": torch.ones(4, 8),
        "sampled": torch.randint(0, 25, (4, 8), generator=generator),
        "shared": 25,
    }
    batch["mask"][1, 5:] = 0
    cfg = TSDKDConfig.from_preset(
        preset, num_candidates=4, chunk_size=5, indirect_level="both", sequence_weight=0.5, temperature=1.2,
        diagnostics=True,
    )  # fmt: skip
    kwargs = dict(shared_vocab_size=25, sampled_ids=batch["sampled"], group_size=2)
    teacher = TeacherSignals(logits=batch["teacher"])
    if path == "plain":
        _, metrics = tsdkd_loss(batch["student"].clone().requires_grad_(True), teacher, batch["mask"], cfg, **kwargs)
    else:
        _, metrics = tsdkd_loss_fused(
            h_s.requires_grad_(True), w_s.requires_grad_(True), teacher, batch["mask"], cfg, **kwargs
        )
    expected = expected_diagnostics(batch, cfg, reference)
    assert set(metrics) == set(METRIC_KEYS) | set(DIAGNOSTIC_KEYS)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert all(expected[f"diag_grad_norm_{name}"] > 0 for name in METRIC_NAMES.values())
    assert 0 < expected["diag_teacher_mass_on_candidates"] < 1


def test_diagnostics_cost_nothing_to_the_result(make_batch, plain_loss):
    batch = make_batch(4, 6, 30, seed=3)
    results = []
    for diagnostics in (False, True):
        cfg = TSDKDConfig(num_candidates=4, chunk_size=5, indirect_level="both", diagnostics=diagnostics)
        results.append(plain_loss(batch, cfg, group_size=2))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
    assert set(results[0][1]) == set(METRIC_KEYS)  # off: not even the keys
    assert {k: results[1][1][k] for k in METRIC_KEYS} == results[0][1]


def test_sparse_diagnostics_with_the_whole_vocabulary_equal_dense(make_batch, sparse_vs_dense):
    batch = make_batch(4, 6, 20, seed=4)
    cfg = TSDKDConfig(num_candidates=3, sparse_top_k=20, indirect_level="both", diagnostics=True)
    dense, got = sparse_vs_dense(batch, cfg)
    for key in DIAGNOSTIC_KEYS:  # sparse fields travel as float32
        assert got[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-7), key


def test_terms_that_are_off_report_zero(make_batch):
    batch = make_batch(2, 5, 15, seed=5)
    cfg = TSDKDConfig(num_candidates=20, indirect_weight=0.0, entropy_weight=0.0, diagnostics=True)  # k > V: unused
    _, metrics = tsdkd_loss(
        batch["student"], TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg, shared_vocab_size=15
    )
    assert metrics["diag_grad_norm_direct"] > 0
    assert metrics["diag_grad_norm_entropy"] == metrics["diag_grad_cos_indirect_token_direct"] == 0.0
    assert metrics["diag_teacher_mass_on_candidates"] == pytest.approx(1.0)  # all 15 tokens are candidates


def test_an_all_masked_batch_still_reports_every_key(make_batch):
    batch = make_batch(2, 4, 9, seed=6)
    cfg = TSDKDConfig(num_candidates=3, diagnostics=True)
    _, metrics = tsdkd_loss(
        batch["student"], TeacherSignals(logits=batch["teacher"]), torch.zeros(2, 4), cfg, shared_vocab_size=9
    )
    assert set(metrics) == set(METRIC_KEYS) | set(DIAGNOSTIC_KEYS) and not any(metrics.values())
