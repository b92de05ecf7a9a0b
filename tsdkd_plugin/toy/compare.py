"""TSD-KD against baselines and its own ablations, at equal budget, over several seeds.

    python -m tsdkd_plugin.toy.compare --seeds 3 [--methods all] [--run-dir runs/compare]
                                       [--out benchmarks/toy_results] [--budget default] [--difficulty easy]

Every method starts from the same initial student (the main job's cached `train_sft` student),
sees the same train prompts, gets the same number of sampled responses and the same number of
optimizer steps of the same size (see `DistillBudget`); only the training signal differs:

  seqkd       SFT (OpenRLHF `train_sft`) on solutions the teacher samples for the train prompts
  gkd         on-policy generalized JSD on every token (`train_tsdkd --tsdkd.gate none`, no ranking, no entropy term)
  grpo        OpenRLHF `train_ppo_ray --algo.advantage.estimator group_norm` with the task's verifier reward
  dpo         OpenRLHF `train_dpo` on teacher-ranked pairs of the student's own samples
  tsdkd       `train_tsdkd` with the default objective
  ablations   tsdkd without the direct / indirect / entropy term, hard gate, sequence-level and
              token+sequence ranking, gated JSD alone, entropy term on the top 10%, the terms
              rescaled to the direct term's size, and the reference code's (wrong) prefix ListMLE

Each finished run is stored as <run-dir>/results/<method>-seed<k>.json, so an interrupted
comparison resumes where it stopped; the report (markdown table, PNG with error bars, JSON, with
the command and machine) is rewritten in --out after every run. A failed run is recorded and the
comparison goes on; the report lists it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from tsdkd_plugin.toy import arith_task
from tsdkd_plugin.toy.default_job import (
    BUDGETS,
    TOY_DS_FLAGS,
    Budget,
    CommandResult,
    JobError,
    SFTRecipe,
    StageFailed,
    StepProgress,
    banner,
    check_budget,
    child_env,
    exit_on_sigterm,
    distill_flags,
    fresh_stage_dir,
    logged_optimizer_steps,
    machine_info,
    require_saved_model,
    run_logged,
    run_tsdkd,
    sft_flags,
    trained_model_dir,
    upstream_command,
    with_difficulty_lengths,
    write_task_data,
)

PROG = "python -m tsdkd_plugin.toy.compare"
DPO_BETA = 0.1  # OpenRLHF's default


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    group: str  # "baseline", "tsdkd" or "ablation": the colour in the plot
    runner: str  # "tsdkd", "grpo", "seqkd" or "dpo"
    doc: str
    objective: Mapping[str, object] = field(default_factory=dict)  # --tsdkd.* overrides


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("seqkd", "SeqKD", "baseline", "seqkd",
               "OpenRLHF `train_sft` on responses the teacher samples (temperature 1) for the train prompts, "
               "as many as the student samples in the on-policy methods"),
        Method("gkd", "GKD (JSD, all tokens)", "baseline", "tsdkd",
               "on-policy generalized JSD (beta 0.9) on every response token: `train_tsdkd` with --tsdkd.gate none, "
               "--tsdkd.indirect_weight 0, --tsdkd.entropy_weight 0",
               {"gate": "none", "indirect_weight": 0.0, "entropy_weight": 0.0}),
        Method("grpo", "GRPO (verifier)", "baseline", "grpo",
               "OpenRLHF `train_ppo_ray --algo.advantage.estimator group_norm` with the task's verifier "
               "(`reward_func.py`), no KL term (--algo.kl.init_coef 0: no reference model)"),
        Method("dpo", "DPO (teacher-ranked)", "baseline", "dpo",
               f"OpenRLHF `train_dpo` (beta {DPO_BETA}) on pairs of the initial student's own samples: the teacher "
               "ranks each prompt's samples by length-normalized log-likelihood, best vs worst, second vs "
               "second-worst"),
        Method("tsdkd", "TSD-KD", "tsdkd", "tsdkd",
               "`train_tsdkd` with the default objective: soft-gated JSD + token-level ListMLE (suffix) + entropy term"),
        Method("tsdkd-no-direct", "– direct", "ablation", "tsdkd", "TSD-KD without the gated JSD (--tsdkd.direct_weight 0)",
               {"direct_weight": 0.0}),
        Method("tsdkd-no-indirect", "– indirect", "ablation", "tsdkd", "TSD-KD without ListMLE (--tsdkd.indirect_weight 0)",
               {"indirect_weight": 0.0}),
        Method("tsdkd-no-entropy", "– entropy", "ablation", "tsdkd",
               "TSD-KD without the entropy term (--tsdkd.entropy_weight 0)", {"entropy_weight": 0.0}),
        Method("tsdkd-hard-gate", "hard gate", "ablation", "tsdkd",
               "TSD-KD with the hard gate 1[H_S - H_T > 0] instead of the sigmoid (--tsdkd.gate hard)", {"gate": "hard"}),
        Method("tsdkd-sequence", "sequence ranking", "ablation", "tsdkd",
               "TSD-KD with sequence-level instead of token-level ListMLE (--tsdkd.indirect_level sequence)",
               {"indirect_level": "sequence"}),
        Method("tsdkd-both", "token + sequence", "ablation", "tsdkd",
               "TSD-KD with both ListMLE levels (--tsdkd.indirect_level both)", {"indirect_level": "both"}),
        Method("tsdkd-gated-jsd-only", "gated JSD only", "ablation", "tsdkd",
               "only TSD-KD's direct term, the soft-gated JSD (--tsdkd.indirect_weight 0 --tsdkd.entropy_weight 0): "
               "GKD with the entropy-gap gate, which isolates the gate", {"indirect_weight": 0.0, "entropy_weight": 0.0}),
        Method("tsdkd-entropy-top10", "entropy on top 10%", "ablation", "tsdkd",
               "TSD-KD with the entropy term on the 10% most uncertain tokens, the reviewers' reading, instead of "
               "the reference code's 90% (--tsdkd.entropy_top_fraction 0.1)", {"entropy_top_fraction": 0.1}),
        Method("tsdkd-balanced", "terms rescaled (α 0.001, entropy 0.1)", "ablation", "tsdkd",
               "TSD-KD with the indirect and entropy weights scaled down so that each term is about as large as "
               "the gated JSD at the start of training (logged: L_dir ~0.02, L_ind ~15, L_ent ~0.25 at the "
               "defaults) (--tsdkd.indirect_weight 0.001 --tsdkd.entropy_weight 0.1)",
               {"indirect_weight": 0.001, "entropy_weight": 0.1}),
        Method("tsdkd-prefix", "prefix ListMLE (ref. code)", "ablation", "tsdkd",
               "TSD-KD with the reference code's prefix log-cumsum-exp ListMLE, which rewards the reversed order "
               "(--tsdkd.listmle_form prefix)", {"listmle_form": "prefix"}),
    )
}
METHOD_GROUPS = {
    "all": list(METHODS),
    "baselines": ["seqkd", "gkd", "grpo", "dpo", "tsdkd"],
    "ablations": ["tsdkd"] + [name for name, m in METHODS.items() if m.group == "ablation"],
}


def parse_methods(text: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        expanded = METHOD_GROUPS.get(part, [part])
        for name in expanded:
            if name not in METHODS:
                raise JobError(
                    f"unknown method {name!r}; valid methods: {', '.join(METHODS)} (or {', '.join(METHOD_GROUPS)})"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise JobError("--methods names no method")
    return names


# --------------------------------------------------------------------------- sampling and scoring (in process)


def sample_responses(model_dir: Path, prompt_rows: Sequence[Mapping], n: int, seed: int, max_new_tokens: int,
                     desc: str) -> list[list[str]]:
    """n sampled responses (temperature 1, like the rollouts) per prompt row."""
    import torch

    from tsdkd_plugin.toy.evaluate import generate_greedy, load_model_for_eval, render_prompt

    model, tokenizer = load_model_for_eval(model_dir)
    texts = [render_prompt(tokenizer, row[arith_task.PROMPT_KEY]) for row in prompt_rows]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flat = generate_greedy(model, tokenizer, texts, max_new_tokens=max_new_tokens, do_sample=True,
                               num_return_sequences=n, temperature=1.0, desc=desc)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompt_rows))]


def teacher_scores(teacher_dir: Path, prompt_rows: Sequence[Mapping], responses: Sequence[Sequence[str]],
                   batch_size: int = 64) -> list[list[float]]:
    """The teacher's length-normalized log-likelihood of each response (end-of-turn token included):
    the same sequence score the sequence-level TSD-KD ranking uses by default."""
    import torch
    from tqdm.auto import tqdm

    from tsdkd_plugin.toy.evaluate import load_model_for_eval, render_prompt

    model, tokenizer = load_model_for_eval(teacher_dir)
    tokenizer.padding_side = "right"
    end = tokenizer.eos_token
    pairs = [(render_prompt(tokenizer, row[arith_task.PROMPT_KEY]), response + end)
             for row, group in zip(prompt_rows, responses) for response in group]
    scores: list[float] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(pairs), batch_size), desc="teacher scoring", leave=False):
            batch = pairs[start : start + batch_size]
            prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in batch]
            full_ids = [tokenizer(p + r, add_special_tokens=False)["input_ids"] for p, r in batch]
            width = max(len(ids) for ids in full_ids)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(full_ids):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1, : len(tokenizer)]
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            for i, (p_ids, ids) in enumerate(zip(prompt_ids, full_ids)):
                # Response tokens are positions len(prompt)..len(full)-1; their log-probs sit one earlier.
                span = logprobs[i, len(p_ids) - 1 : len(ids) - 1]
                scores.append(float(span.mean()))
    n = len(responses[0]) if responses else 0
    return [scores[i * n : (i + 1) * n] for i in range(len(responses))]


def ranked_pairs(responses: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs from one prompt's samples: best vs worst, 2nd vs 2nd-worst, ...;
    pairs of identical texts are dropped (they carry no preference)."""
    order = sorted(range(len(responses)), key=lambda i: scores[i], reverse=True)
    pairs = []
    for k in range(len(order) // 2):
        chosen, rejected = responses[order[k]], responses[order[-1 - k]]
        if chosen != rejected:
            pairs.append((chosen, rejected))
    return pairs


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------- one run per method


@dataclass
class RunContext:
    budget: Budget
    teacher_dir: Path
    student_dir: Path
    prompts_file: Path
    prompt_rows: list[dict]
    runs_dir: Path
    timeout_s: float
    verbose: bool


def run_method(method: Method, seed: int, ctx: RunContext) -> tuple[Path, CommandResult, dict]:
    """Train the initial student with `method`; returns (saved model dir, command result, notes)."""
    stage_dir = fresh_stage_dir(ctx.runs_dir / f"{method.name}-seed{seed}")
    d = ctx.budget.distill
    if method.runner == "tsdkd":
        model_dir, result = run_tsdkd(
            d, method.objective, teacher_dir=ctx.teacher_dir, student_dir=ctx.student_dir,
            prompts_file=ctx.prompts_file, stage_dir=stage_dir, seed=seed, timeout_s=ctx.timeout_s,
            verbose=ctx.verbose, desc=f"{method.name} seed {seed}",
        )
        return model_dir, result, {"optimizer_steps_planned": d.optimizer_steps,
                                   "optimizer_steps": logged_optimizer_steps(stage_dir / "train.log", d)}
    if method.runner == "grpo":
        return run_grpo(seed, ctx, stage_dir)
    if method.runner == "seqkd":
        return run_seqkd(seed, ctx, stage_dir)
    if method.runner == "dpo":
        return run_dpo(seed, ctx, stage_dir)
    raise ValueError(f"unknown runner {method.runner!r}")


def run_grpo(seed: int, ctx: RunContext, stage_dir: Path) -> tuple[Path, CommandResult, dict]:
    d = ctx.budget.distill
    output_dir = stage_dir / "model"
    args = distill_flags(d, student_dir=ctx.student_dir, prompts_file=ctx.prompts_file, output_dir=output_dir, seed=seed)
    args += ["--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
             "--logger.tensorboard_dir", str(stage_dir / "tensorboard")]
    result = run_logged(
        upstream_command("openrlhf.cli.train_ppo_ray", args, ray_job=True), stage_dir / "train.log",
        desc=f"grpo seed {seed} ({d.rollouts} rollouts, {d.optimizer_steps} optimizer steps)", progress=StepProgress(d.rollouts, "global_step"),
        env=child_env(stage_dir), cwd=stage_dir, timeout_s=ctx.timeout_s, verbose=ctx.verbose,
    )
    require_saved_model(output_dir, "train_ppo_ray (GRPO)")
    return output_dir, result, {"optimizer_steps_planned": d.optimizer_steps,
                                "optimizer_steps": logged_optimizer_steps(stage_dir / "train.log", d)}


def _distill_sft_recipe(ctx: RunContext, n_rows: int, batch_size: int, seed: int) -> SFTRecipe:
    """train_sft settings matching the on-policy runs: same lr and schedule, one epoch."""
    d = ctx.budget.distill
    return SFTRecipe(role="student", n_train=n_rows, epochs=1, batch_size=batch_size, lr=d.lr,
                     lr_scheduler=d.lr_scheduler, warmup_ratio=d.warmup_ratio, seed=seed, max_len=d.max_len)


def run_seqkd(seed: int, ctx: RunContext, stage_dir: Path) -> tuple[Path, CommandResult, dict]:
    d = ctx.budget.distill
    rows = ctx.prompt_rows[: d.n_prompts]
    responses = sample_responses(ctx.teacher_dir, rows, d.samples_per_prompt, seed, d.max_new_tokens,
                                 desc=f"seqkd seed {seed}: teacher sampling")
    data = [{arith_task.PROMPT_KEY: row[arith_task.PROMPT_KEY], arith_task.SFT_OUTPUT_KEY: _assistant(text)}
            for row, group in zip(rows, responses) for text in group]
    data_file = arith_task.write_jsonl(stage_dir / "seqkd_sft.jsonl", data)
    recipe = _distill_sft_recipe(ctx, len(data), d.train_batch_size, seed)
    output_dir = stage_dir / "model"
    command = upstream_command(
        "openrlhf.cli.train_sft", sft_flags(recipe, ctx.student_dir, data_file, output_dir, stage_dir / "ds-ckpt"),
        ray_job=False,
    )
    result = run_logged(
        command, stage_dir / "train.log", desc=f"seqkd seed {seed} ({recipe.steps} steps)",
        progress=StepProgress(recipe.steps, "epoch_bar"), env=child_env(stage_dir), cwd=stage_dir,
        timeout_s=ctx.timeout_s, verbose=ctx.verbose,
    )
    require_saved_model(output_dir, "train_sft (SeqKD)")
    correct = sum(arith_task.verify(text, row[arith_task.LABEL_KEY]) for row, group in zip(rows, responses) for text in group)
    return output_dir, result, {"optimizer_steps": recipe.steps, "teacher_sample_accuracy": correct / max(1, len(data))}


def run_dpo(seed: int, ctx: RunContext, stage_dir: Path) -> tuple[Path, CommandResult, dict]:
    d = ctx.budget.distill
    rows = ctx.prompt_rows[: d.n_prompts]
    responses = sample_responses(ctx.student_dir, rows, d.samples_per_prompt, seed, d.max_new_tokens,
                                 desc=f"dpo seed {seed}: student sampling")
    scores = teacher_scores(ctx.teacher_dir, rows, responses)
    data, chosen_correct, rejected_correct = [], 0, 0
    for row, group, group_scores in zip(rows, responses, scores):
        for chosen, rejected in ranked_pairs(group, group_scores):
            data.append({arith_task.PROMPT_KEY: row[arith_task.PROMPT_KEY], arith_task.CHOSEN_KEY: _assistant(chosen),
                         arith_task.REJECTED_KEY: _assistant(rejected)})
            chosen_correct += arith_task.verify(chosen, row[arith_task.LABEL_KEY])
            rejected_correct += arith_task.verify(rejected, row[arith_task.LABEL_KEY])
    # A pair holds two sequences: half as many pairs per step gives the same sequences per step.
    pair_batch = max(1, d.train_batch_size // 2)
    pair_micro = max(1, d.micro_batch_size // 2)
    if len(data) < pair_batch:
        raise StageFailed(f"dpo seed {seed}: only {len(data)} distinct pairs, fewer than one batch of {pair_batch}")
    data_file = arith_task.write_jsonl(stage_dir / "dpo_pairs.jsonl", data)
    steps = len(data) // pair_batch
    output_dir = stage_dir / "model"
    args = [
        "--model.model_name_or_path", str(ctx.student_dir),
        "--ref.model_name_or_path", str(ctx.student_dir),
        "--data.dataset", str(data_file),
        "--data.prompt_key", arith_task.PROMPT_KEY,
        "--data.chosen_key", arith_task.CHOSEN_KEY,
        "--data.rejected_key", arith_task.REJECTED_KEY,
        "--data.apply_chat_template",
        "--data.max_len", str(d.max_len),
        "--model.beta", str(DPO_BETA),
        "--train.batch_size", str(pair_batch),
        "--train.micro_batch_size", str(pair_micro),
        "--train.max_epochs", "1",
        "--train.seed", str(seed),
        "--adam.lr", str(d.lr),
        "--lr_scheduler", d.lr_scheduler,
        "--lr_warmup_ratio", str(d.warmup_ratio),
        *TOY_DS_FLAGS,
        "--ckpt.output_dir", str(output_dir),
        "--ckpt.path", str(stage_dir / "ds-ckpt"),
        "--logger.logging_steps", "10",
    ]
    result = run_logged(
        upstream_command("openrlhf.cli.train_dpo", args, ray_job=False), stage_dir / "train.log",
        desc=f"dpo seed {seed} ({steps} steps)", progress=StepProgress(steps, "epoch_bar"),
        env=child_env(stage_dir), cwd=stage_dir, timeout_s=ctx.timeout_s, verbose=ctx.verbose,
    )
    require_saved_model(output_dir, "train_dpo")
    n_pairs = max(1, len(data))
    return output_dir, result, {
        "optimizer_steps": steps, "pairs": len(data),
        "chosen_accuracy": chosen_correct / n_pairs, "rejected_accuracy": rejected_correct / n_pairs,
    }


# --------------------------------------------------------------------------- the comparison


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def budget_shortfall(run: Mapping) -> str | None:
    """Why a finished on-policy run is not an equal-budget result (it took another number of
    optimizer steps than planned, as counted in its log), or None. Such a run is redone: e.g.
    one trained by a trainer version that mis-sized its micro-batches."""
    planned, taken = run.get("optimizer_steps_planned"), run.get("optimizer_steps")
    if planned is not None and taken is not None and planned != taken:
        return f"it took {taken} of its {planned} optimizer steps"
    return None


def load_finished_runs(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if not p.name.endswith(".failed.json")]


def write_report(options, budget: Budget, references: Mapping, results_dir: Path, methods: Sequence[str],
                 wall_seconds: float) -> dict:
    from tsdkd_plugin.toy.report import write_comparison_report

    finished = [r for r in load_finished_runs(results_dir) if r["method"] in methods and r["seed"] in options.seed_list]
    # Only runs that got the whole budget are results; the others are listed with the reason.
    shortfall = {(r["method"], r["seed"]): budget_shortfall(r) for r in finished}
    runs = [r for r in finished if not shortfall[(r["method"], r["seed"])]]
    short = {key: why for key, why in shortfall.items() if why}
    done = {(r["method"], r["seed"]) for r in runs}
    missing = []
    for seed in options.seed_list:
        for method in methods:
            if (method, seed) not in done:
                failed = results_dir / f"{method}-seed{seed}.failed.json"
                if (method, seed) in short:
                    why = f"left out: {short[(method, seed)]}"
                elif failed.is_file():
                    why = json.loads(failed.read_text())["error"].splitlines()[0]
                else:
                    why = "not run yet"
                missing.append(f"{method} seed {seed}: {why}")
    comparison = {
        # The command that trains and reports; --report-only only rewrites its output.
        "command": [PROG, *(a for a in options.argv if a != "--report-only")],
        "machine": machine_info(),
        "difficulty": options.difficulty,
        "seeds": options.seed_list,
        "n_test": budget.n_test,
        "budget": asdict(budget),
        "references": references,
        "method_order": list(methods),
        "methods_doc": [(METHODS[m].label, METHODS[m].doc) for m in methods],
        "runs": runs,
        "missing": missing,
        "wall_seconds": wall_seconds,
    }
    return write_comparison_report(comparison, Path(options.out))


def run_comparison(options: argparse.Namespace) -> int:
    started = time.time()
    from tsdkd_plugin.toy.evaluate import evaluate_model, format_result_line, load_prompt_rows

    try:
        arith_task.check_task_name(options.task)
        arith_task.get_difficulty(options.difficulty)
    except ValueError as error:
        raise JobError(str(error)) from None
    if options.budget not in BUDGETS:
        raise JobError(f"unknown budget {options.budget!r}; valid budgets: {', '.join(BUDGETS)}")
    if options.seeds < 1:
        raise JobError(f"--seeds must be at least 1, got {options.seeds}")
    methods = parse_methods(options.methods)
    budget = with_difficulty_lengths(BUDGETS[options.budget], options.difficulty)
    if options.lr is not None:
        if options.lr <= 0:
            raise JobError(f"--lr must be positive, got {options.lr}")
        budget = replace(budget, distill=replace(budget.distill, lr=options.lr))
    check_budget(budget)
    options.seed_list = list(range(options.first_seed, options.first_seed + options.seeds))

    run_dir = Path(options.run_dir).resolve()
    results_dir = run_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(options.cache_dir).expanduser().resolve() if options.cache_dir else None
    d = budget.distill
    banner(f"comparison: {len(methods)} methods x {options.seeds} seeds, budget {budget.name}, {options.difficulty}")
    print(f"  every method: {d.n_prompts} prompts, {d.num_samples} samples, {d.optimizer_steps} optimizer steps "
          f"of {d.train_batch_size} sequences, lr {d.lr}")

    data_dir = run_dir / "data"
    files = write_task_data(data_dir, options.difficulty, d.n_prompts, budget.n_val, budget.n_test)
    models = {}
    for role, recipe in (("teacher", budget.teacher), ("student", budget.student)):
        models[role], built = trained_model_dir(recipe, options.difficulty, cache_dir, work_dir=run_dir / "logs",
                                                timeout_s=budget.stage_timeout_s, verbose=options.verbose)
        print(f"  {role}: {models[role]} ({'trained now' if built else 'reused from the cache'})")

    references_file = run_dir / "references.json"
    references = json.loads(references_file.read_text()) if references_file.is_file() else {}
    for name, role in (("teacher", "teacher"), ("initial student", "student")):
        if name not in references:
            result = evaluate_model(models[role], files["prompts_test"], max_new_tokens=d.max_new_tokens,
                                    batch_size=budget.eval_batch_size, desc=f"evaluating {name}")
            references[name] = result.accuracy
            _write_json_atomic(references_file, references)
        print(f"  {name}: {references[name]:.1%} on the test split")
    if options.report_only:
        written = write_report(options, budget, references, results_dir, methods, 0.0)
        print(f"  report: {written['markdown']}")
        return 0

    ctx = RunContext(budget=budget, teacher_dir=models["teacher"], student_dir=models["student"],
                     prompts_file=files["prompts_train"], prompt_rows=load_prompt_rows(files["prompts_train"]),
                     runs_dir=run_dir / "runs", timeout_s=options.run_timeout or budget.stage_timeout_s,
                     verbose=options.verbose)
    total = len(methods) * options.seeds
    position = 0
    for seed in options.seed_list:
        for name in methods:
            position += 1
            result_file = results_dir / f"{name}-seed{seed}.json"
            failed_file = results_dir / f"{name}-seed{seed}.failed.json"
            if result_file.is_file():
                stale = budget_shortfall(json.loads(result_file.read_text()))
                if not stale:
                    continue
                print(f"  redoing {name} seed {seed}: {stale}")
            banner(f"[{position}/{total}] {METHODS[name].label} ({name}), seed {seed}")
            run_started = time.time()
            load_at_start = machine_info()["load_average_1_5_15"]
            try:
                model_dir, command_result, notes = run_method(METHODS[name], seed, ctx)
                evaluation = evaluate_model(model_dir, files["prompts_test"], max_new_tokens=d.max_new_tokens,
                                            batch_size=budget.eval_batch_size, desc=f"evaluating {name}")
            except JobError as error:
                print(f"  FAILED: {str(error).splitlines()[0]}", file=sys.stderr)
                _write_json_atomic(failed_file, {"method": name, "seed": seed, "error": str(error)})
                continue
            print("  " + format_result_line(name, evaluation))
            failed_file.unlink(missing_ok=True)
            _write_json_atomic(result_file, {
                "method": name, "label": METHODS[name].label, "group": METHODS[name].group, "seed": seed,
                "objective": dict(METHODS[name].objective), "evaluation": evaluation.to_dict(),
                "seconds": time.time() - run_started, "train_seconds": command_result.seconds,
                "command": command_result.command,
                "model_dir": str(model_dir), "load_average_at_start": load_at_start, **notes,
            })
            write_report(options, budget, references, results_dir, methods, time.time() - started)
    written = write_report(options, budget, references, results_dir, methods, time.time() - started)
    banner("comparison written")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    # The table, as in the markdown report.
    print("\n".join(line for line in Path(written["markdown"]).read_text().splitlines() if line.startswith("|")))
    return 0


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated: {', '.join(METHODS)}; or {', '.join(METHOD_GROUPS)} (default all)")
    parser.add_argument("--budget", default="default", help=f"one of {', '.join(BUDGETS)}: teacher, student and the "
                        "per-method distillation budget (default: default, the main job's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every method (default: the budget's)")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--difficulty", default="easy")
    parser.add_argument("--run-dir", default="runs/compare", help="work directory (resumable)")
    parser.add_argument("--out", default="benchmarks/toy_results", help="where the report goes")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is stopped")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_arg_parser().parse_args(argv)
    options.argv = argv
    exit_on_sigterm()
    try:
        return run_comparison(options)
    except JobError as error:
        print(f"\n{PROG}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished runs are kept and a rerun resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
