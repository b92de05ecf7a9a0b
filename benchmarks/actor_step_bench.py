"""One real TSD-KD actor training step: peak memory and time, fused student path vs full logits (not a test).

    .venv/bin/python benchmarks/actor_step_bench.py                  # V = 151,936, H = 256, N in {1k, 4k, 16k}
    .venv/bin/python benchmarks/actor_step_bench.py --tokens 512 --hidden 64 --vocab 8192 --layers 1   # quick try

What runs is `TSDKDActorTrainer.training_step` itself, on the policy actor built as its Ray
worker builds it (tsdkd_plugin/host/single_process.py: upstream DeepspeedStrategy, DeepSpeed
engine and optimizer, the TSD-KD trainer), in a DeepSpeed world of one on the CPU:

  full    --tsdkd.student_logits full: upstream Actor's [B, T, V] fp32 logits + tsdkd_loss (today's path)
  fused   --tsdkd.student_logits fused: hidden states + output embedding, tsdkd_loss_fused (the default)
  own     the model's own cost, for reference: the same forward (output layer skipped), a trivial loss on
          the final hidden states, DeepSpeed backward and optimizer step -- weights, gradients,
          optimizer states and activations, without any objective

The student is a Qwen2 model with Qwen2.5's 151,936 logit rows (tied embeddings, as the small
Qwen2.5 models) and a small hidden size, the tokenizer Qwen2's real vocabulary (151,646 ids);
the micro-batch is N / 1024 responses of 1024 tokens after a 64-token prompt, with the sparse
signals of a separate teacher (default config: K = 64, k = 10, token-level ListMLE), prepared
once beforehand in another process. Each (mode, N) runs in a fresh process capped at --cap-gib
of resident memory: one warm-up step (it also creates the optimizer states), then the timed
step(s); peak = ru_maxrss. The step's extra memory = its peak minus `own`'s peak at the same N.
Full at sizes its measured memory says cannot fit is not run; it is extrapolated (marked *).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loss_bench import GIB, _cap_memory, _extrapolate, child_result, machine_description  # noqa: E402

MODES = ("own", "full", "fused")
PROMPT_LEN = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def policy_argv(work: Path, mode: str, rows: int, zero_stage: int) -> list:
    return [
        "--actor.model_name_or_path", str(work / "student"), "--teacher.model_name_or_path", str(work / "teacher"),
        "--teacher.placement", "separate", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--data.prompt_dataset", "unused.jsonl", "--rollout.n_samples_per_prompt", "1",
        "--rollout.batch_size", str(rows), "--rollout.micro_batch_size", str(rows),
        "--train.batch_size", str(rows), "--train.micro_batch_size", str(rows),
        "--ds.zero_stage", str(zero_stage), "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa",
        "--actor.adam.lr", "1e-5", "--actor.lr_warmup_ratio", "0",
        "--tsdkd.student_logits", "fused" if mode == "own" else mode,
    ]  # fmt: skip


def save_model(out: Path, tokenizer_dir: Path, vocab: int, hidden: int, layers: int, seed: int) -> None:
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=1, head_dim=64, max_position_embeddings=32768,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked, LM-like distributions (random init is near-uniform)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)


def prepare(work: Path, vocab: int, hidden: int, layers: int, tokens: list, response_len: int, zero_stage: int) -> dict:
    """Models, and per N the micro-batch with the separate teacher's sparse signals (saved to disk)."""
    import torch

    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host import single_process
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer
    from tsdkd_plugin.toy.cache import default_cache_dir, qwen_vocab_tokenizer_dir, toy_tokenizer_dir

    # Qwen2's real vocabulary (151,646 ids) for Qwen2.5's 151,936 rows; the toy one (400 ids) for quick tries.
    real_vocab = vocab >= 151_646
    tokenizer_dir = (qwen_vocab_tokenizer_dir if real_vocab else toy_tokenizer_dir)(default_cache_dir())
    save_model(work / "student", tokenizer_dir, vocab, hidden, layers, seed=1)
    save_model(work / "teacher", tokenizer_dir, vocab, hidden, layers, seed=2)
    shared = check_same_tokenizer(str(work / "teacher"), str(work / "student"))
    bytes_per_token = {}
    for n in tokens:
        rows = n // response_len
        args, config = parse_args(policy_argv(work, "fused", rows, zero_stage))
        policy = single_process.build_policy_actor(args, config, shared)
        teacher = single_process.build_separate_teacher(args, config, shared)
        generator = torch.Generator().manual_seed(n)
        sequences = torch.randint(0, shared, (rows, PROMPT_LEN + response_len), generator=generator)
        attention_mask = torch.ones_like(sequences)
        action_mask = torch.ones(rows, response_len, dtype=torch.bool)
        experience = single_process.experience_with_signals(
            policy, teacher, sequences, attention_mask, action_mask, n_samples_per_prompt=1
        )
        torch.save({"sequences": sequences, "attention_mask": attention_mask, "action_mask": action_mask,
                    "tsdkd": experience.tsdkd}, work / f"batch_{n}.pt")  # fmt: skip
        per_token = {k: v for k, v in experience.tsdkd.items() if k not in ("sequence_scores", "group_ids")}
        bytes_per_token[n] = sum(t.numel() * t.element_size() for t in per_token.values()) / n
        del policy, teacher, experience
        gc.collect()
    return {"shared_vocab_size": shared, "bytes_per_token": bytes_per_token}


def worker(work: Path, mode: str, n: int, response_len: int, zero_stage: int, shared: int, cap_gib: float,
           repeats: int) -> dict:
    _cap_memory(cap_gib)
    import torch

    from openrlhf.trainer.ppo_utils.experience import Experience

    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host import single_process

    rows = n // response_len
    args, config = parse_args(policy_argv(work, mode, rows, zero_stage))
    policy = single_process.build_policy_actor(args, config, shared)
    trainer = policy.trainer
    batch = torch.load(work / f"batch_{n}.pt")
    experience = Experience(sequences=batch["sequences"], attention_mask=batch["attention_mask"],
                            action_mask=batch["action_mask"])  # fmt: skip
    experience.tsdkd = batch["tsdkd"]

    def own_step():
        """The model's own step: forward to the final hidden states, a trivial loss, backward, step."""
        trainer.actor.train()
        hidden = trainer._student_forward(experience.sequences, experience.attention_mask, response_len).hidden
        loss = hidden.float().square().mean()
        trainer.strategy.backward(loss, trainer.actor, trainer.actor_optim)
        trainer.strategy.optimizer_step(trainer.actor_optim, trainer.actor, trainer.actor_scheduler, name="actor")
        return {"policy_loss": loss.detach()}

    def step():
        if mode == "own":
            return own_step()
        return trainer.training_step(experience, 0.0, 0)["metrics"]

    setup_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    seconds = []
    for _ in range(1 + repeats):  # the first step warms up (and creates the optimizer states)
        gc.collect()
        start = time.perf_counter()
        metrics = step()
        seconds.append(time.perf_counter() - start)
    return {
        "mode": mode, "tokens": n,
        "loss": float(metrics["policy_loss"]),
        "seconds": min(seconds[1:]),
        "warmup_seconds": seconds[0],
        "setup_gib": setup_gib,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }  # fmt: skip


def run_child(options, *child_args, timeout=3600):
    command = [sys.executable, __file__, *child_args, "--work", str(options.work), "--vocab", str(options.vocab),
               "--hidden", str(options.hidden), "--layers", str(options.layers), "--response-len",
               str(options.response_len), "--zero-stage", str(options.zero_stage), "--cap-gib", str(options.cap_gib),
               "--repeats", str(options.repeats)]  # fmt: skip
    return child_result(command, child_args, timeout)


def render(options, results: dict, prepared: dict) -> str:
    lines = [
        f"Command: `python benchmarks/actor_step_bench.py {' '.join(sys.argv[1:])}`".replace("  ", " ") + "  ",
        f"Machine: {machine_description()}  ",
        f"Student: Qwen2, V = {options.vocab:,} logit rows (shared vocabulary {prepared['shared_vocab_size']:,}), "
        f"hidden {options.hidden}, {options.layers} layers, tied embeddings, fp32, ZeRO-{options.zero_stage}; "
        f"responses of {options.response_len} tokens after a {PROMPT_LEN}-token prompt; separate teacher, sparse "
        f"transport; default TSDKDConfig (chunk_size 256); memory cap {options.cap_gib} GiB per process.",
        "",
        "| tokens | step | peak RSS GiB | extra over own GiB | extra / full's | time s | time / full's |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    full_runs = [(n, results[("full", n)]) for n in options.tokens if results.get(("full", n))]
    mem_fit = [(n, r["peak_gib"]) for n, r in full_runs]
    time_fit = [(n, r["seconds"]) for n, r in full_runs]
    footnote = False
    for n in options.tokens:
        own = results.get(("own", n))
        full = results.get(("full", n))
        if full is not None:
            full_peak, full_time, mark = full["peak_gib"], full["seconds"], ""
        elif len(mem_fit) >= 2:
            full_peak, full_time, mark, footnote = _extrapolate(mem_fit, n), _extrapolate(time_fit, n), "*", True
        else:
            full_peak = full_time = float("nan")
            mark = "?"
        own_peak = own["peak_gib"] if own else float("nan")
        full_extra = full_peak - own_peak
        for mode in MODES:
            res = results.get((mode, n))
            if mode == "full" and res is None:
                lines.append(f"| {n} | full (did not fit / not run) | {full_peak:.2f}{mark} | {full_extra:.2f}{mark} "
                             f"| 1.00 | {full_time:.1f}{mark} | 1.00 |")  # fmt: skip
                continue
            if res is None:
                lines.append(f"| {n} | {mode} | did not run | | | | |")
                continue
            extra = res["peak_gib"] - own_peak
            if mode == "own":
                lines.append(f"| {n} | own (model only) | {res['peak_gib']:.2f} | 0 | | {res['seconds']:.1f} | |")
                continue
            lines.append(f"| {n} | {mode} | {res['peak_gib']:.2f} | {extra:.2f} | {extra / full_extra:.3f}{mark} | "
                         f"{res['seconds']:.1f} | {res['seconds'] / full_time:.2f}{mark} |")  # fmt: skip
    lines.append("")
    if footnote:
        lines.append(f"\\* full does not fit in {options.cap_gib} GiB here; its peak and time are linear "
                     f"extrapolations from the sizes it ran at ({', '.join(f'N={n}: {m:.2f} GiB' for n, m in mem_fit)}).")
    for n in options.tokens:
        fused, full = results.get(("fused", n)), results.get(("full", n))
        if fused and full:
            lines.append(f"N={n}: loss fused {fused['loss']:.7f}, full {full['loss']:.7f} "
                         f"(rel. diff {abs(fused['loss'] - full['loss']) / abs(full['loss']):.1e}).")
    sizes = ", ".join(f"{v:.0f}" for v in prepared["bytes_per_token"].values())
    lines.append(f"Sparse teacher signals shipped: {sizes} bytes per response token.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage (2: the CPU e2e configuration)")
    parser.add_argument("--cap-gib", type=float, default=11.5, help="resident-memory cap per step process")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the warm-up step (min is reported)")
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    os.environ.setdefault("TSDKD_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if options.worker:
        print(json.dumps(worker(options.work, options.worker, options.n, options.response_len, options.zero_stage,
                                options.shared, options.cap_gib, options.repeats)))  # fmt: skip
        return
    if options.prepare:
        print(json.dumps(prepare(options.work, options.vocab, options.hidden, options.layers, options.tokens,
                                 options.response_len, options.zero_stage)))  # fmt: skip
        return

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="tsdkd_actor_step_") as work:
        options.work = Path(work)
        log("preparing models and teacher signals ...")
        prepared = run_child(options, "--prepare", "--tokens", *map(str, options.tokens))
        if prepared is None:
            raise SystemExit("preparation failed")
        prepared["bytes_per_token"] = {int(k): v for k, v in prepared["bytes_per_token"].items()}
        results = {}
        full_runs = []
        for n in options.tokens:
            for mode in MODES:
                if mode == "full" and len(full_runs) >= 2 and _extrapolate(full_runs, n) > options.cap_gib:
                    log(f"full N={n}: predicted {_extrapolate(full_runs, n):.1f} GiB > cap, not run")
                    continue
                log(f"{mode} N={n} ...")
                res = run_child(options, "--worker", mode, "--n", str(n), "--shared", str(prepared["shared_vocab_size"]))
                results[(mode, n)] = res
                log(f"  {res}")
                if mode == "full" and res is not None:
                    full_runs.append((n, res["peak_gib"]))
    print(render(options, results, prepared))


if __name__ == "__main__":
    main()
