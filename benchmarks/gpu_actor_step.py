"""GPU check: the actor's training step in bf16 on CUDA, fused student path vs full logits (not a test).

    python3 benchmarks/gpu_actor_step.py --out DIR            # on a CUDA machine (run by gpu_check.sh)
    python benchmarks/gpu_actor_step.py --smoke --out DIR     # tiny sizes on CPU, to try the script itself

The GPU machine has torch and transformers only (no OpenRLHF, DeepSpeed or Ray), so this is the
step's student side without the Ray actor around it: a Qwen2-architecture student in bf16 with
Qwen2.5's 151,936 logit rows and the 1.5B model's hidden size (a few layers), the forward through
tsdkd_plugin/host/student_step.py (`StudentForward`, `student_objective`: the code the actor runs),
behind a stand-in for upstream `Actor.forward` (position ids from the attention mask, logits upcast
to fp32 and divided by the rollout temperature), the separate teacher's sparse signals, backward,
AdamW step. Per size, side by side in one run:

  own     forward to the final hidden states, a trivial loss, backward, step (the model's own cost)
  full    --tsdkd.student_logits full: [B, T, V] fp32 logits + tsdkd_loss (the earlier path)
  fused   --tsdkd.student_logits fused: hidden states + output embedding, tsdkd_loss_fused (the default)

Peak = torch.cuda.max_memory_allocated during one step, above what is allocated before it
(weights, optimizer states); time = median of --repeats steps after a warm-up. Writes
DIR/gpu_actor_step.json and DIR/gpu_actor_step.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gpu_check import timed_peak  # noqa: E402
from tsdkd_plugin.host.student_step import StudentForward, student_objective  # noqa: E402
from tsdkd_plugin.objective import TSDKDConfig, teacher_signals_from_hidden  # noqa: E402

MODES = ("own", "full", "fused")
PROMPT_LEN = 64


class ActorStandIn(torch.nn.Module):
    """What upstream Actor.forward does around the HF model for the TSD-KD step (no packing)."""

    def __init__(self, model, temperature: float = 1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, sequences, attention_mask=None, return_output=False, ring_attn_group=None):
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        output = self.model(sequences, attention_mask=attention_mask, position_ids=position_ids)
        output["logits"] = output["logits"].to(torch.float32)
        if self.temperature != 1.0:
            output["logits"].div_(self.temperature)
        return output


def build_student(device, vocab, hidden, layers, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 768), head_dim=128 if hidden >= 128 else hidden,
        max_position_embeddings=32768, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked, LM-like distributions (random init is near-uniform)
    return model.train()


def batch(device, vocab, shared, rows, response_len, cfg, teacher_hidden_size):
    """[prompt | response] rows and the separate teacher's sparse signals for them (made on the device)."""
    generator = torch.Generator().manual_seed(rows)
    sequences = torch.randint(0, shared, (rows, PROMPT_LEN + response_len), generator=generator).to(device)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(rows, response_len, dtype=torch.bool, device=device)
    t_hidden = torch.randn(rows, response_len, teacher_hidden_size, generator=generator).to(device, torch.bfloat16)
    t_weight = (torch.randn(vocab, teacher_hidden_size, generator=generator) * 0.04).to(device, torch.bfloat16)
    start = torch.randint(0, shared, (rows, response_len, 1), generator=generator)
    candidates = ((start + torch.arange(cfg.num_candidates)) % shared).to(device)  # k distinct ids per token
    with torch.no_grad():
        signals = teacher_signals_from_hidden(t_hidden, t_weight, cfg, mask=action_mask, shared_vocab_size=shared,
                                              candidate_ids=candidates)  # fmt: skip
    return sequences, attention_mask, action_mask, signals


def one_step(mode, model, actor, optimizer, data, cfg, shared, response_len):
    sequences, attention_mask, action_mask, signals = data
    student = StudentForward(model, "fused" if mode == "own" else mode)
    outputs = student(actor, sequences, attention_mask, response_len)
    if mode == "own":
        loss = outputs.hidden.float().square().mean()
    else:
        weight = model.get_output_embeddings().weight if student.fused else None
        loss, _ = student_objective(outputs, weight, signals, action_mask, cfg, shared_vocab_size=shared,
                                    sampled_ids=sequences[:, -response_len:], group_size=None)  # fmt: skip
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(device, vocab, shared, hidden, layers, sizes, response_len, repeats):
    cfg = TSDKDConfig()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_student(device, vocab, hidden, layers, dtype)
    actor = ActorStandIn(model)
    # lr 0: the optimizer does all its work but the weights stay put, so every row scores the same
    # model and the loss column compares the paths (bf16: fused makes fp32 logits, full rounds them to bf16).
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
    rows_out = []
    for tokens in sizes:
        rows = max(1, tokens // response_len)
        data = batch(device, vocab, shared, rows, response_len, cfg, hidden)
        for mode in MODES:
            row = {"tokens": rows * response_len, "mode": mode}
            # The warm-up step also creates the optimizer states, so the peak is above weights + optimizer.
            row.update(timed_peak(lambda: one_step(mode, model, actor, optimizer, data, cfg, shared, response_len),
                                  device, repeats, "peak_gib_above_weights_and_optimizer"))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        del data
    return rows_out


def markdown(report) -> str:
    lines = ["# GPU check: actor training step, fused vs full student logits", "",
             f"Command: `{report['command']}`  ", f"Device: {report['device']}  ", f"Software: {report['software']}  ",
             f"Student: Qwen2 architecture, V = {report['vocab']:,}, hidden {report['hidden']}, {report['layers']} "
             f"layers, tied, {report['dtype']}; sparse teacher signals (K = 64); AdamW.", "",
             "| tokens | step | peak GiB above weights+optimizer | extra over own | extra / full's | ms | time / full's "
             "| loss |", "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by = {(r["tokens"], r["mode"]): r for r in report["steps"]}
    for tokens in sorted({r["tokens"] for r in report["steps"]}):
        own, full = by.get((tokens, "own")), by.get((tokens, "full"))
        own_peak = own.get("peak_gib_above_weights_and_optimizer") if own else None
        full_peak = full.get("peak_gib_above_weights_and_optimizer") if full and "error" not in full else None
        for mode in MODES:
            r = by.get((tokens, mode))
            if r is None or "error" in r:
                lines.append(f"| {tokens} | {mode} | {r['error'] if r else 'not run'} | | | | | |")
                continue
            peak = r.get("peak_gib_above_weights_and_optimizer")
            extra = peak - own_peak if peak is not None and own_peak is not None else None
            full_extra = full_peak - own_peak if full_peak is not None and own_peak is not None else None
            ratio_m = f"{extra / full_extra:.3f}" if extra is not None and full_extra and mode != "own" else ""
            ratio_t = (f"{r['seconds_median'] / full['seconds_median']:.2f}"
                       if full and "error" not in full and mode != "own" else "")  # fmt: skip
            peak_s = f"{peak:.2f}" if peak is not None else "n/a"
            extra_s = f"{extra:.2f}" if extra is not None else "n/a"
            lines.append(f"| {tokens} | {mode} | {peak_s} | {extra_s} | {ratio_m} | {1000 * r['seconds_median']:.1f} "
                         f"| {ratio_t} | {r['loss']:.6g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_actor_step.json and gpu_actor_step.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (to try the script on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        sys.exit("gpu_actor_step.py: no CUDA device; use --smoke to try the script on CPU")
    if args.smoke:
        vocab, shared, hidden, layers, sizes, response_len = 4096, 4000, 64, 1, [256, 512], 128
    else:  # Qwen2.5-1.5B's vocabulary and hidden size, 4 layers; 4 and 16 responses of 1024 tokens
        vocab, shared, hidden, layers, sizes, response_len = 151936, 151665, 1536, 4, [4096, 16384], 1024
    import transformers

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "software": f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}",
        "vocab": vocab, "hidden": hidden, "layers": layers,
        "dtype": "bf16" if device.type == "cuda" else "fp32 (smoke)",
    }  # fmt: skip
    report["steps"] = measure(device, vocab, shared, hidden, layers, sizes, response_len, args.repeats)
    (out / "gpu_actor_step.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_actor_step.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
