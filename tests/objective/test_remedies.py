"""The opt-in remedies (docs/objective.md, "Remedies"): ListMLE normalized by log(k!) / log(n!),
the extra terms' weight warm-up (TSDKDConfig.at_step) and the per-micro-batch gradient-norm
balance (term_balance="grad_norm"); against the naive float64 reference and autograd, on both
entry points; and all three off by default, changing nothing."""

from __future__ import annotations

import math

import pytest
import torch

from tsdkd_plugin.objective import (
    BALANCE_KEYS,
    DIAGNOSTIC_KEYS,
    METRIC_KEYS,
    TeacherSignals,
    TSDKDConfig,
    listmle,
    tsdkd_loss,
    tsdkd_loss_fused,
)
from tsdkd_plugin.objective.listmle import listmle_normalizer

# naive reference's term names -> (config weight field, metric name)
EXTRA_TERMS = {
    "entropy": ("entropy_weight", "entropy"),
    "token": ("indirect_weight", "indirect_token"),
    "sequence": ("sequence_weight", "indirect_sequence"),
}


def log_factorial(n: int) -> float:
    return math.log(math.factorial(n))


def fused_batch(seed: int, *, batch_size: int = 4, seqlen: int = 7, rows: int = 27, shared: int = 25):
    """Student hidden states and output weight (logits = h @ W.T), dense teacher logits, a mask with
    a prompt prefix and padding, sampled ids."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seqlen, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(rows, 5, generator=generator, dtype=torch.float64) * 1.2
    teacher = torch.randn(batch_size, seqlen, rows + 2, generator=generator, dtype=torch.float64) * 2
    mask = torch.ones(batch_size, seqlen)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    sampled = torch.randint(0, shared, (batch_size, seqlen), generator=generator)
    return {"hidden": hidden, "weight": weight, "student": hidden @ weight.t(), "teacher": teacher, "mask": mask,
            "sampled": sampled, "shared": shared}  # fmt: skip


def run_objective(batch, cfg, path, *, group_size=2, teacher=None):
    """(loss, metrics, gradients) of the code under test: [d/d logits] (plain) or [d/d hidden, d/d W]."""
    teacher = teacher or TeacherSignals(logits=batch["teacher"])
    kwargs = dict(shared_vocab_size=batch["shared"], sampled_ids=batch["sampled"], group_size=group_size)
    if path == "plain":
        logits = batch["student"].clone().requires_grad_(True)
        loss, metrics = tsdkd_loss(logits, teacher, batch["mask"], cfg, **kwargs)
        inputs = [logits]
    else:
        inputs = [batch["hidden"].clone().requires_grad_(True), batch["weight"].clone().requires_grad_(True)]
        loss, metrics = tsdkd_loss_fused(*inputs, teacher, batch["mask"], cfg, **kwargs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), metrics, grads


def naive_terms(batch, cfg, reference, path, *, group_size=2):
    """The naive reference's unweighted terms, with the inputs they are differentiated by."""
    if path == "plain":
        inputs = [batch["student"].clone().requires_grad_(True)]
        logits = inputs[0]
    else:
        inputs = [batch["hidden"].clone().requires_grad_(True), batch["weight"].clone().requires_grad_(True)]
        logits = inputs[0] @ inputs[1].t()
    _, terms = reference.loss(
        logits, batch["teacher"], batch["mask"], cfg, shared=batch["shared"], sampled_ids=batch["sampled"],
        group_size=group_size, return_terms=True,
    )  # fmt: skip
    return terms, inputs, logits


def naive_total(terms, weights):
    return sum(weights[name] * terms[name] for name in ("direct", *EXTRA_TERMS))


def assert_all_close(actual, expected, assert_close, what):
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, what=f"{what} [{index}]")


# ----------------------------------------------------------------------------- ListMLE normalized


def test_the_normalizer_is_the_listmle_at_equal_scores():
    for n in (2, 3, 4, 10, 50):
        assert listmle_normalizer(n) == pytest.approx(log_factorial(n), rel=1e-13)
        assert float(listmle(torch.zeros(n, dtype=torch.float64))) == pytest.approx(log_factorial(n), rel=1e-13)
    assert listmle_normalizer(1) == 1.0  # log 1! = 0: divide by 1, not 0


@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_normalized_listmle_matches_the_naive_reference(path, preset, reference, assert_close):
    """Loss, metrics and gradient with the token-level term / log(k!) and the sequence-level / log(n!)."""
    k, n = 3, 4
    batch = fused_batch(1, batch_size=8)
    cfg = TSDKDConfig.from_preset(
        preset, num_candidates=k, indirect_level="both", sequence_weight=0.5, temperature=1.2, chunk_size=5,
        listmle_normalize=True,
    )  # fmt: skip
    loss, metrics, grads = run_objective(batch, cfg, path, group_size=n)
    terms, inputs, _ = naive_terms(batch, cfg, reference, path, group_size=n)
    divisors = {"direct": 1.0, "entropy": 1.0, "token": log_factorial(k), "sequence": log_factorial(n)}
    weights = {"direct": cfg.direct_weight, **{name: getattr(cfg, field) for name, (field, _) in EXTRA_TERMS.items()}}
    expected = naive_total({name: terms[name] / divisors[name] for name in terms}, weights)
    assert_close(loss, expected, what="loss")
    assert_all_close(grads, torch.autograd.grad(expected, inputs), assert_close, "gradient")
    assert metrics["loss_indirect_token"] == pytest.approx(float(terms["token"]) / log_factorial(k), rel=1e-10)
    assert metrics["loss_indirect_sequence"] == pytest.approx(float(terms["sequence"]) / log_factorial(n), rel=1e-10)
    # Against the un-normalized objective: each ListMLE and its gradient divided, nothing else changed.
    plain_cfg = TSDKDConfig(**{**cfg.to_dict(), "listmle_normalize": False})
    _, raw, _ = run_objective(batch, plain_cfg, path, group_size=n)
    assert metrics["loss_indirect_token"] == pytest.approx(raw["loss_indirect_token"] / log_factorial(k), rel=1e-12)
    assert metrics["loss_direct"] == raw["loss_direct"] and metrics["loss_entropy"] == raw["loss_entropy"]


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_normalized_listmle_passes_gradcheck(path):
    batch = fused_batch(2, batch_size=4, seqlen=5, rows=9, shared=8)
    # The soft gate is stop-gradient by design (finite differences would see it move); the hard gate,
    # like the selections, is locally constant (as in test_fused.py's gradcheck).
    cfg = TSDKDConfig(
        num_candidates=3, indirect_level="both", chunk_size=3, entropy_top_fraction=0.6, gate="hard", beta=0.7,
        listmle_normalize=True,
    )  # fmt: skip
    teacher = TeacherSignals(logits=batch["teacher"])
    kwargs = dict(shared_vocab_size=8, sampled_ids=batch["sampled"], group_size=2)

    def plain(logits):
        return tsdkd_loss(logits, teacher, batch["mask"], cfg, **kwargs)[0]

    def fused(hidden, weight):  # x 2: gradcheck backpropagates one graph several times (see test_fused.py)
        return tsdkd_loss_fused(hidden, weight, teacher, batch["mask"], cfg, **kwargs)[0] * 2.0

    if path == "plain":
        inputs, fn = (batch["student"].clone().requires_grad_(True),), plain
    else:
        inputs, fn = (batch["hidden"].clone().requires_grad_(True), batch["weight"].clone().requires_grad_(True)), fused
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- weight warm-up


def test_at_step_scales_the_extra_weights_only():
    cfg = TSDKDConfig(
        direct_weight=0.7, entropy_weight=0.8, indirect_weight=0.2, sequence_weight=0.4, weight_warmup_steps=8
    )
    for step, factor in ((0, 0.0), (4, 0.5), (8, 1.0), (16, 1.0), (2, 0.25)):
        assert cfg.warmup_factor(step) == factor
        got = cfg.at_step(step)
        assert (got.entropy_weight, got.indirect_weight, got.sequence_weight) == (
            0.8 * factor,
            0.2 * factor,
            0.4 * factor,
        )
        assert got.direct_weight == 0.7
        unchanged = {"entropy_weight", "indirect_weight", "sequence_weight", "weight_warmup_steps"}
        assert {k: v for k, v in got.to_dict().items() if k not in unchanged} == {
            k: v for k, v in cfg.to_dict().items() if k not in unchanged
        }
    assert cfg.at_step(8) is cfg and cfg.at_step(100) is cfg  # the warm-up is over
    assert TSDKDConfig(weight_warmup_steps=3).at_step(1).indirect_weight == 0.1 * (1 / 3)
    # Applying it twice does not warm up twice: the result says it is already warmed up.
    once = cfg.at_step(2)
    assert once.weight_warmup_steps == 0 and once.at_step(2) is once


def test_without_warmup_at_step_is_the_config_itself():
    cfg = TSDKDConfig(indirect_level="both")
    for step in (0, 1, 7, 10**9):
        assert cfg.at_step(step) is cfg and cfg.warmup_factor(step) == 1.0


@pytest.mark.parametrize("step", [-1, 1.5, True, "3", None])
def test_at_step_rejects_what_is_not_a_step(step):
    with pytest.raises(ValueError, match=r"TSDKDConfig.at_step: step must be an integer >= 0"):
        TSDKDConfig(weight_warmup_steps=4).at_step(step)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        TSDKDConfig().at_step(step)  # checked without a warm-up too: a caller's bug shows at once


def test_the_warmed_up_config_is_what_the_loss_uses(make_batch, plain_loss):
    batch = make_batch(4, 6, 20, seed=3)
    cfg = TSDKDConfig(num_candidates=4, indirect_level="both", weight_warmup_steps=4, chunk_size=5)
    explicit = TSDKDConfig(
        num_candidates=4, indirect_level="both", chunk_size=5, entropy_weight=0.75, indirect_weight=0.1 * 0.75,
        sequence_weight=0.1 * 0.75,
    )  # fmt: skip
    warm, explicit_run = plain_loss(batch, cfg.at_step(3), group_size=2), plain_loss(batch, explicit, group_size=2)
    assert torch.equal(warm[0], explicit_run[0]) and torch.equal(warm[2], explicit_run[2])
    first = plain_loss(batch, cfg.at_step(0), group_size=2)  # step 0: the direct term alone
    assert first[1]["loss"] == first[1]["loss_direct"]


# ----------------------------------------------------------------------------- gradient-norm balance


def naive_balance(batch, cfg, reference, path, *, group_size=2):
    """Independently of the code under test: each term's gradient at the logits by autograd on the
    naive reference, G_dir = |d(w_dir L_dir)/dz|, G_t = |dL_t/dz|, the weights w_t * G_dir / G_t,
    and the total with those weights fixed. Returns (total, its gradient, {term: G_dir / G_t})."""
    terms, inputs, logits = naive_terms(batch, cfg, reference, path, group_size=group_size)

    def norm_at_logits(value):
        return float(torch.autograd.grad(value, logits, retain_graph=True)[0].norm())

    g_dir = norm_at_logits(cfg.direct_weight * terms["direct"])
    on = {"entropy": cfg.entropy_on, "token": cfg.token_level_on, "sequence": cfg.sequence_level_on}
    scales, weights = {}, {"direct": cfg.direct_weight}
    for name, (field, _) in EXTRA_TERMS.items():
        g_t = norm_at_logits(terms[name]) if on[name] else 0.0
        scales[name] = g_dir / g_t if on[name] and g_t > 0 and g_dir > 0 else 1.0
        weights[name] = getattr(cfg, field) * scales[name] if on[name] else 0.0
    total = naive_total(terms, weights)
    return total.detach(), torch.autograd.grad(total, inputs), scales


@pytest.mark.parametrize("diagnostics", [False, True])
@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_balance_equals_the_objective_at_fixed_weights(preset, path, diagnostics, reference, assert_close):
    batch = fused_batch(3)
    cfg = TSDKDConfig.from_preset(
        preset, num_candidates=4, indirect_level="both", sequence_weight=0.5, temperature=1.2, chunk_size=5,
        direct_weight=0.7, term_balance="grad_norm", diagnostics=diagnostics,
    )  # fmt: skip
    loss, metrics, grads = run_objective(batch, cfg, path)
    expected_loss, expected_grads, scales = naive_balance(batch, cfg, reference, path)
    assert_close(loss, expected_loss, what="loss")
    assert_all_close(grads, expected_grads, assert_close, "gradient")
    for name, (_, metric) in EXTRA_TERMS.items():
        assert metrics[f"balance_scale_{metric}"] == pytest.approx(scales[name], rel=1e-9), name
    assert all(abs(math.log(scale)) > 0.1 for scale in scales.values())  # the balance changed every weight
    assert set(metrics) == set(METRIC_KEYS) | set(BALANCE_KEYS) | (set(DIAGNOSTIC_KEYS) if diagnostics else set())


@pytest.mark.parametrize("extra", ["entropy", "token", "sequence"])
def test_each_balanced_term_has_its_weight_times_the_direct_terms_gradient_norm(extra, make_batch, plain_loss):
    """Measured by autograd on the code under test: (balanced direct + term) minus (direct alone)."""
    batch = make_batch(4, 6, 20, seed=7)
    base = dict(num_candidates=4, indirect_level="both", chunk_size=5, temperature=0.8, direct_weight=0.6)
    weights = {"entropy_weight": 0.0, "indirect_weight": 0.0, "sequence_weight": 0.0}
    field = EXTRA_TERMS[extra][0]
    direct = plain_loss(batch, TSDKDConfig(**base, **weights), group_size=2)[2]
    cfg = TSDKDConfig(**base, **{**weights, field: 0.3}, term_balance="grad_norm")
    _, metrics, both = plain_loss(batch, cfg, group_size=2)
    assert float((both - direct).norm()) == pytest.approx(0.3 * float(direct.norm()), rel=1e-9)
    assert metrics[f"balance_scale_{EXTRA_TERMS[extra][1]}"] != 1.0
    assert all(metrics[key] == 1.0 for key in BALANCE_KEYS if key != f"balance_scale_{EXTRA_TERMS[extra][1]}")


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_balanced_diagnostics_show_the_weights_as_gradient_norm_ratios(path):
    batch = fused_batch(4)
    cfg = TSDKDConfig.from_preset(
        "paper", num_candidates=4, indirect_level="both", entropy_weight=0.5, indirect_weight=0.2, sequence_weight=0.3,
        term_balance="grad_norm", diagnostics=True, chunk_size=4,
    )  # fmt: skip
    _, metrics, _ = run_objective(batch, cfg, path)
    direct = metrics["diag_grad_norm_direct"]
    for name, (field, metric) in EXTRA_TERMS.items():
        assert metrics[f"diag_grad_norm_{metric}"] == pytest.approx(getattr(cfg, field) * direct, rel=1e-9), name


def test_balance_makes_the_listmle_normalization_irrelevant(make_batch, plain_loss, assert_close):
    """w * G_dir / G_t times L_t does not depend on a constant factor in L_t."""
    batch = make_batch(4, 6, 20, seed=8)
    runs = [
        plain_loss(batch, TSDKDConfig(num_candidates=4, indirect_level="both", term_balance="grad_norm",
                                      listmle_normalize=normalize), group_size=2)
        for normalize in (False, True)
    ]  # fmt: skip
    assert_close(runs[1][2], runs[0][2], what="gradient")
    ratio = runs[1][1]["balance_scale_indirect_token"] / runs[0][1]["balance_scale_indirect_token"]
    assert ratio == pytest.approx(log_factorial(4), rel=1e-9)


def test_balance_keeps_a_weight_whose_gradient_is_zero_and_without_a_direct_gradient(make_batch, plain_loss):
    batch = make_batch(4, 6, 20, seed=9)
    batch["mask"][1] = 0  # each group of two has one rankable response: L_seq has no gradient
    batch["mask"][3] = 0
    cfg = TSDKDConfig(num_candidates=4, indirect_level="both", term_balance="grad_norm")
    _, metrics, _ = plain_loss(batch, cfg, group_size=2)
    assert metrics["balance_scale_indirect_sequence"] == 1.0 and metrics["balance_scale_entropy"] != 1.0
    # A hard gate that keeps no token: the direct term is on but has no gradient; every weight as configured.
    closed = dict(num_candidates=4, indirect_level="both", gate="hard", gate_margin=1e3)
    balanced = plain_loss(batch, TSDKDConfig(**closed, term_balance="grad_norm"), group_size=2)
    unbalanced = plain_loss(batch, TSDKDConfig(**closed), group_size=2)
    assert all(balanced[1][key] == 1.0 for key in BALANCE_KEYS)
    assert torch.equal(balanced[0], unbalanced[0]) and torch.equal(balanced[2], unbalanced[2])
    # The direct term off: nothing to balance against.
    off = TSDKDConfig(num_candidates=4, direct_weight=0.0, term_balance="grad_norm")
    assert all(plain_loss(batch, off)[1][key] == 1.0 for key in BALANCE_KEYS)


def test_balance_on_the_sparse_transport_equals_dense_with_the_whole_vocabulary(make_batch, sparse_vs_dense):
    batch = make_batch(4, 6, 20, seed=10)
    cfg = TSDKDConfig(num_candidates=3, sparse_top_k=20, indirect_level="both", term_balance="grad_norm")
    dense, got = sparse_vs_dense(batch, cfg)
    for key in ("loss", *BALANCE_KEYS):  # sparse fields travel as float32
        assert got[key] == pytest.approx(dense[key], rel=1e-5), key


def test_an_all_masked_batch_reports_unchanged_weights(make_batch):
    batch = make_batch(2, 4, 9, seed=6)
    cfg = TSDKDConfig(num_candidates=3, term_balance="grad_norm")
    _, metrics = tsdkd_loss(
        batch["student"], TeacherSignals(logits=batch["teacher"]), torch.zeros(2, 4), cfg, shared_vocab_size=9
    )
    assert set(metrics) == set(METRIC_KEYS) | set(BALANCE_KEYS)
    assert all(metrics[key] == 1.0 for key in BALANCE_KEYS) and not any(metrics[key] for key in METRIC_KEYS)


# ----------------------------------------------------------------------------- off by default


def golden_batch():
    """The batch the expected values below were computed on (the objective before the remedies)."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 9, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, 6, generator=generator, dtype=torch.float64) * 1.5
    teacher = torch.randn(4, 9, 41, generator=generator, dtype=torch.float64) * 2
    mask = torch.ones(4, 9)
    mask[1, 6:] = 0
    mask[2, :2] = 0
    sampled = torch.randint(0, 38, (4, 9), generator=generator)
    return {"hidden": hidden, "weight": weight, "student": hidden @ weight.t(), "teacher": teacher, "mask": mask,
            "sampled": sampled, "shared": 38}  # fmt: skip


# (config, path): loss, then per gradient sum(g^2) and sum(g * c) with c = (flat index mod 7) - 3. Computed
# by the objective as of commit 18ba457 (before the remedies existed), float64; the defaults must give
# them still (to rounding of the reduction order, which may differ between CPUs).
GOLDEN = {
    ("default", "plain"): (1.9998616730132526, 0.01164550781556277, -0.1852796189480491),
    ("default", "fused"): (1.9998616730132526, 0.1612047283309364, 0.9861829830002081, 0.06588712250925254,
                           -0.9367220985473442),
    ("both", "plain"): (3.562911043348609, 0.026015779840382666, 0.26205425733794846),
    ("paper-both-diag", "fused"): (3.0031476696448167, 0.7177920947587119, 2.5067133259942658, 0.13688944619393933,
                                   -1.2011961392546362),
}  # fmt: skip
GOLDEN_CONFIGS = {
    "default": lambda: TSDKDConfig(num_candidates=4),
    "both": lambda: TSDKDConfig(num_candidates=4, indirect_level="both", sequence_weight=0.5, temperature=1.3,
                                chunk_size=5),
    "paper-both-diag": lambda: TSDKDConfig.from_preset("paper", num_candidates=4, indirect_level="both",
                                                       diagnostics=True, chunk_size=4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GOLDEN))
def test_the_defaults_give_what_the_objective_gave_before_the_remedies(case, monkeypatch):
    from tsdkd_plugin.objective import engine

    def never(*args, **kwargs):
        raise AssertionError("term_balance 'none' must not measure anything")

    monkeypatch.setattr(engine, "_balance_scales", never)
    name, path = case
    cfg = GOLDEN_CONFIGS[name]()
    assert (cfg.listmle_normalize, cfg.weight_warmup_steps, cfg.term_balance) == (False, 0, "none")
    assert cfg.at_step(0) is cfg
    loss, metrics, grads = run_objective(golden_batch(), cfg, path)
    got = [float(loss)]
    for grad in grads:
        weights = torch.arange(grad.numel(), dtype=torch.float64).reshape(grad.shape) % 7 - 3
        got += [float((grad * grad).sum()), float((grad * weights).sum())]
    assert got == pytest.approx(GOLDEN[case], rel=1e-13, abs=0)
    assert not set(BALANCE_KEYS) & set(metrics)
