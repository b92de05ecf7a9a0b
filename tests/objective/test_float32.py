"""Float32 accuracy at a real vocabulary size: the objective in float32 against the same inputs in float64.

Small vocabularies hide accumulation and cancellation error; they show over tens of thousands of
float32 terms (issue 12: a batched BLAS dot put the JSD's KL sums off by up to 1e-4 relative, the
JSD gradient q((log q - log M) - KL) turned that into percent-level errors, and the chunk size
changed the result). Every input is a float32 value, so the float64 run sees exactly the same
numbers and any difference is the float32 computation's own.
"""

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

VOCAB = 32_000
HIDDEN = 16
CHUNK_SIZES = (1, 3, 10)
CONFIGS = {
    "direct": dict(temperature=0.7, entropy_weight=0.0, indirect_weight=0.0),  # issue 12's repro
    "all terms": dict(indirect_level="both", num_candidates=5, sparse_top_k=64),
}
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
SAMPLED = torch.arange(10).view(2, 5) * 997 % VOCAB


def float32_inputs(kind: str) -> dict:
    """Student/teacher hidden states [2, 5, H] and output embeddings [V, H] in float32.

    random: broad distributions (student entropy ~ 8 nats at tau 0.7), teacher close to the student.
    peaked: sharp distributions (~0.5 nats), teacher half correlated with the student.
    independent: sharp, and the teacher independent of the student, so the student's mass sits
    where the teacher has almost none: the JSD nearly saturates and its true gradient is ~1e-9
    of the terms q (log q - log M) and q KL(q||M) whose difference it is.
    """
    generator = torch.Generator().manual_seed(12)
    h_s = torch.randn(2, 5, HIDDEN, generator=generator)
    w_s = torch.randn(VOCAB, HIDDEN, generator=generator)
    noise_h = torch.randn(2, 5, HIDDEN, generator=generator)
    noise_w = torch.randn(VOCAB, HIDDEN, generator=generator)
    scale, correlation = {"random": (0.4, 0.8), "peaked": (3.0, 0.5), "independent": (3.0, 0.0)}[kind]
    h_t = correlation * h_s + (1 - correlation**2) ** 0.5 * noise_h
    return {"h_s": scale * h_s, "w_s": w_s, "h_t": scale * h_t, "w_t": w_s + 0.3 * noise_w}


def objective(path: str, inputs: dict, cfg: TSDKDConfig, dtype: torch.dtype):
    """(loss, gradient w.r.t. the student's inputs) of one entry point, computed in `dtype`."""
    kwargs = dict(shared_vocab_size=VOCAB, sampled_ids=SAMPLED, group_size=2)
    if path == "plain":
        logits = inputs["student_logits"].to(dtype, copy=True).requires_grad_(True)
        teacher = TeacherSignals(logits=inputs["teacher_logits"].to(dtype))
        loss, _ = tsdkd_loss(logits, teacher, MASK, cfg, **kwargs)
        loss.backward()
        return float(loss), logits.grad.double()
    h = inputs["h_s"].to(dtype, copy=True).requires_grad_(True)
    w = inputs["w_s"].to(dtype, copy=True).requires_grad_(True)
    if path == "fused":
        teacher = TeacherSignals(hidden=inputs["h_t"].to(dtype), lm_head_weight=inputs["w_t"].to(dtype))
    else:  # sparse signals travel as they are (built once, in float32)
        teacher = inputs["signals"]
    loss, _ = tsdkd_loss_fused(h, w, teacher, MASK, cfg, **kwargs)
    loss.backward()
    return float(loss), torch.cat([h.grad.flatten(), w.grad.flatten()]).double()


def path_inputs(path: str, kind: str, cfg: TSDKDConfig) -> dict:
    inputs = float32_inputs(kind)
    if path == "fused":
        return inputs
    student_logits = inputs["h_s"] @ inputs["w_s"].t()
    teacher_logits = inputs["h_t"] @ inputs["w_t"].t()
    if path == "plain":  # logits made once in float32; the float64 run gets exactly these values
        return {"student_logits": student_logits, "teacher_logits": teacher_logits}
    candidates = torch.topk(student_logits, cfg.num_candidates).indices
    inputs["signals"] = teacher_signals_from_logits(
        teacher_logits, cfg, mask=MASK, shared_vocab_size=VOCAB, candidate_ids=candidates, sampled_ids=SAMPLED
    )
    return inputs


def max_normalised(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# The sparse transport with every term on (its direct term alone adds nothing the others lack).
PATHS_AND_CONFIGS = [("plain", "direct"), ("plain", "all terms"), ("fused", "direct"), ("fused", "all terms"),
                     ("sparse", "all terms")]  # fmt: skip


@pytest.mark.parametrize("path, config_name", PATHS_AND_CONFIGS)
@pytest.mark.parametrize("kind", ["random", "peaked", "independent"])
def test_float32_matches_float64_for_every_chunk_size(path, config_name, kind):
    configs = {chunk: TSDKDConfig(chunk_size=chunk, **CONFIGS[config_name]) for chunk in CHUNK_SIZES}
    inputs = path_inputs(path, kind, configs[CHUNK_SIZES[0]])
    loss64, grad64 = objective(path, inputs, configs[CHUNK_SIZES[-1]], torch.float64)
    results = {chunk: objective(path, inputs, cfg, torch.float32) for chunk, cfg in configs.items()}
    for chunk, (loss32, grad32) in results.items():
        assert abs(loss32 - loss64) <= 1e-5 * abs(loss64), f"chunk {chunk}: loss {loss32} vs float64 {loss64}"
        error = max_normalised(grad32, grad64)
        assert error <= 1e-4, f"chunk {chunk}: gradient off by {error:.1e} (max-normalised)"
    # Chunking changes nothing beyond float32 rounding. The fused path makes each chunk's logits
    # (hidden @ W) itself, and how a BLAS kernel blocks a matmul of another shape depends on the CPU:
    # the saturated JSD ("independent") differed by 1.16e-5 between chunk sizes on an AMD EPYC, by
    # less than 1e-5 on an Intel Xeon. Issue 12's bug made percent-level differences.
    chunk_bound = 3e-5 if path == "fused" else 1e-5
    first_loss, first_grad = results[CHUNK_SIZES[0]]
    for chunk in CHUNK_SIZES[1:]:
        loss32, grad32 = results[chunk]
        assert abs(loss32 - first_loss) <= 2e-6 * abs(first_loss), f"chunk {chunk} vs {CHUNK_SIZES[0]}: loss"
        error = max_normalised(grad32, first_grad)
        assert error <= chunk_bound, f"chunk {chunk} vs {CHUNK_SIZES[0]}: gradient differs by {error:.1e}"
