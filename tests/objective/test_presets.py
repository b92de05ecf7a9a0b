"""Paper and reference presets: per-response vs micro-batch reductions of L_dir and L_ent.

The paper averages the direct term per response and takes the entropy term over the top 10%
most uncertain tokens of each response; the reference code averages both over the micro-batch's
tokens and keeps the top 90%. Both are checked against the naive float64 reference (conftest),
which implements each reduction with explicit per-response loops and torch.quantile.
"""

from __future__ import annotations

import pytest
import torch

from tsdkd_plugin.objective import PRESETS, TeacherSignals, TSDKDConfig, tsdkd_loss, tsdkd_loss_fused

REDUCTIONS = [("micro_batch", "micro_batch"), ("response", "micro_batch"), ("micro_batch", "response"), ("response", "response")]


def run_plain(batch, cfg, reference):
    student = batch["student"].clone().requires_grad_(True)
    loss, metrics = tsdkd_loss(
        student, TeacherSignals(logits=batch["teacher"]), batch["mask"], cfg,
        shared_vocab_size=batch["shared"], sampled_ids=batch["sampled"], group_size=2,
    )  # fmt: skip
    loss.backward()
    naive = batch["student"].clone().requires_grad_(True)
    expected, terms = reference.loss(
        naive, batch["teacher"], batch["mask"], cfg, shared=batch["shared"], sampled_ids=batch["sampled"],
        group_size=2, return_terms=True,
    )  # fmt: skip
    expected.backward()
    return loss, metrics, student.grad, expected, terms, naive.grad


@pytest.mark.parametrize("direct_reduction, entropy_reduction", REDUCTIONS)
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.9])
def test_reductions_match_the_reference(direct_reduction, entropy_reduction, fraction, make_batch, reference, assert_close):
    # Responses of very different lengths, so per-response and per-token means differ.
    batch = make_batch(4, 11, 23, seed=int(fraction * 10))
    batch["mask"][0, 2:] = 0
    batch["mask"][1, :] = 0  # an empty response counts in neither mean
    batch["mask"][2, :] = 1
    cfg = TSDKDConfig(
        num_candidates=4, chunk_size=4, indirect_level="both", entropy_top_fraction=fraction,
        direct_reduction=direct_reduction, entropy_reduction=entropy_reduction, temperature=1.4,
    )  # fmt: skip
    loss, metrics, grad, expected, terms, expected_grad = run_plain(batch, cfg, reference)
    assert_close(loss.detach(), expected.detach(), what="total")
    assert_close(grad, expected_grad, what="grad")
    assert metrics["loss_direct"] == pytest.approx(float(terms["direct"]), rel=1e-9)
    assert metrics["loss_entropy"] == pytest.approx(float(terms["entropy"]), rel=1e-9)
    other = TSDKDConfig(**{**cfg.to_dict(), "direct_reduction": "micro_batch", "entropy_reduction": "micro_batch"})
    if (direct_reduction, entropy_reduction) != ("micro_batch", "micro_batch"):  # the option changes the loss
        assert abs(float(reference.loss(batch["student"], batch["teacher"], batch["mask"], other, shared=23,
                                        sampled_ids=batch["sampled"], group_size=2)) - float(expected)) > 1e-6


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_fused_equal_the_reference(preset, reference, assert_close):
    generator = torch.Generator().manual_seed(4)
    h_s = torch.randn(3, 9, 5, generator=generator, dtype=torch.float64)
    w_s = torch.randn(21, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 9, 21, generator=generator, dtype=torch.float64) * 2
    mask = torch.ones(3, 9)
    mask[0, 3:] = 0
    cfg = TSDKDConfig.from_preset(preset, num_candidates=3, chunk_size=4)
    h, w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, metrics = tsdkd_loss_fused(h, w, TeacherSignals(logits=teacher), mask, cfg, shared_vocab_size=21)
    loss.backward()
    nh, nw = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    expected = reference.loss(nh @ nw.t(), teacher, mask, cfg, shared=21)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), what="loss")
    assert_close(h.grad, nh.grad, what="grad hidden")
    assert_close(w.grad, nw.grad, what="grad weight")
    # The entropy correction recomputes about min(f, 1 - f) of the tokens, not 1 - f.
    assert metrics["correction_token_fraction"] <= 0.35


def test_presets_and_overrides():
    paper = TSDKDConfig.from_preset("paper")
    assert (paper.direct_reduction, paper.entropy_reduction, paper.entropy_top_fraction) == ("response", "response", 0.1)
    reference_preset = TSDKDConfig.from_preset("reference")
    assert reference_preset == TSDKDConfig()  # the reference preset is the default
    assert TSDKDConfig.from_preset("paper", entropy_top_fraction=0.9).entropy_top_fraction == 0.9  # explicit wins
    with pytest.raises(ValueError, match="preset must be one of"):
        TSDKDConfig.from_preset("mine")
    with pytest.raises(ValueError, match="direct_reduction must be one of"):
        TSDKDConfig(direct_reduction="sequence")
