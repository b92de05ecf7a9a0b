"""GPU check of the CUDA code paths that CPU CI cannot exercise (not a test; run by gpu_check.sh).

    python3 benchmarks/gpu_check.py --out DIR            # on a CUDA machine, paper-scale vocabulary
    python benchmarks/gpu_check.py --smoke --out DIR     # tiny sizes on CPU, to try the script itself

Needs only torch and transformers (the objective and model_io are torch-only), so it
runs on a bare GPU image without OpenRLHF, DeepSpeed or Ray. It writes
DIR/gpu_check.json and DIR/gpu_check.md. Sections:

1. loss accuracy at Qwen2.5's vocabulary (151,936) and the 1.5B student's hidden size:
   tsdkd_loss / tsdkd_loss_fused (fp32 and bf16, dense and sparse teacher) against
   the naive objective of loss_bench.py computed in float64 on the GPU; loss and
   gradient errors (relative norm, cosine).
2. gradcheck of tsdkd_loss in float64 on the GPU (small vocabulary).
3. memory and time of one forward+backward on the GPU: naive fp32 (full logits,
   autograd) vs fused bf16 (dense teacher hidden+W, and sparse K=64 transport),
   as ratios measured side by side in this run; OOM is reported, not fatal.
4. teacher scoring: a randomly initialized Qwen2-architecture causal LM with the
   151,936 vocabulary in bf16 (sdpa; flash-attention 2 if installed) through
   model_io.response_hidden_states + teacher_signals_from_hidden, against the
   same weights in fp32 and against the HF model's own logits; sequence-score
   ranking agreement; tokens/s.
5. the LoRA merge for the vLLM sync in bf16, against PEFT's merge_and_unload.
6. Gemma-2's output head (final-logit softcapping, cap 30) in bf16 at Gemma-2's 256,000-token
   vocabulary: the plugin's teacher path (hidden states -> fp32 logits -> softcap) against HF's
   own fp32 forward().logits, beside HF's bf16 logits and the identity head (no softcap).

    python3 benchmarks/gpu_check.py --out DIR --sections gemma2_softcap   # one section only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from loss_bench import make_inputs, naive_tsdkd  # noqa: E402
from tsdkd_plugin.host.model_io import response_hidden_states  # noqa: E402
from tsdkd_plugin.objective import chunking  # noqa: E402
from tsdkd_plugin.objective import (  # noqa: E402
    TeacherSignals,
    TSDKDConfig,
    teacher_signals_from_hidden,
    tsdkd_loss,
    tsdkd_loss_fused,
)



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(num_tokens, vocab, hidden, device):
    """loss_bench's deterministic inputs (same seeds and scales), moved to the device."""
    x = make_inputs(num_tokens, vocab, hidden, teacher=True)
    short = {"student_hidden": "h", "student_weight": "w", "teacher_hidden": "th", "teacher_weight": "tw",
             "mask": "mask"}  # fmt: skip
    return {name: x[key].to(device) for key, name in short.items()}


def student_candidates(h, w, k, chunk=1024):
    """Student top-k ids per position, chunk by chunk (what vLLM's logprobs give in training)."""
    rows = h.reshape(-1, h.shape[-1])
    ids = [torch.topk(rows[i : i + chunk] @ w.t(), k, dim=-1).indices for i in range(0, rows.shape[0], chunk)]
    return torch.cat(ids).view(*h.shape[:2], k)


def leaf(tensor, dtype=None):
    """A fresh leaf copy that collects its own gradient."""
    return tensor.detach().to(dtype or tensor.dtype).clone().requires_grad_(True)


@contextlib.contextmanager
def fp32_logits_from_low_precision(enabled: bool):
    """Switch the objective's fp32-output matmul for bf16 operands (chunking.HiddenRows) on or off,
    to measure what it changes against the previous behaviour (bf16 logits, then upcast)."""
    saved = chunking._MM_WITH_OUT_DTYPE
    chunking._MM_WITH_OUT_DTYPE = saved and enabled
    try:
        yield
    finally:
        chunking._MM_WITH_OUT_DTYPE = saved


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# ----------------------------------------------------------------------------- 1. accuracy


OBJECTIVES = {
    "default": TSDKDConfig(),
    # The token-level ListMLE re-ranks the student's top-k candidates: bf16 logits tie or
    # reorder near-equal candidates, a discrete change; without it the rest is continuous.
    "without ListMLE": TSDKDConfig(indirect_weight=0.0),
}


def loss_accuracy(device, vocab, hidden, num_tokens, objective):
    cfg = OBJECTIVES[objective]
    x = inputs(num_tokens, vocab, hidden, device)

    def reference(dtype):
        """The naive objective in float64 (plain autograd) on inputs first rounded to dtype."""
        h64, w64 = leaf(x["h"].to(dtype), torch.float64), leaf(x["w"].to(dtype), torch.float64)
        with torch.no_grad():
            t_logits64 = x["th"].to(dtype).double() @ x["tw"].to(dtype).double().t()
        loss = naive_tsdkd(h64 @ w64.t(), t_logits64, cfg)
        loss.backward()
        result = float(loss.detach()), h64.grad.detach(), w64.grad.detach()
        del h64, w64, t_logits64, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result

    # A bf16 path is compared with the float64 objective of its own (bf16-rounded) inputs:
    # the rounding moves discrete choices (the entropy top fraction, the student's top-k
    # candidates), so the float32 inputs' reference would charge that to the kernels.
    references = {torch.float32: reference(torch.float32), torch.bfloat16: reference(torch.bfloat16)}
    ref_loss, ref_gh, ref_gw = references[torch.float32]

    rows = []

    def record(name, loss, gh, gw):
        ref_loss, ref_gh, ref_gw = references[gh.dtype]
        rows.append({
            "objective": objective, "path": name, "loss": float(loss.detach()), "loss_rel_err": abs(float(loss.detach()) - ref_loss) / abs(ref_loss),
            "grad_hidden_rel_err": rel(gh, ref_gh), "grad_weight_rel_err": rel(gw, ref_gw),
            "grad_hidden_cos": cos(gh, ref_gh), "grad_weight_cos": cos(gw, ref_gw),
            "finite": bool(torch.isfinite(gh).all() and torch.isfinite(gw).all()),
        })  # fmt: skip

    # plain entry point, fp32 logits
    h = leaf(x["h"])
    w = leaf(x["w"])
    with torch.no_grad():
        t_logits = x["th"] @ x["tw"].t()
    loss, _ = tsdkd_loss(h @ w.t(), TeacherSignals(logits=t_logits), x["mask"], cfg, shared_vocab_size=vocab)
    loss.backward()
    record("plain fp32 (full logits)", loss, h.grad, w.grad)
    del t_logits

    for dtype, label, fp32_logits in ((torch.float32, "fp32", True), (torch.bfloat16, "bf16", True),
                                      (torch.bfloat16, "bf16 with bf16-rounded logits (before)", False)):
        h = leaf(x["h"], dtype)
        w = leaf(x["w"], dtype)
        teacher = TeacherSignals(hidden=x["th"].to(dtype), lm_head_weight=x["tw"].to(dtype))
        with fp32_logits_from_low_precision(fp32_logits):
            loss, _ = tsdkd_loss_fused(h, w, teacher, x["mask"], cfg, shared_vocab_size=vocab)
            loss.backward()
        record(f"fused {label}, dense teacher (hidden + W)", loss.detach(), h.grad, w.grad)

    # sparse transport built by the teacher side in bf16, student fused bf16
    h = leaf(x["h"], torch.bfloat16)
    w = leaf(x["w"], torch.bfloat16)
    candidates = student_candidates(h.detach(), w.detach(), cfg.num_candidates)
    signals = teacher_signals_from_hidden(
        x["th"].bfloat16(), x["tw"].bfloat16(), cfg, mask=x["mask"], shared_vocab_size=vocab, candidate_ids=candidates
    )
    loss, _ = tsdkd_loss_fused(h, w, signals, x["mask"], cfg, shared_vocab_size=vocab)
    loss.backward()
    record(f"fused bf16, sparse teacher (K={cfg.sparse_top_k}, built in bf16)", loss, h.grad, w.grad)
    return {"objective": objective, "reference_loss_fp64": ref_loss,
            "reference_loss_fp64_bf16_inputs": references[torch.bfloat16][0], "tokens": num_tokens, "vocab": vocab,
            "hidden": hidden, "rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------- 2. gradcheck


def gradcheck(device):
    # The soft gate is stop-gradient by design (finite differences would see it move), so
    # the check uses the hard gate, which like the selections is locally constant.
    cfg = TSDKDConfig(num_candidates=3, chunk_size=3, indirect_level="both", entropy_top_fraction=0.6, gate="hard",
                      beta=0.7)  # fmt: skip
    generator = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    h_s, w_s, h_t, w_t = r(2, 4, 3), r(11, 3), r(2, 4, 3), r(12, 3)
    mask = torch.ones(2, 4, device=device)
    sampled = torch.randint(0, 10, (2, 4), generator=generator).to(device)
    teacher = TeacherSignals(hidden=h_t, lm_head_weight=w_t)
    kwargs = dict(shared_vocab_size=10, sampled_ids=sampled, group_size=2)

    def plain(logits):
        return tsdkd_loss(logits, teacher, mask, cfg, **kwargs)[0]

    def fused(hidden, weight):
        return tsdkd_loss_fused(hidden, weight, teacher, mask, cfg, **kwargs)[0] * 2.0

    return {
        "plain_float64": bool(torch.autograd.gradcheck(plain, (leaf(h_s @ w_s.t()),), eps=1e-6, atol=1e-7)),
        "fused_float64": bool(torch.autograd.gradcheck(fused, (leaf(h_s), leaf(w_s)), eps=1e-6, atol=1e-7)),
    }


# ----------------------------------------------------------------------------- 3. memory / time


# the fused path as it was before fp32 logits from bf16 operands (bf16 logits, then upcast)
BF16_LOGITS_BEFORE = "fused bf16 dense, bf16-rounded logits (before)"


def one_step(name, x, vocab, cfg, device):
    if name == "naive fp32":
        h = leaf(x["h"])
        w = leaf(x["w"])
        with torch.no_grad():
            t_logits = x["th"] @ x["tw"].t()
        loss = naive_tsdkd(h @ w.t(), t_logits, cfg)
    elif name in ("fused bf16 dense", BF16_LOGITS_BEFORE):
        h = leaf(x["h"], torch.bfloat16)
        w = leaf(x["w"], torch.bfloat16)
        teacher = TeacherSignals(hidden=x["th"].bfloat16(), lm_head_weight=x["tw"].bfloat16())
        with fp32_logits_from_low_precision(name != BF16_LOGITS_BEFORE):
            loss, _ = tsdkd_loss_fused(h, w, teacher, x["mask"], cfg, shared_vocab_size=vocab)
    elif name == "fused bf16 sparse":
        h = leaf(x["h"], torch.bfloat16)
        w = leaf(x["w"], torch.bfloat16)
        loss, _ = tsdkd_loss_fused(h, w, x["signals"], x["mask"], cfg, shared_vocab_size=vocab)
    else:
        raise ValueError(name)
    loss.backward()
    return float(loss.detach())


def timed_peak(step, device, repeats: int, peak_key: str) -> dict:
    """`step()` (returns the loss) once to warm up (allocator, kernels), then `repeats` times:
    {"loss", "seconds_median", peak_key: GiB allocated above what existed before the timed steps
    (CUDA only)}, or {"error"} when it runs out of memory."""
    row = {}
    try:
        step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            row["loss"] = step()
            sync(device)
            times.append(time.perf_counter() - start)
        row["seconds_median"] = sorted(times)[len(times) // 2]
        if device.type == "cuda":
            row[peak_key] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError as error:
        row["error"] = "out of memory: " + str(error).splitlines()[0][:160]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def memory_time(device, vocab, hidden, sizes, repeats):
    cfg = TSDKDConfig()
    results = []
    for n in sizes:
        x = inputs(n, vocab, hidden, device)
        with torch.no_grad():
            h16, w16 = x["h"].bfloat16(), x["w"].bfloat16()
            x["signals"] = teacher_signals_from_hidden(
                x["th"].bfloat16(), x["tw"].bfloat16(), cfg, mask=x["mask"], shared_vocab_size=vocab,
                candidate_ids=student_candidates(h16, w16, cfg.num_candidates),
            )  # fmt: skip
            del h16, w16
        for name in ("naive fp32", "fused bf16 dense", BF16_LOGITS_BEFORE, "fused bf16 sparse"):
            row = {"tokens": n, "path": name}
            row.update(timed_peak(lambda: one_step(name, x, vocab, cfg, device), device, repeats, "peak_gib_above_inputs"))
            results.append(row)
            print(json.dumps(row), flush=True)
        del x
    return results


# ----------------------------------------------------------------------------- 4. teacher scoring


def bf16_twin(model32, config, attn, device):
    """The same weights in bf16 (built in bf16, not cast: the model class keeps its own buffers' dtypes)."""
    model16 = type(model32)._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    model16.load_state_dict({k: v.bfloat16() for k, v in model32.state_dict().items()})
    return model16.to(device).eval()


def left_padded_sequences(generator, vocab, batch, prompt_len, response_len, device):
    """Random token ids and an attention mask with left padding of different lengths per row,
    as OpenRLHF's batches have."""
    total = prompt_len + response_len
    sequences = torch.randint(0, vocab, (batch, total), generator=generator).to(device)
    attention_mask = torch.ones(batch, total, dtype=torch.long, device=device)
    for row in range(batch):
        attention_mask[row, : (row * 7) % (prompt_len // 2)] = 0
    return sequences, attention_mask


def teacher_scoring(device, vocab, hidden, layers, batch, prompt_len, response_len, group):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = TSDKDConfig()
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model32 = Qwen2ForCausalLM(config).to(device).eval()
    with torch.no_grad():  # make the distributions peaked enough to be LM-like (random init is near-uniform)
        model32.lm_head.weight.mul_(40.0)
    model16 = bf16_twin(model32, config, attn, device)

    generator = torch.Generator().manual_seed(5)
    total = prompt_len + response_len
    sequences, attention_mask = left_padded_sequences(generator, vocab, batch, prompt_len, response_len, device)
    mask = torch.ones(batch, response_len, dtype=torch.bool, device=device)
    # ragged responses: the tail of some rows is padding
    for row in range(batch):
        mask[row, response_len - (row * 13) % (response_len // 4) :] = False
    sampled = sequences[:, -response_len:].masked_fill(~mask, 0)
    candidates = torch.randint(0, vocab, (batch, response_len, cfg.num_candidates), generator=generator).to(device)

    out = {"attention": attn, "layers": layers, "hidden": hidden, "batch": batch, "tokens": batch * total}
    with torch.no_grad():
        # alignment: hidden @ W must equal the HF model's own logits at the response positions (fp32)
        hidden32 = response_hidden_states(model32, sequences, attention_mask, response_len)
        own = model32(input_ids=sequences, attention_mask=attention_mask,
                      position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, :-1][:, -response_len:]  # fmt: skip
        mine = hidden32 @ model32.lm_head.weight.t()
        out["alignment_max_abs_diff_fp32"] = float((own - mine)[mask].abs().max())
        del own, mine
        del hidden32
        signals = {}
        for label, model, fp32_logits in (("fp32", model32, True), ("bf16", model16, True),
                                          ("bf16_rounded_logits_before", model16, False)):
            def score():
                hid = response_hidden_states(model, sequences, attention_mask, response_len)
                return teacher_signals_from_hidden(
                    hid, model.lm_head.weight, cfg, mask=mask, shared_vocab_size=vocab,
                    candidate_ids=candidates, sampled_ids=sampled,
                )  # fmt: skip

            with fp32_logits_from_low_precision(fp32_logits):
                score()  # warm-up: kernel selection, allocator
                sync(device)
                start = time.perf_counter()
                signals[label] = score()
                sync(device)
            out[f"{label}_scoring_seconds"] = time.perf_counter() - start
        a = signals["fp32"].tensors()
        m = mask
        out["entropy_mean_fp32"] = float(a["entropy"][m].float().mean())
        for label in ("bf16", "bf16_rounded_logits_before"):
            b = signals[label].tensors()
            entropy_diff = (a["entropy"][m].float() - b["entropy"][m].float()).abs()
            out[f"{label}_entropy_mean_abs_diff"] = float(entropy_diff.mean())
            out[f"{label}_entropy_max_abs_diff"] = float(entropy_diff.max())
            candidate_diff = (a["candidate_logprobs"][m].float() - b["candidate_logprobs"][m].float()).abs()
            out[f"{label}_candidate_logprob_mean_abs_diff"] = float(candidate_diff.mean())
            # what the token-level ListMLE uses: the teacher's order of the k candidates
            same_order = (a["candidate_logprobs"].argsort(-1) == b["candidate_logprobs"].argsort(-1)).all(-1)
            out[f"{label}_candidate_order_identical_fraction"] = float(same_order[m].float().mean())
            sa, sb = a["sequence_scores"].float(), b["sequence_scores"].float()
            out[f"{label}_sequence_score_max_abs_diff"] = float((sa - sb).abs().max())
            agree = [bool(torch.equal(sa[i : i + group].argsort(), sb[i : i + group].argsort()))
                     for i in range(0, batch, group)]  # fmt: skip
            out[f"{label}_group_ranking_identical_fraction"] = sum(agree) / len(agree)
        out["fp32_scoring_tokens_per_s"] = batch * total / out["fp32_scoring_seconds"]
        out["bf16_scoring_tokens_per_s"] = batch * total / out["bf16_scoring_seconds"]
        out["sparse_signal_bytes_per_response_token"] = signals["bf16"].nbytes() / float(m.sum())
    return out


# ----------------------------------------------------------------------------- 5. LoRA merge


def lora_merge(device):
    """The merged weights a LoRA student sends to vLLM (host/lora_sync.py), in bf16 on the device,
    against PEFT's own merge_and_unload; the PEFT model must be left bit-identical."""
    import copy

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tsdkd_plugin.host.lora_sync import merged_lora_parameters

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    base = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=64, lora_alpha=128,
                                            target_modules="all-linear", bias="none"))  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters(remove_duplicate=False))
    sync(device)
    start = time.perf_counter()
    sent = dict(merged_lora_parameters(model, remove_duplicate=False))
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "same_names": set(sent) == set(expected),
        "max_abs_diff_vs_peft_merge": max(float((sent[k].float() - expected[k].float()).abs().max()) for k in sent),
        "peft_model_unchanged": all(torch.equal(p, before[n]) for n, p in model.named_parameters()),
        # 1 ulp of bf16 at the weights' magnitude: PEFT adds the delta in place, we add it to a copy
        "max_abs_weight": max(float(t.float().abs().max()) for t in expected.values()),
        "seconds": seconds,
        "dtype": str(next(iter(sent.values())).dtype),
    }


# ----------------------------------------------------------------------------- 6. Gemma-2 softcap


def gemma2_softcap(device, vocab, hidden, layers, batch, prompt_len, response_len, logit_gain):
    """Gemma-2's output head in the plugin's teacher path, in bf16 on the device at Gemma-2's vocabulary:
    model_io.response_hidden_states + HiddenRows with output_head_for_config (cap * tanh(z / cap), cap 30),
    fp32 logits from bf16 operands, against HF's own fp32 forward().logits; HF's own bf16 logits beside
    it (what bf16 costs anyway), and the identity head (what the plugin computed before the fix).
    Signals (entropy, top-K ids, candidate order) are compared with those built from HF's fp32 logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tsdkd_plugin.host.model_io import output_head_for_config
    from tsdkd_plugin.objective import IDENTITY_HEAD, teacher_signals_from_logits

    cfg = TSDKDConfig()
    heads = max(1, hidden // 128)
    config = Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads, max_position_embeddings=8192, tie_word_embeddings=True,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=4096,
    )  # fmt: skip
    head = output_head_for_config(config)
    torch.manual_seed(0)
    model32 = Gemma2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # random init gives |logits| << 30; LM-like peaks reach the cap's bend
        model32.lm_head.weight.mul_(logit_gain)  # tied: the input embedding is scaled too (normed away)
    model32 = model32.to(device).eval()
    model16 = bf16_twin(model32, config, "eager", device)

    generator = torch.Generator().manual_seed(6)
    total = prompt_len + response_len
    sequences, attention_mask = left_padded_sequences(generator, vocab, batch, prompt_len, response_len, device)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    mask = torch.ones(batch, response_len, dtype=torch.bool, device=device)
    candidates = torch.randint(0, vocab, (batch, response_len, cfg.num_candidates), generator=generator).to(device)
    sampled = sequences[:, -response_len:]

    def hf_logits(model):
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits[:, :-1][:, -response_len:]

    def plugin_max_abs_diff(model, output_head, reference, chunk=1024):
        """max |plugin logits - reference| over the response tokens, made chunk by chunk as the objective does."""
        rows = response_hidden_states(model, sequences, attention_mask, response_len).reshape(-1, hidden)
        weight, ref, worst = model.lm_head.weight, reference.reshape(-1, vocab), 0.0
        for start in range(0, rows.shape[0], chunk):
            part = torch.empty(min(chunk, rows.shape[0] - start), vocab, device=device)
            chunking.HiddenRows(rows[start : start + chunk], weight, vocab, output_head).fill(slice(None), part)
            worst = max(worst, float((part - ref[start : start + chunk].float()).abs().max()))
        return worst

    out = {"vocab": vocab, "hidden": hidden, "layers": layers, "tokens": batch * total, "softcap": head.softcap}
    with torch.no_grad():
        reference = hf_logits(model32).float()
        raw = response_hidden_states(model32, sequences, attention_mask, response_len) @ model32.lm_head.weight.t()
        out["raw_logit_abs_max"] = float(raw.abs().max())
        out["raw_logit_fraction_above_15"] = float((raw.abs() > 15).float().mean())
        del raw
        out["hf_fp32_vs_plugin_fp32_max_abs_diff"] = plugin_max_abs_diff(model32, head, reference)
        out["hf_fp32_vs_plugin_fp32_identity_head_max_abs_diff"] = plugin_max_abs_diff(model32, IDENTITY_HEAD, reference)
        out["hf_fp32_vs_hf_bf16_max_abs_diff"] = float((hf_logits(model16).float() - reference).abs().max())
        out["hf_fp32_vs_plugin_bf16_max_abs_diff"] = plugin_max_abs_diff(model16, head, reference)

        want = teacher_signals_from_logits(reference, cfg, mask=mask, shared_vocab_size=vocab,
                                           candidate_ids=candidates, sampled_ids=sampled).tensors()  # fmt: skip
        del reference
        for label, output_head in (("plugin_bf16", head), ("plugin_bf16_identity_head", IDENTITY_HEAD)):
            hid = response_hidden_states(model16, sequences, attention_mask, response_len)
            got = teacher_signals_from_hidden(hid, model16.lm_head.weight, cfg, mask=mask, shared_vocab_size=vocab,
                                              candidate_ids=candidates, sampled_ids=sampled,
                                              output_head=output_head).tensors()  # fmt: skip
            out[f"{label}_entropy_mean_abs_diff"] = float((got["entropy"] - want["entropy"]).float().abs().mean())
            out[f"{label}_sequence_score_max_abs_diff"] = float(
                (got["sequence_scores"] - want["sequence_scores"]).float().abs().max()
            )
            same_top1 = got["topk_ids"][..., 0] == want["topk_ids"][..., 0]
            out[f"{label}_top1_id_identical_fraction"] = float(same_top1.float().mean())
            same_order = (got["candidate_logprobs"].argsort(-1) == want["candidate_logprobs"].argsort(-1)).all(-1)
            out[f"{label}_candidate_order_identical_fraction"] = float(same_order.float().mean())
    return out


# ----------------------------------------------------------------------------- main


def markdown(report):
    lines = ["# GPU check", "", f"Command: `{report['command']}`  ", f"Device: {report['device']}  ",
             f"Software: {report['software']}", ""]  # fmt: skip
    if "accuracy" in report:  # a --sections run may leave sections 1-5 out
        lines += markdown_sections_1_to_5(report)
    g2 = report.get("gemma2_softcap")
    if g2:
        lines += ["", f"## 6. Gemma-2 output head (softcap {g2['softcap']:g}) in bf16: HF fp32 logits vs the plugin's "
                  f"teacher path (V={g2['vocab']}, H={g2['hidden']}, {g2['layers']} layers, {g2['tokens']} tokens)", ""]
        lines += [f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}" for key, value in g2.items()]
    return "\n".join(lines) + "\n"


def markdown_sections_1_to_5(report):
    lines = []
    acc = report["accuracy"][0]
    lines += [f"## 1. Loss accuracy vs naive float64 ({acc['tokens']} tokens, V={acc['vocab']}, H={acc['hidden']})", "",
              "fp32 rows are compared with the float64 objective of the same inputs, bf16 rows with the float64 "
              "objective of the inputs rounded to bf16.", "",
              "| objective | path | loss rel. err | grad hidden rel. err | grad W rel. err | cos (hidden / W) | finite |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for part in report["accuracy"]:
        for r in part["rows"]:
            lines.append(f"| {r['objective']} | {r['path']} | {r['loss_rel_err']:.2e} | {r['grad_hidden_rel_err']:.2e} | "
                         f"{r['grad_weight_rel_err']:.2e} | {r['grad_hidden_cos']:.5f} / {r['grad_weight_cos']:.5f} | "
                         f"{r['finite']} |")  # fmt: skip
    g = report["gradcheck"]
    lines += ["", f"## 2. gradcheck (float64, on the device, hard gate, both ListMLE levels): plain {g['plain_float64']}, "
              f"fused {g['fused_float64']}", ""]  # fmt: skip
    lines += ["## 3. One forward+backward: peak memory above inputs, median time", "",
              "| tokens | path | peak GiB | ms | memory vs naive | time vs naive |", "|---|---|---|---|---|---|"]  # fmt: skip
    naive = {r["tokens"]: r for r in report["memory_time"] if r["path"] == "naive fp32" and "error" not in r}
    for r in report["memory_time"]:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['path']} | {r['error']} | | | |")
            continue
        base = naive.get(r["tokens"])
        mem = r.get("peak_gib_above_inputs")
        ratio_m = f"{mem / base['peak_gib_above_inputs']:.3f}" if base and mem is not None else "naive OOM"
        ratio_t = f"{r['seconds_median'] / base['seconds_median']:.2f}" if base else "naive OOM"
        mem_s = f"{mem:.2f}" if mem is not None else "n/a"
        lines.append(f"| {r['tokens']} | {r['path']} | {mem_s} | {1000 * r['seconds_median']:.1f} | {ratio_m} | {ratio_t} |")
    t = report["teacher_scoring"]
    lines += ["", f"## 4. Teacher scoring (Qwen2 architecture, {t['layers']} layers, H={t['hidden']}, "
              f"V={acc['vocab']}, {t['attention']}, {t['batch']} sequences, {t['tokens']} tokens)", ""]  # fmt: skip
    for key, value in t.items():
        if key not in ("attention", "layers", "hidden", "batch", "tokens"):
            lines.append(f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}")
    lora = report.get("lora_merge")
    if lora:
        lines += ["", "## 5. LoRA merge for the vLLM sync (Qwen2 architecture, 4 layers, rank 64, all linear, bf16)", ""]
        lines += [f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}" for key, value in lora.items()]
    return lines


SECTIONS = ["accuracy", "gradcheck", "memory_time", "teacher_scoring", "lora_merge", "gemma2_softcap"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (to try the script on CPU)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated sections to run (default: all): {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = SECTIONS if args.sections is None else [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        sys.exit("gpu_check.py: no CUDA device; use --smoke to try the script on CPU")
    if args.smoke:
        vocab, hidden, acc_tokens, sizes, t_hidden, t_layers, t_batch, t_prompt, t_resp = 2048, 64, 512, [512], 64, 2, 8, 32, 64
        g2_sizes = (2048, 128, 2, 2, 16, 32, 40.0)  # vocab, hidden, layers, batch, prompt, response, logit gain
    else:
        vocab, hidden, acc_tokens, sizes = 151936, 1536, 1024, [4096, 16384]
        t_hidden, t_layers, t_batch, t_prompt, t_resp = 1024, 8, 16, 256, 1024
        g2_sizes = (256000, 1024, 4, 4, 256, 1024, 16.0)  # Gemma-2's vocabulary; logits ~ N(0, 10)
    import transformers

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": name,
        "software": f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
    }
    steps = [
        ("accuracy", lambda: [loss_accuracy(device, vocab, hidden, acc_tokens, o) for o in OBJECTIVES]),
        ("gradcheck", lambda: gradcheck(device)),
        ("memory_time", lambda: memory_time(device, vocab, hidden, sizes, repeats=3)),
        ("teacher_scoring", lambda: teacher_scoring(device, vocab, t_hidden, t_layers, t_batch, t_prompt, t_resp, 4)),
        ("lora_merge", lambda: lora_merge(device)),
        ("gemma2_softcap", lambda: gemma2_softcap(device, *g2_sizes)),
    ]
    assert [key for key, _ in steps] == SECTIONS
    for key, step in steps:
        if key not in sections:
            continue
        start = time.perf_counter()
        print(f"== {key}", flush=True)
        report[key] = step()
        print(json.dumps(report[key])[:2000], f"({time.perf_counter() - start:.1f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
