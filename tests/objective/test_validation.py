"""Bad input is a ValueError naming the parameter and its valid range, never a silent NaN."""

from __future__ import annotations

import math

import pytest
import torch

from tsdkd_plugin.objective import (
    NonFiniteInputError,
    TeacherSignals,
    TSDKDConfig,
    teacher_signals_from_logits,
    tsdkd_loss,
    tsdkd_loss_fused,
)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", -0.1, r"beta must be in \[0, 1\]"),
        ("beta", 1.5, r"beta must be in \[0, 1\]"),
        ("beta", math.nan, r"beta must be in \[0, 1\]"),
        ("temperature", 0.0, "temperature must be a finite real > 0"),
        ("temperature", -1.0, "temperature must be a finite real > 0"),
        ("temperature", math.inf, "temperature must be a finite real > 0"),
        ("gate", "medium", "gate must be one of"),
        ("gate_margin", math.inf, "gate_margin must be a finite real"),
        ("indirect_level", "paragraph", "indirect_level must be one of"),
        ("listmle_form", "middle", "listmle_form must be one of"),
        ("opener_fraction", 0.0, r"opener_fraction must be in \(0, 1\]"),
        ("opener_fraction", 1.2, r"opener_fraction must be in \(0, 1\]"),
        ("entropy_top_fraction", 0.0, r"entropy_top_fraction must be in \(0, 1\]"),
        ("entropy_top_fraction", 1.01, r"entropy_top_fraction must be in \(0, 1\]"),
        ("direct_weight", -1.0, "direct_weight must be a finite real >= 0"),
        ("entropy_weight", -0.5, "entropy_weight must be a finite real >= 0"),
        ("indirect_weight", math.nan, "indirect_weight must be a finite real >= 0"),
        ("sequence_weight", -1e-9, "sequence_weight must be a finite real >= 0"),
        ("num_candidates", 0, "num_candidates must be an integer >= 1"),
        ("num_candidates", 2.5, "num_candidates must be an integer >= 1"),
        ("num_candidates", True, "num_candidates must be an integer >= 1"),
        ("chunk_size", 0, "chunk_size must be an integer >= 1"),
        ("sparse_top_k", -3, "sparse_top_k must be an integer >= 1"),
        ("diagnostics", 1, "diagnostics must be True or False"),
        ("listmle_normalize", "yes", "listmle_normalize must be True or False"),
        ("listmle_normalize", None, "listmle_normalize must be True or False"),
        ("weight_warmup_steps", -1, r"weight_warmup_steps must be an integer >= 0 \(optimizer steps; 0 = no warm-up\)"),
        ("weight_warmup_steps", 2.0, "weight_warmup_steps must be an integer >= 0"),
        ("weight_warmup_steps", True, "weight_warmup_steps must be an integer >= 0"),
        ("term_balance", "gradnorm", r"term_balance must be one of \('none', 'grad_norm'\), got 'gradnorm'"),
        ("term_balance", None, "term_balance must be one of"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TSDKDConfig(**{field: value})


def test_config_defaults_match_the_paper():
    cfg = TSDKDConfig()
    assert (cfg.beta, cfg.temperature, cfg.opener_fraction, cfg.num_candidates) == (0.9, 1.0, 0.1, 10)
    assert (cfg.entropy_weight, cfg.indirect_weight, cfg.entropy_top_fraction) == (1.0, 0.1, 0.9)
    assert (cfg.gate, cfg.listmle_form, cfg.indirect_level) == ("soft", "suffix", "token")
    assert cfg.token_level_on and not cfg.sequence_level_on
    # The remedies (docs/objective.md) are deviations from the paper: all off.
    assert (cfg.listmle_normalize, cfg.weight_warmup_steps, cfg.term_balance) == (False, 0, "none")


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return {
        "student": torch.randn(2, 4, 12, generator=generator),
        "teacher": torch.randn(2, 4, 12, generator=generator),
        "mask": torch.ones(2, 4),
        "sampled": torch.randint(0, 12, (2, 4), generator=generator),
    }


def call(batch, cfg=None, teacher=None, **kwargs):
    cfg = cfg or TSDKDConfig(num_candidates=3)
    teacher = teacher or TeacherSignals(logits=batch["teacher"])
    kwargs.setdefault("shared_vocab_size", 12)
    return tsdkd_loss(batch.get("student_override", batch["student"]), teacher, batch["mask"], cfg, **kwargs)


def test_k_larger_than_vocabulary(batch):
    with pytest.raises(ValueError, match="num_candidates=13 exceeds the vocabulary"):
        call(batch, TSDKDConfig(num_candidates=13))


def test_mismatched_shapes(batch):
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 4\]"):
        tsdkd_loss(
            batch["student"],
            TeacherSignals(logits=batch["teacher"]),
            torch.ones(2, 5),
            TSDKDConfig(num_candidates=3),
            shared_vocab_size=12,
        )
    with pytest.raises(ValueError, match=r"teacher.logits must have shape \[2, 4, \?\]"):
        call(batch, teacher=TeacherSignals(logits=batch["teacher"][:, :3]))
    with pytest.raises(ValueError, match="student_logits must be a"):
        tsdkd_loss(
            batch["student"][0],
            TeacherSignals(logits=batch["teacher"]),
            batch["mask"],
            TSDKDConfig(),
            shared_vocab_size=12,
        )
    hidden, weight = torch.randn(2, 4, 5), torch.randn(12, 6)
    with pytest.raises(ValueError, match=r"student_lm_head_weight must have shape \[\?, 5\]"):
        tsdkd_loss_fused(
            hidden,
            weight,
            TeacherSignals(logits=batch["teacher"]),
            batch["mask"],
            TSDKDConfig(num_candidates=3),
            shared_vocab_size=12,
        )
    with pytest.raises(ValueError, match="same dtype"):
        tsdkd_loss_fused(
            hidden,
            torch.randn(12, 5).double(),
            TeacherSignals(logits=batch["teacher"]),
            batch["mask"],
            TSDKDConfig(num_candidates=3),
            shared_vocab_size=12,
        )


def test_mismatched_devices(batch):
    with pytest.raises(ValueError, match="teacher.logits is on meta"):
        call(batch, teacher=TeacherSignals(logits=torch.empty(2, 4, 12, device="meta")))
    with pytest.raises(ValueError, match="mask is on meta"):
        tsdkd_loss(
            batch["student"],
            TeacherSignals(logits=batch["teacher"]),
            torch.ones(2, 4, device="meta"),
            TSDKDConfig(),
            shared_vocab_size=12,
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_dense_teacher(bad, batch):
    teacher = batch["teacher"].clone()
    teacher[1, 2, 5] = bad
    # NonFiniteInputError is a ValueError the actor may skip (a data fault, not a bug).
    assert issubclass(NonFiniteInputError, ValueError)
    with pytest.raises(NonFiniteInputError, match="teacher logits contain NaN or inf"):
        call(batch, teacher=TeacherSignals(logits=teacher))
    hidden = torch.randn(2, 4, 3)
    hidden[0, 1, 0] = bad
    with pytest.raises(ValueError, match="teacher logits contain NaN or inf"):
        call(batch, teacher=TeacherSignals(hidden=hidden, lm_head_weight=torch.randn(12, 3)))
    with pytest.raises(ValueError, match="teacher_logits contains NaN or inf"):
        teacher_signals_from_logits(teacher, TSDKDConfig(sparse_top_k=4), mask=batch["mask"], shared_vocab_size=12)


@pytest.mark.parametrize("field", ["topk_logprobs", "entropy", "tail_logprob", "candidate_logprobs"])
def test_non_finite_sparse_teacher(field, batch):
    cfg = TSDKDConfig(num_candidates=3, sparse_top_k=4)
    signals = teacher_signals_from_logits(
        batch["teacher"], cfg, mask=batch["mask"], shared_vocab_size=12,
        candidate_ids=torch.topk(batch["student"], 3).indices,
    )  # fmt: skip
    getattr(signals, field).view(-1)[3] = math.nan
    with pytest.raises(NonFiniteInputError, match=f"teacher.{field} contains NaN or inf"):
        call(batch, cfg, teacher=signals)


def test_sparse_transport_errors(batch):
    cfg = TSDKDConfig(num_candidates=3, sparse_top_k=4)
    signals = teacher_signals_from_logits(batch["teacher"], cfg, mask=batch["mask"], shared_vocab_size=12)
    with pytest.raises(ValueError, match="needs teacher.candidate_ids"):
        call(batch, cfg, teacher=signals)
    with pytest.raises(ValueError, match="temperature 1.0, but TSDKDConfig.temperature is 2.0"):
        call(batch, TSDKDConfig(num_candidates=3, temperature=2.0), teacher=signals)
    with pytest.raises(ValueError, match="sparse_top_k=13 must be <= shared_vocab_size=12"):
        teacher_signals_from_logits(
            batch["teacher"], TSDKDConfig(sparse_top_k=13), mask=batch["mask"], shared_vocab_size=12
        )
    duplicated = teacher_signals_from_logits(
        batch["teacher"],
        cfg,
        mask=batch["mask"],
        shared_vocab_size=12,
        candidate_ids=torch.zeros(2, 4, 3, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="teacher.candidate_ids must be distinct"):
        call(batch, cfg, teacher=duplicated)
    with_cands = teacher_signals_from_logits(
        batch["teacher"],
        cfg,
        mask=batch["mask"],
        shared_vocab_size=12,
        candidate_ids=torch.zeros(2, 4, 2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match=r"teacher.candidate_ids must have shape \[2, 4, 3\]"):
        call(batch, cfg, teacher=with_cands)


def test_teacher_signals_needs_exactly_one_transport(batch):
    with pytest.raises(ValueError, match="fill exactly one transport"):
        TeacherSignals()
    with pytest.raises(ValueError, match="fill exactly one transport"):
        TeacherSignals(logits=batch["teacher"], hidden=torch.randn(2, 4, 3), lm_head_weight=torch.randn(12, 3))
    with pytest.raises(ValueError, match="needs both `hidden` and `lm_head_weight`"):
        TeacherSignals(hidden=torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="missing"):
        TeacherSignals(topk_logprobs=torch.zeros(2, 4, 3), temperature=1.0)


def test_sequence_level_arguments(batch):
    cfg = TSDKDConfig(num_candidates=3, indirect_level="sequence")
    with pytest.raises(ValueError, match="sampled_ids .* is required"):
        call(batch, cfg, group_size=2)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        call(batch, cfg, sampled_ids=batch["sampled"], group_size=1)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        call(batch, cfg, sampled_ids=batch["sampled"], group_size=None)
    batch["mask"] = torch.ones(2, 4)
    batch3 = {k: (torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="batch size 3 is not a multiple of group_size=2"):
        call(batch3, cfg, sampled_ids=batch3["sampled"], group_size=2)
    bad_ids = batch["sampled"].clone()
    bad_ids[0, 0] = 12
    with pytest.raises(ValueError, match=r"sampled_ids must lie in \[0, shared_vocab_size=12\)"):
        call(batch, cfg, sampled_ids=bad_ids, group_size=2)
    with pytest.raises(ValueError, match="sampled_ids must be an integer tensor"):
        call(batch, cfg, sampled_ids=bad_ids.float(), group_size=2)
    scores = torch.tensor([0.0, math.nan])
    with pytest.raises(ValueError, match="teacher.sequence_scores contains NaN"):
        call(
            batch,
            cfg,
            teacher=TeacherSignals(logits=batch["teacher"], sequence_scores=scores),
            sampled_ids=batch["sampled"],
            group_size=2,
        )


def test_config_type_is_checked(batch):
    with pytest.raises(ValueError, match="config must be a TSDKDConfig"):
        tsdkd_loss(
            batch["student"],
            TeacherSignals(logits=batch["teacher"]),
            batch["mask"],
            {"beta": 0.9},
            shared_vocab_size=12,
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_student_is_an_error_not_a_nan(bad, batch):
    batch["student_override"] = batch["student"].clone()
    batch["student_override"][0, 1, 3] = bad
    with pytest.raises(NonFiniteInputError, match="student logits contain NaN or inf"):
        call(batch)
