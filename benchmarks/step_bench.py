"""Time per training step: TSD-KD vs OpenRLHF's GRPO on the same CPU machinery.

Not a test. Both jobs run one after the other in this invocation, on the same
tiny student, the same prompts (the built-in arithmetic task), the same number of
samples per prompt and the same batch sizes, through the real CLIs:

- GRPO: `openrlhf.cli.train_ppo_ray` (group_norm, KL loss with a colocated reference
  model, as the GRPO recipes run it), reward = the task's verifier;
- TSD-KD: `openrlhf.cli.train_tsdkd` with a separate teacher of about twice the
  student's parameters (sparse top-K transport).

Per-step times come from each run's own TensorBoard timings (upstream's
`timing/*` keys: generation, make_experience, ppo_train, broadcast). The first
step (engine warm-up) is left out. Printed as a markdown table with ratios to GRPO;
`--write` stores it in benchmarks/STEP_TIME.md with the command and machine.

    .venv/bin/python benchmarks/step_bench.py --steps 5 --write
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generation", "make_experience", "ppo_train", "broadcast", "step_total")


def teacher_twice_the_student(cache_dir):
    """A toy teacher with ~2x the student's parameters (same tokenizer)."""
    from tsdkd_plugin.toy.cache import toy_model_dir
    from tsdkd_plugin.toy.models import STUDENT_RECIPE, ToyModelRecipe

    recipe = ToyModelRecipe(
        "teacher2x",
        hidden_size=64,
        num_attention_heads=1,
        num_hidden_layers=4,
        vocab_pad_multiple=128,
        seed=3,
        intermediate_multiple=5,
    )
    return toy_model_dir(recipe, cache_dir), toy_model_dir(STUDENT_RECIPE, cache_dir)


def parameter_count(model_dir) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= size
            total += count
    return total


def shared_args(student, prompts, out, args):
    from tsdkd_plugin.testing import cpu_job_flags

    return cpu_job_flags(
        model=student,
        prompts=prompts,
        out_dir=out,
        max_samples=args.prompts_per_step * args.steps,
        max_len=64 + args.max_new_tokens,
        prompts_per_step=args.prompts_per_step,
        n_samples=args.n,
        max_new_tokens=args.max_new_tokens,
        rollout_micro_batch=args.n,
        train_micro_batch=args.n,
        lr="1e-4",
    )


def run(name, module_args, out, env, timeout):
    from tsdkd_plugin.testing import log_tail, run_child, tensorboard_scalars

    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    started = time.time()
    code = run_child([sys.executable, "-m", *module_args], env, log, timeout)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); log tail:\n{log_tail(log)}")
    scalars = tensorboard_scalars(out / "tb")
    steps = sorted(scalars["train/timing/step_total"])[1:]  # step 1 warms the engine up
    timings = {phase: statistics.mean(scalars[f"train/timing/{phase}"][s] for s in steps) for phase in PHASES}
    for key in (
        "tsdkd/time_student_candidates",
        "tsdkd/time_teacher_scoring",
        "tsdkd/transport_bytes_per_token",
        "rollout/response_length_mean",
    ):
        if f"train/{key}" in scalars:
            timings[key] = statistics.mean(scalars[f"train/{key}"][s] for s in steps)
    timings["wall"] = time.time() - started
    timings["steps"] = len(steps)
    return timings


def table(results, params) -> str:
    grpo = results["GRPO"]
    lines = [
        "| phase | GRPO (s/step) | TSD-KD (s/step) | TSD-KD / GRPO |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        g, t = grpo[phase], results["TSD-KD"][phase]
        lines.append(
            f"| {phase} | {g:.3f} | {t:.3f} | {t / g:.2f}x |" if g > 0 else f"| {phase} | {g:.3f} | {t:.3f} | - |"
        )
    lengths = [results[name].get("rollout/response_length_mean") for name in ("GRPO", "TSD-KD")]
    if None not in lengths:
        lines.append(
            f"| mean response length (tokens) | {lengths[0]:.1f} | {lengths[1]:.1f} | {lengths[1] / lengths[0]:.2f}x |"
        )
    tsdkd = results["TSD-KD"]
    if "tsdkd/time_teacher_scoring" in tsdkd:
        lines.append("")
        lines.append(
            "Inside TSD-KD's make_experience: student top-k candidates "
            f"{tsdkd['tsdkd/time_student_candidates']:.3f} s, "
            f"teacher forward + sparse signals + transport {tsdkd['tsdkd/time_teacher_scoring']:.3f} s "
            f"({tsdkd['tsdkd/transport_bytes_per_token']:.0f} bytes per response position shipped). "
            f"The loss itself is inside ppo_train."
        )
    lines.append("")
    lines.append(
        f"Student {params['student']:,} parameters; TSD-KD teacher {params['teacher']:,} "
        f"({params['teacher'] / params['student']:.2f}x); GRPO's reference model is the student's copy. "
        f"Mean over {grpo['steps']:.0f} steps after the first, {len(results)} jobs alternated "
        f"{params['repeats']} times."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="alternate GRPO and TSD-KD this many times and average (cancels load drift)",
    )
    parser.add_argument("--write", action="store_true", help="write benchmarks/STEP_TIME.md")
    args = parser.parse_args(argv)

    from tsdkd_plugin.toy import arith_task
    from tsdkd_plugin.toy.cache import default_cache_dir

    work = Path(tempfile.mkdtemp(prefix="tsdkd_step_bench_"))
    ray_tmp = tempfile.mkdtemp(prefix="tsdkd_ray_", dir="/tmp")
    teacher, student = teacher_twice_the_student(default_cache_dir())
    data = work / "data"
    arith_task.main(
        ["--out", str(data), "--n-train", str(args.prompts_per_step * args.steps + 8), "--n-val", "8", "--n-test", "8"]
    )
    env = {
        **os.environ,
        "TSDKD_DEVICE": "cpu",
        "TSDKD_RAY_TMPDIR": ray_tmp,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    reward = REPO / "tsdkd_plugin" / "toy" / "reward_func.py"
    prompts = data / "prompts_train.jsonl"
    runs = {"GRPO": [], "TSD-KD": []}
    try:
        for repeat in range(args.repeats):
            grpo_out = work / f"grpo{repeat}"
            runs["GRPO"].append(
                run(
                    "GRPO",
                    [
                        "tsdkd_plugin.host.cpu_launch",
                        "openrlhf.cli.train_ppo_ray",
                        *shared_args(student, prompts, grpo_out, args),
                        "--algo.advantage.estimator",
                        "group_norm",
                        "--algo.kl.use_loss",
                        "--algo.kl.estimator",
                        "k3",
                        "--algo.kl.init_coef",
                        "0.01",
                        "--ref.num_nodes",
                        "1",
                        "--ref.num_gpus_per_node",
                        "1",
                        "--reward.remote_url",
                        str(reward),
                    ],
                    grpo_out,
                    env,
                    args.timeout,
                )
            )
            tsdkd_out = work / f"tsdkd{repeat}"
            runs["TSD-KD"].append(
                run(
                    "TSD-KD",
                    [
                        "openrlhf.cli.train_tsdkd",
                        *shared_args(student, prompts, tsdkd_out, args),
                        "--teacher.model_name_or_path",
                        str(teacher),
                        "--teacher.placement",
                        "separate",
                        "--reward.remote_url",
                        str(reward),
                    ],
                    tsdkd_out,
                    env,
                    args.timeout,
                )
            )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = {name: {key: statistics.mean(r[key] for r in reps) for key in reps[0]} for name, reps in runs.items()}

    params = {"student": parameter_count(student), "teacher": parameter_count(teacher), "repeats": args.repeats}
    ratio = results["TSD-KD"]["step_total"] / results["GRPO"]["step_total"]
    report = table(results, params)
    verdict = f"TSD-KD step = {ratio:.2f}x GRPO step (target <= 1.3x): {'met' if ratio <= 1.3 else 'NOT met'}."
    print(report)
    print(verdict)
    if args.write:
        from tsdkd_plugin.testing import write_benchmark_report

        write_benchmark_report(
            REPO / "benchmarks" / "STEP_TIME.md",
            "TSD-KD vs GRPO: time per training step (CPU)",
            "step_bench.py",
            sys.argv[1:] if argv is None else argv,
            {},
            f"{report}\n\n{verdict}",
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
