"""TSD-KD loss benchmark: peak memory and forward+backward time (not a test).

    .venv/bin/python benchmarks/loss_bench.py                       # V=151,936, H=1536, N in {1024, 4096}
    .venv/bin/python benchmarks/loss_bench.py --write-results       # ... and update benchmarks/RESULTS.md
    .venv/bin/python benchmarks/loss_bench.py --baseline-root /tmp/before --tokens 1024 --repeats 2
        # before/after: each configuration from this checkout and from another one (e.g.
        # `git archive <commit> | tar -x -C /tmp/before`), alternated, side by side

Compared, each in a fresh subprocess (peak = ru_maxrss of that process, which
includes the Python/torch runtime and both models' lm_head weights; the
"working" column subtracts the RSS measured after the inputs were built):

  naive         logits = hidden @ W.T for both models (full [N, V] fp32), the
                default TSD-KD objective written with plain autograd ops (TRL-style
                JSD, torch.quantile, topk/gather ListMLE), backward.
  plain         the same full logits, then tsdkd_loss (this package's plain entry point).
  fused dense   tsdkd_loss_fused with TeacherSignals(hidden, lm_head_weight): both
                models' logits exist chunk_size tokens at a time.
  fused sparse  tsdkd_loss_fused with the sparse transport (--sparse-k, default the config's K),
                built beforehand by teacher_signals_from_hidden in another process, saved in
                its wire format (TeacherSignals.to_wire) and loaded from disk (the teacher's
                weight is not in the student's process).
  fused JSD     tsdkd_loss_fused, JSD only (gate none, other terms off): the same
                work as Liger's loss, for an apples-to-apples comparison.
  liger JSD     liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (torch chunked
                loss, compiled=False; Liger's Triton kernels need a GPU), JSD only.

Each subprocess caps its address space so that no configuration can take more
than --cap-gib of resident memory; a configuration that hits the cap is
reported as not fitting. The naive baseline is run at growing sizes while its
linear memory model predicts it fits; larger sizes are extrapolated (marked).

The sparse transport's accuracy is measured separately on peaked, Zipf-like
distributions (see --help of the error section below).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
CONFIG_LABELS = {
    "naive": "naive (full logits + autograd)",
    "plain": "plain (full logits + tsdkd_loss)",
    "fused_dense": "fused dense (tsdkd_loss_fused, teacher hidden+W)",
    "fused_sparse": "fused sparse (tsdkd_loss_fused, sparse wire)",
    "fused_jsd": "fused, JSD only (same work as Liger)",
    "liger_jsd": "Liger chunked JSD (torch, compiled=False)",
}
SEQ_LEN = 512  # tokens per response; N tokens = N / 512 responses


# ----------------------------------------------------------------------------- inputs


def make_inputs(num_tokens: int, vocab: int, hidden: int, *, teacher: bool):
    """Deterministic inputs; each tensor has its own seed so any subset is reproducible."""
    import torch

    def randn(seed, *shape, scale=1.0):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=generator).mul_(scale)

    batch = num_tokens // SEQ_LEN
    out = {
        "student_weight": randn(1, vocab, hidden, scale=0.03),
        "student_hidden": randn(2, batch, SEQ_LEN, hidden),
        "mask": torch.ones(batch, SEQ_LEN),
    }
    if teacher:
        out["teacher_weight"] = randn(3, vocab, hidden, scale=0.04)
        out["teacher_hidden"] = randn(4, batch, SEQ_LEN, hidden)
    return out


def naive_tsdkd(student_logits, teacher_logits, cfg):
    """The default TSD-KD objective, written the straightforward way (full tensors, autograd)."""
    import torch
    import torch.nn.functional as F

    beta, tau = cfg.beta, cfg.temperature
    logq = F.log_softmax(student_logits.float() / tau, dim=-1)
    logp = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    q, p = logq.exp(), logp.exp()
    h_s = -(q * logq).sum(-1)
    h_t = -(p * logp).sum(-1)
    log_mix = torch.logsumexp(torch.stack([logq + math.log(1 - beta), logp + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_mix, logp, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_mix, logq, reduction="none", log_target=True).sum(-1)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    gate = torch.sigmoid(h_s - h_t).detach()
    loss_direct = (gate * jsd).mean()
    threshold = torch.quantile(h_s.detach().flatten(), 1 - cfg.entropy_top_fraction)
    loss_entropy = h_s[h_s.detach() >= threshold].mean()
    cumulative = h_s.detach().cumsum(1)
    before = F.pad(cumulative[:, :-1], (1, 0))
    opener = before < cfg.opener_fraction * cumulative[:, -1:]
    opener[:, 0] = True
    candidates = logq.detach().topk(cfg.num_candidates, dim=-1).indices
    order = logp.gather(-1, candidates).argsort(dim=-1, descending=True)
    scores = logq.gather(-1, candidates.gather(-1, order))
    suffix = torch.logcumsumexp(scores.flip(-1), -1).flip(-1)
    loss_token = (-(scores - suffix).sum(-1))[opener].mean()
    return loss_direct + cfg.entropy_weight * loss_entropy + cfg.indirect_weight * loss_token


# ----------------------------------------------------------------------------- worker


def _rss_now_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _vm_now_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    return 0


def _cap_memory(cap_gib: float) -> None:
    # Address-space limit = what is mapped now + the resident budget left: an allocation
    # that would push resident memory past the cap fails instead of swapping/OOM-killing.
    limit = (_vm_now_kib() + int(cap_gib * GIB / 1024) - _rss_now_kib()) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(name: str, num_tokens: int, vocab: int, hidden: int, cap_gib: float, sparse_path: str | None) -> dict:
    import torch

    _cap_memory(cap_gib)
    from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, tsdkd_loss, tsdkd_loss_fused

    cfg = TSDKDConfig()
    if name == "fused_jsd":
        cfg = TSDKDConfig(gate="none", entropy_weight=0.0, indirect_weight=0.0)
    inputs = make_inputs(num_tokens, vocab, hidden, teacher=name != "fused_sparse")
    h = inputs["student_hidden"].requires_grad_(True)
    w = inputs["student_weight"].requires_grad_(True)
    mask = inputs["mask"]
    teacher = None
    if name == "fused_sparse":
        fields = torch.load(sparse_path)
        temperature = fields.pop("temperature")
        teacher = TeacherSignals.from_wire(fields, temperature) if hasattr(TeacherSignals, "from_wire") else (
            TeacherSignals(**fields, temperature=temperature))  # a baseline checkout without the wire format
    setup_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if name in ("naive", "plain"):
        logits = h @ w.t()
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].t()
        if name == "naive":
            loss = naive_tsdkd(logits, teacher_logits, cfg)
        else:
            loss, _ = tsdkd_loss(logits, TeacherSignals(logits=teacher_logits), mask, cfg, shared_vocab_size=vocab)
    elif name in ("fused_dense", "fused_jsd"):
        teacher = TeacherSignals(hidden=inputs["teacher_hidden"], lm_head_weight=inputs["teacher_weight"])
        loss, _ = tsdkd_loss_fused(h, w, teacher, mask, cfg, shared_vocab_size=vocab)
    elif name == "fused_sparse":
        loss, _ = tsdkd_loss_fused(h, w, teacher, mask, cfg, shared_vocab_size=vocab)
    elif name == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=cfg.beta, compiled=False, chunk_size=cfg.chunk_size
        )
        labels = torch.zeros(num_tokens, dtype=torch.long)
        loss = liger(
            h.view(num_tokens, hidden), w, inputs["teacher_hidden"].view(num_tokens, hidden),
            inputs["teacher_weight"], labels,
        )  # fmt: skip
    else:
        raise ValueError(name)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "name": name,
        "tokens": num_tokens,
        "loss": float(loss),
        "seconds": elapsed,
        "peak_gib": peak_kib * 1024 / GIB,
        "setup_gib": setup_kib * 1024 / GIB,
        "grad_finite": bool(torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()),
    }


def prepare_sparse(num_tokens: int, vocab: int, hidden: int, top_k: int, path: str) -> dict:
    """Experience-time work: the student's top-k candidates and the teacher's sparse signals."""
    import torch

    from tsdkd_plugin.objective import TSDKDConfig, teacher_signals_from_hidden

    cfg = TSDKDConfig(sparse_top_k=top_k)
    inputs = make_inputs(num_tokens, vocab, hidden, teacher=True)
    flat = inputs["student_hidden"].view(num_tokens, hidden)
    candidates = torch.empty(num_tokens, cfg.num_candidates, dtype=torch.int32)
    with torch.no_grad():
        for start in range(0, num_tokens, cfg.chunk_size):
            rows = slice(start, start + cfg.chunk_size)
            candidates[rows] = (flat[rows] @ inputs["student_weight"].t()).topk(cfg.num_candidates).indices.int()
    signals = teacher_signals_from_hidden(
        inputs["teacher_hidden"], inputs["teacher_weight"], cfg, mask=inputs["mask"], shared_vocab_size=vocab,
        candidate_ids=candidates.view(*inputs["mask"].shape, -1),
    )  # fmt: skip
    fields = signals.to_wire() if hasattr(signals, "to_wire") else signals.tensors()
    nbytes = sum(t.numel() * t.element_size() for t in fields.values())
    torch.save({**fields, "temperature": signals.temperature}, path)
    return {"bytes_per_token": nbytes / num_tokens}


# ----------------------------------------------------------------------------- sparse accuracy


def zipf_logits(num_tokens: int, vocab: int, exponent_range: tuple[float, float], seed: int):
    """Teacher and student logits with Zipf-like, peaked distributions.

    Teacher: z_v = -a * log(rank_v) with a random ranking per token and a ~ U(range).
    Student: its own exponent, and a ranking that mostly agrees with the teacher's
    (teacher's log-rank plus Gaussian noise of std 1, re-ranked).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    low, high = exponent_range
    log_rank = torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    teacher = torch.empty(num_tokens, vocab)
    student = torch.empty(num_tokens, vocab)
    for i in range(num_tokens):
        order = torch.randperm(vocab, generator=generator)
        a_t = low + (high - low) * float(torch.rand((), generator=generator))
        a_s = low + (high - low) * float(torch.rand((), generator=generator))
        teacher_log_rank = torch.empty(vocab)
        teacher_log_rank[order] = log_rank
        teacher[i] = -a_t * teacher_log_rank
        noisy = teacher_log_rank + torch.randn(vocab, generator=generator)
        student_rank = torch.empty(vocab)
        student_rank[noisy.argsort()] = log_rank
        student[i] = -a_s * student_rank
    return student, teacher


def sparse_error(vocab: int, num_tokens: int, ks: list[int]) -> list[dict]:
    import torch

    from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, teacher_signals_from_logits, tsdkd_loss

    rows = []
    for label, exponents in (("peaked, a~U(1.5,4)", (1.5, 4.0)), ("flat, a~U(1.05,1.5)", (1.05, 1.5))):
        student, teacher = zipf_logits(num_tokens, vocab, exponents, seed=0)
        student, teacher = student.view(1, num_tokens, vocab), teacher.view(1, num_tokens, vocab)
        mask = torch.ones(1, num_tokens)
        cfg = TSDKDConfig()
        dense, dense_metrics = tsdkd_loss(student, TeacherSignals(logits=teacher), mask, cfg, shared_vocab_size=vocab)
        for k in ks:
            cfg_k = TSDKDConfig(sparse_top_k=k)
            candidates = torch.topk(student, cfg.num_candidates).indices
            signals = teacher_signals_from_logits(
                teacher, cfg_k, mask=mask, shared_vocab_size=vocab, candidate_ids=candidates
            )
            wire = signals.to_wire()  # what the actor receives
            received = TeacherSignals.from_wire(wire, signals.temperature)
            sparse, sparse_metrics = tsdkd_loss(student, received, mask, cfg_k, shared_vocab_size=vocab)
            tail = signals.tail_logprob.exp().mean().item()
            rows.append(
                {
                    "distribution": label,
                    "K": k,
                    "bytes_per_token": sum(t.numel() * t.element_size() for t in wire.values()) / num_tokens,
                    "teacher_entropy": dense_metrics["entropy_teacher_mean"],
                    "tail_mass": tail,
                    "rel_err_direct": abs(sparse_metrics["loss_direct"] - dense_metrics["loss_direct"])
                    / abs(dense_metrics["loss_direct"]),
                    "rel_err_total": abs(float(sparse) - float(dense)) / abs(float(dense)),
                }
            )
    return rows


# ----------------------------------------------------------------------------- driver


def run_child(args, *child_args, timeout=1800, root: Path = ROOT) -> dict | None:
    """Run this script's worker in a fresh process, from the checkout at `root` (its own package)."""
    script = root / "benchmarks" / "loss_bench.py"
    command = [sys.executable, str(script), *child_args, "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    command += ["--cap-gib", str(args.cap_gib)]
    return child_result(command, child_args, timeout, env=dict(os.environ, PYTHONPATH=str(root)))


def child_result(command: list, child_args, timeout: float, env: dict | None = None) -> dict | None:
    """Run a benchmark child process; its result is the last JSON line it prints (None if it failed)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (result.stderr or "").strip().splitlines()[-3:]
    print(f"  child {child_args} failed (rc {result.returncode}): {' | '.join(tail)}", file=sys.stderr)
    return None


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}; shared machine (other jobs were running)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--naive-sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--cap-gib", type=float, default=11.5, help="resident-memory cap per configuration")
    parser.add_argument("--sparse-k", type=int, default=None, help="K of the fused sparse run (default: the config's)")
    parser.add_argument("--error-ks", type=int, nargs="+", default=[8, 16, 24, 32, 64, 256])
    parser.add_argument("--error-tokens", type=int, default=256)
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--baseline-root", help="before/after mode: also run each configuration from this checkout")
    parser.add_argument("--configs", nargs="+", default=list(COMPARED), choices=list(CONFIG_LABELS),
                        help="configurations of the before/after mode (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="before/after mode: runs per configuration (min time)")
    parser.add_argument("--sparse-error-only", action="store_true",
                        help="only the sparse-vs-dense accuracy table (its own section of RESULTS.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-sparse", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sparse-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sparse_k is None:
        from tsdkd_plugin.objective import TSDKDConfig

        args.sparse_k = TSDKDConfig().sparse_top_k

    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.vocab, args.hidden, args.cap_gib, args.sparse_path)))
        return
    if args.prepare_sparse:
        print(json.dumps(prepare_sparse(args.n, args.vocab, args.hidden, args.sparse_k, args.prepare_sparse)))
        return
    if args.baseline_root:
        print(compare_with_baseline(args, Path(args.baseline_root).resolve()))
        return
    if args.sparse_error_only:
        report = f"Command: `python benchmarks/loss_bench.py {' '.join(sys.argv[1:])}`  \n"
        report += f"Machine: {machine_description()}\n\n"
        report += render_sparse_error(args, sparse_error(args.vocab, args.error_tokens, args.error_ks))
        print(report)
        if args.write_results:
            write_results(report, "loss_bench_sparse", "Sparse transport on the wire: size and accuracy")
        return

    results: dict[tuple[str, int], dict | None] = {}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    # Naive baseline: grow while the linear memory model (fitted on what ran) says it fits.
    naive_runs = []
    for n in sorted(set(args.naive_sizes) | set(args.tokens)):
        if len(naive_runs) >= 2:
            (n0, m0), (n1, m1) = naive_runs[-2], naive_runs[-1]
            predicted = m1 + (m1 - m0) / (n1 - n0) * (n - n1)
            if predicted > args.cap_gib:
                log(f"naive N={n}: predicted {predicted:.1f} GiB > cap {args.cap_gib} GiB, not run")
                results[("naive", n)] = {"skipped": True, "predicted_gib": predicted}
                continue
        log(f"naive N={n} ...")
        res = run_child(args, "--worker", "naive", "--n", str(n))
        results[("naive", n)] = res
        if res is None:
            break
        naive_runs.append((n, res["peak_gib"]))
        log(f"  {res}")

    sparse_bytes = {}
    for n in args.tokens:
        path = f"/tmp/tsdkd_bench_sparse_{n}_{args.vocab}.pt"
        log(f"preparing sparse signals N={n} ...")
        prep = run_child(args, "--prepare-sparse", path, "--n", str(n), "--sparse-k", str(args.sparse_k))
        sparse_bytes[n] = prep["bytes_per_token"] if prep else float("nan")
        for name in ("plain", "fused_dense", "fused_sparse", "fused_jsd", "liger_jsd"):
            log(f"{name} N={n} ...")
            extra = ["--sparse-path", path] if name == "fused_sparse" else []
            results[(name, n)] = run_child(args, "--worker", name, "--n", str(n), *extra)
            log(f"  {results[(name, n)]}")
        if os.path.exists(path):
            os.remove(path)

    log("sparse transport accuracy ...")
    errors = sparse_error(args.vocab, args.error_tokens, args.error_ks)

    report = render(args, results, naive_runs, sparse_bytes, errors)
    print(report)
    if args.write_results:
        write_results(report)


COMPARED = ("plain", "fused_dense", "fused_sparse", "fused_jsd")


def compare_with_baseline(args, baseline: Path) -> str:
    """Each configuration from the baseline checkout and from this one, alternated in one run."""
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for n in args.tokens:
        for name in args.configs:
            for repeat in range(args.repeats):
                for label, root in (("baseline", baseline), ("this", ROOT)):
                    extra = []
                    if name == "fused_sparse":  # each checkout builds its own signals (its wire format)
                        path = f"/tmp/tsdkd_bench_sparse_{label}_{n}_{args.vocab}.pt"
                        run_child(args, "--prepare-sparse", path, "--n", str(n), "--sparse-k", str(args.sparse_k),
                                  root=root)
                        extra = ["--sparse-path", path]
                    log(f"{label} {name} N={n} repeat {repeat + 1} ...")
                    res = run_child(args, "--worker", name, "--n", str(n), *extra, root=root)
                    log(f"  {res}")
                    if res is not None:
                        runs.setdefault((name, n, label), []).append(res)
    lines = [
        f"Command: `python benchmarks/loss_bench.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine_description()}  ",
        f"Baseline: {baseline}; V = {args.vocab:,}, hidden = {args.hidden}; time = min over {args.repeats} "
        "run(s), each in a fresh process, baseline and this checkout alternated.\n",
        "| configuration | N | baseline s | this s | this / baseline | baseline peak GiB | this peak GiB | "
        "baseline loss | this loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.tokens:
        for name in args.configs:
            before, after = runs.get((name, n, "baseline")), runs.get((name, n, "this"))
            if not before or not after:
                lines.append(f"| {CONFIG_LABELS[name]} | {n} | did not run | | | | | | |")
                continue
            t0, t1 = min(r["seconds"] for r in before), min(r["seconds"] for r in after)
            lines.append(
                f"| {CONFIG_LABELS[name]} | {n} | {t0:.1f} | {t1:.1f} | {t1 / t0:.2f} | "
                f"{max(r['peak_gib'] for r in before):.2f} | {max(r['peak_gib'] for r in after):.2f} | "
                f"{before[0]['loss']:.6f} | {after[0]['loss']:.6f} |"
            )
    return "\n".join(lines) + "\n"


def _extrapolate(runs: list[tuple[int, float]], n: int) -> float:
    """Linear extrapolation from the two largest sizes that ran."""
    (n0, v0), (n1, v1) = runs[-2], runs[-1]
    return v1 + (v1 - v0) / (n1 - n0) * (n - n1)


def render(args, results, naive_runs, sparse_bytes, errors) -> str:
    lines = []
    command = "python benchmarks/loss_bench.py " + " ".join(sys.argv[1:])
    lines.append(f"Command: `{command.strip()}`  ")
    lines.append(f"Machine: {machine_description()}  ")
    lines.append(
        f"Shapes: V = {args.vocab:,}, hidden = {args.hidden} for both models, responses of {SEQ_LEN} tokens, "
        f"fp32, default TSDKDConfig (chunk_size 256) unless noted; memory cap {args.cap_gib} GiB per process.\n"
    )
    time_runs = [(n, results[("naive", n)]["seconds"]) for n, _ in naive_runs]
    setup_runs = [(n, results[("naive", n)]["setup_gib"]) for n, _ in naive_runs]
    extrapolated = False
    for n in args.tokens:
        naive = results.get(("naive", n))
        measured = naive is not None and not naive.get("skipped")
        if measured:
            base_peak, base_time, base_setup, mark = naive["peak_gib"], naive["seconds"], naive["setup_gib"], ""
        elif len(naive_runs) >= 2:
            base_peak = _extrapolate(naive_runs, n)
            base_time = _extrapolate(time_runs, n)
            base_setup = setup_runs[-1][1]
            mark, extrapolated = "*", True
        else:
            base_peak = base_time = base_setup = float("nan")
            mark = "?"
        lines.append(f"**N = {n} tokens**\n")
        lines.append("| configuration | peak RSS GiB | working GiB | peak / naive | time s | time / naive |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        if measured:
            lines.append(
                f"| {CONFIG_LABELS['naive']} | {base_peak:.2f} | {base_peak - base_setup:.2f} | 1.00 | {base_time:.1f} | 1.00 |"
            )
        else:
            lines.append(
                f"| {CONFIG_LABELS['naive']} | {base_peak:.1f}{mark} | {base_peak - base_setup:.1f}{mark} | 1.00 | "
                f"{base_time:.0f}{mark} | 1.00 |"
            )
        for name in ("plain", "fused_dense", "fused_sparse", "fused_jsd", "liger_jsd"):
            res = results.get((name, n))
            if res is None:
                lines.append(f"| {CONFIG_LABELS[name]} | did not run / did not fit | | | | |")
                continue
            lines.append(
                f"| {CONFIG_LABELS[name]} | {res['peak_gib']:.2f} | {res['peak_gib'] - res['setup_gib']:.2f} | "
                f"{res['peak_gib'] / base_peak:.3f}{mark} | {res['seconds']:.1f} | {res['seconds'] / base_time:.2f}{mark} |"
            )
        lines.append("")
    if extrapolated:
        largest = max((n for n, _ in naive_runs), default=None)
        lines.append(
            f"\\* naive does not fit in {args.cap_gib} GiB at this size; the largest size it ran at is N = {largest}. "
            "Its peak and time here are linear extrapolations from the two largest sizes that ran "
            f"({', '.join(f'N={n}: {m:.2f} GiB' for n, m in naive_runs)}).\n"
        )
    lines.append(
        "working GiB = peak minus the RSS after building the inputs (runtime + weights + hidden states), "
        "i.e. what the loss itself adds.\n"
    )
    lines.append(f"Sparse transport, K = {args.sparse_k}: {next(iter(sparse_bytes.values())):.0f} bytes/token on the wire "
                 f"(TeacherSignals.to_wire; dense bf16 logits: {2 * args.vocab:,} bytes/token).\n")
    lines.append(render_sparse_error(args, errors))
    return "\n".join(lines) + "\n"


def render_sparse_error(args, errors) -> str:
    lines = []
    lines.append(
        f"**Sparse vs dense loss** (default config, {args.error_tokens} tokens, V = {args.vocab:,}, Zipf-like logits "
        "z = -a*log(rank) with a random ranking per token; the student's ranking is the teacher's log-rank plus "
        "N(0,1) noise, with its own exponent a; sparse signals decoded from their wire format):\n"
    )
    lines.append("| distribution | K | bytes/token | mean H_T (nats) | mean teacher tail mass | rel. err. L_dir | rel. err. total |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for row in errors:
        lines.append(
            f"| {row['distribution']} | {row['K']} | {row['bytes_per_token']:.0f} | {row['teacher_entropy']:.2f} | "
            f"{row['tail_mass']:.4f} | {row['rel_err_direct']:.2e} | {row['rel_err_total']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def write_results(report: str, name: str = "loss_bench", title: str = "Loss benchmark") -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n## {title} (`benchmarks/loss_bench.py`)\n\n{report}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
