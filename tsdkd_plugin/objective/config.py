"""TSDKDConfig: every weight and switch of the TSD-KD objective, validated once.

A bad value fails here, at construction, with a sentence naming the field and
its valid range -- not as a NaN deep inside a Ray worker. Values that depend on
the data (k against the vocabulary size, group size against the batch) are
checked when the loss is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

GATE_KINDS = ("soft", "hard", "none")
INDIRECT_LEVELS = ("token", "sequence", "both")
LISTMLE_FORMS = ("suffix", "prefix")
REDUCTIONS = ("micro_batch", "response")
TERM_BALANCES = ("none", "grad_norm")
# The weights of the terms besides the direct one: what weight_warmup_steps and term_balance scale.
EXTRA_WEIGHT_FIELDS = ("entropy_weight", "indirect_weight", "sequence_weight")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TSDKDConfig:
    """Hyper-parameters of L = w_dir*L_dir + lambda_ent*L_ent + alpha*L_ind + alpha_seq*L_seq.

    Defaults follow the paper and the authors' reference code (see
    docs/objective.md); every term is switched off by setting its weight to 0.
    """

    # ---- direct distillation: token-selective generalized JSD ----------------
    direct_weight: float = 1.0
    """Weight of L_dir (1.0 in the paper's formula; 0 switches the direct term off)."""

    direct_reduction: str = "micro_batch"
    """How L_dir averages its per-token values: "micro_batch": the mean over all response tokens
    of the micro-batch (reference code, TRL's batchmean); "response": each response's own token
    mean, then the mean over responses (the paper's (1/L) sum_t, per response)."""

    beta: float = 0.9
    """Generalized-JSD interpolation beta in [0, 1], TRL's convention:
    JSD_beta(p, q) = beta*KL(p||M) + (1-beta)*KL(q||M), M = beta*p + (1-beta)*q,
    with p the teacher and q the student. As in TRL, beta = 0 means forward KL(p||q)
    and beta = 1 reverse KL(q||p) (the JSD itself would vanish at both ends)."""

    temperature: float = 1.0
    """Softmax temperature tau > 0 applied to both models' logits for every term
    (distributions, entropies, candidate scores and sequence log-likelihoods)."""

    gate: str = "soft"
    """Per-token weight of the JSD from the entropy gap H_S - H_T (stop-gradient):
    "soft": sigmoid(H_S - H_T) (reference code, default); "hard": 1[H_S - H_T > gate_margin];
    "none": 1 everywhere (plain GKD, for ablations)."""

    gate_margin: float = 0.0
    """Margin s of the hard gate (nats, any finite real); ignored by the other gates."""

    # ---- indirect distillation: the teacher re-ranks the student's candidates --
    indirect_level: str = "token"
    """Which ListMLE terms exist: "token" (opener tokens, paper/reference default),
    "sequence" (n responses per prompt ranked by the teacher; our extension) or "both"."""

    indirect_weight: float = 0.1
    """alpha: weight of the token-level ListMLE L_ind (0 switches it off)."""

    sequence_weight: float = 0.1
    """alpha_seq: weight of the sequence-level ListMLE L_seq (used only when
    indirect_level is "sequence" or "both"; 0 switches it off)."""

    opener_fraction: float = 0.1
    """c in (0, 1]: the opener of a response is its shortest prefix holding a
    fraction c of the response's total student entropy (computed per sequence)."""

    num_candidates: int = 10
    """k >= 1: student top-k candidate tokens re-ranked by the teacher at each opener
    position (must not exceed the shared vocabulary; checked at call time)."""

    listmle_form: str = "suffix"
    """"suffix": the correct Plackett-Luce likelihood (log-sum-exp over j >= i).
    "prefix": the reference code's bug (log-sum-exp over j <= i), which rewards the
    reversed order; kept only to reproduce the reference for an ablation."""

    listmle_normalize: bool = False
    """Remedy, off by default (a deviation from the paper; docs/objective.md): divide the token-level
    ListMLE (per opener token) by log(k!) and the sequence-level one by log(n!), n the group size --
    each list's value at equal scores, so a term is about 1 when the student knows nothing (the
    divisor is 1 where that log is 0). Its gradient is scaled the same way."""

    # ---- entropy regularization ------------------------------------------------
    entropy_weight: float = 1.0
    """lambda_ent >= 0: weight of L_ent, the mean student entropy over the most
    uncertain completion tokens (minimized; 0 switches it off)."""

    entropy_top_fraction: float = 0.9
    """Fraction in (0, 1] of valid completion tokens (highest student entropy) that
    L_ent averages over: tokens at or above the (1 - fraction)-quantile of H_S.
    0.9 reproduces the reference code (0.1-quantile threshold); the paper's
    "top 10% most uncertain tokens" is 0.1."""

    entropy_reduction: str = "micro_batch"
    """Where L_ent selects and averages: "micro_batch": the quantile and the mean over all
    response tokens of the micro-batch (reference code); "response": within each response,
    then the mean over responses (the paper: the top fraction of each response)."""

    # ---- computation -----------------------------------------------------------
    chunk_size: int = 256
    """Tokens per chunk (>= 1) when logits are computed or processed chunk by chunk;
    work memory is about 6 * chunk_size * vocab * 4 bytes (0.9 GB at 256 x 151,936)."""

    diagnostics: bool = False
    """Also return per-term gradient diagnostics in the metrics (DIAGNOSTIC_KEYS): each term's
    gradient norm at the student logits, its cosine with the direct term's, and the teacher's
    mass on the student's candidates at opener tokens. Costs one more pass over the student's
    (and a dense teacher's) logits; off in production."""

    sparse_top_k: int = 24
    """K >= 1: teacher top-K log-probs per token carried by the sparse transport
    (the rest of the teacher's mass is kept as one tail bucket). 24 ships about 210 bytes per
    response token (TeacherSignals.to_wire) with L_dir within 1.5% of the dense value on peaked
    teachers; flat teachers need the dense transport or K >= 256 (docs/objective.md)."""

    # ---- remedies: opt-in deviations from the paper (docs/objective.md, "Remedies") ---------------
    weight_warmup_steps: int = 0
    """Remedy, off by default: N >= 0 optimizer steps over which the extra terms' weights
    (entropy_weight, indirect_weight, sequence_weight; not direct_weight) rise linearly from 0:
    at optimizer step s (0 for the first) they are multiplied by min(1, s / N). 0 = no warm-up.
    The actor applies it per step (TSDKDConfig.at_step)."""

    term_balance: str = "none"
    """Remedy, off by default: "none" (the paper), or "grad_norm": per micro-batch, each extra term's
    weight w is replaced by w * G_dir / G, G_dir the gradient norm at the student logits of the
    weighted direct term and G that of the unweighted extra term (stop-gradient), so w becomes the
    ratio of the two terms' gradient norms. A term keeps its weight when G or G_dir is 0 or the
    direct term is off. Costs a measurement before the real passes: two more passes over the
    student's (and a dense teacher's) logits without gradients (diagnostics cost one)."""

    def __post_init__(self) -> None:
        for name in ("direct_weight", "indirect_weight", "sequence_weight", "entropy_weight"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TSDKDConfig.{name} must be a finite real >= 0, got {value!r}")
        if not _is_real(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"TSDKDConfig.beta must be in [0, 1], got {self.beta!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"TSDKDConfig.temperature must be a finite real > 0, got {self.temperature!r}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"TSDKDConfig.gate must be one of {GATE_KINDS}, got {self.gate!r}")
        if not _is_real(self.gate_margin) or not math.isfinite(self.gate_margin):
            raise ValueError(f"TSDKDConfig.gate_margin must be a finite real, got {self.gate_margin!r}")
        if self.indirect_level not in INDIRECT_LEVELS:
            raise ValueError(
                f"TSDKDConfig.indirect_level must be one of {INDIRECT_LEVELS}, got {self.indirect_level!r}"
            )
        for name in ("opener_fraction", "entropy_top_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"TSDKDConfig.{name} must be in (0, 1], got {value!r}")
        for name in ("direct_reduction", "entropy_reduction"):
            if getattr(self, name) not in REDUCTIONS:
                raise ValueError(f"TSDKDConfig.{name} must be one of {REDUCTIONS}, got {getattr(self, name)!r}")
        if self.listmle_form not in LISTMLE_FORMS:
            raise ValueError(f"TSDKDConfig.listmle_form must be one of {LISTMLE_FORMS}, got {self.listmle_form!r}")
        for name in ("diagnostics", "listmle_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TSDKDConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.weight_warmup_steps) or self.weight_warmup_steps < 0:
            raise ValueError(
                "TSDKDConfig.weight_warmup_steps must be an integer >= 0 (optimizer steps; 0 = no warm-up), "
                f"got {self.weight_warmup_steps!r}"
            )
        if self.term_balance not in TERM_BALANCES:
            raise ValueError(f"TSDKDConfig.term_balance must be one of {TERM_BALANCES}, got {self.term_balance!r}")
        for name in ("num_candidates", "chunk_size", "sparse_top_k"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"TSDKDConfig.{name} must be an integer >= 1, got {value!r}")

    # ---- which terms are on ------------------------------------------------------
    @property
    def direct_on(self) -> bool:
        return self.direct_weight > 0

    @property
    def entropy_on(self) -> bool:
        return self.entropy_weight > 0

    @property
    def token_level_on(self) -> bool:
        return self.indirect_level in ("token", "both") and self.indirect_weight > 0

    @property
    def sequence_level_on(self) -> bool:
        return self.indirect_level in ("sequence", "both") and self.sequence_weight > 0

    # ---- weight warm-up -----------------------------------------------------------
    def warmup_factor(self, step: int) -> float:
        """min(1, step / weight_warmup_steps) (1 without warm-up): what the extra terms' weights are
        multiplied by at optimizer step `step` (0 for the first optimizer step)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"TSDKDConfig.at_step: step must be an integer >= 0 (optimizer steps taken), got {step!r}")
        if self.weight_warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.weight_warmup_steps)

    def at_step(self, step: int) -> TSDKDConfig:
        """The config in effect at optimizer step `step` (0 for the first): the extra terms' weights
        (EXTRA_WEIGHT_FIELDS; never direct_weight) times warmup_factor(step). Itself when there is no
        warm-up or it is over; otherwise a copy with the scaled weights and weight_warmup_steps = 0,
        so applying at_step to the result again changes nothing."""
        factor = self.warmup_factor(step)
        if factor == 1.0:
            return self
        scaled = {name: getattr(self, name) * factor for name in EXTRA_WEIGHT_FIELDS}
        return replace(self, weight_warmup_steps=0, **scaled)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> TSDKDConfig:
        """The named preset (PRESETS) with `overrides` on top: an explicit value always wins."""
        if preset not in PRESETS:
            raise ValueError(f"TSD-KD preset must be one of {tuple(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset], **overrides})


# Where the paper (its method section, read from a secondary copy; see docs/objective.md) and the
# authors' reference code differ in what the terms average over. Everything not listed is shared
# (beta 0.9, tau 1, c 0.1, k 10, lambda_ent 1, alpha 0.1, the soft gate) and the reference code's
# bugs are fixed in both (suffix ListMLE, per-sequence opener, padding never counted).
PRESETS = {
    "reference": {"direct_reduction": "micro_batch", "entropy_reduction": "micro_batch", "entropy_top_fraction": 0.9},
    "paper": {"direct_reduction": "response", "entropy_reduction": "response", "entropy_top_fraction": 0.1},
}
