"""The compared methods, each run at the same distillation budget from the same initial student.

  seqkd       SFT (OpenRLHF `train_sft`) on solutions the teacher samples for the train prompts
  gkd         on-policy generalized JSD on every token (`train_tsdkd --tsdkd.gate none`, no ranking, no entropy term)
  grpo        OpenRLHF `train_ppo_ray --algo.advantage.estimator group_norm` with the task's verifier reward
  dpo         OpenRLHF `train_dpo` on teacher-ranked pairs of the student's own samples
  tsdkd       `train_tsdkd` with the default objective
  ablations   tsdkd without the direct / indirect / entropy term, hard gate, sequence-level and
              token+sequence ranking, gated JSD alone, entropy term on the top 10%, the terms
              rescaled to the direct term's size, and the reference code's (wrong) prefix ListMLE

`run_method` trains one (method, seed) and returns the saved model with what its run logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from tsdkd_plugin.experiments.budgets import Budget, DistillBudget, SFTRecipe
from tsdkd_plugin.experiments.evaluate import sample_responses, teacher_scores
from tsdkd_plugin.experiments.flags import (
    GRPO_FLAGS,
    distill_flags,
    dpo_flags,
    dpo_pair_batch,
    sft_flags,
    tsdkd_flags,
)
from tsdkd_plugin.experiments.metrics import logged_rollouts, logged_samples, training_curve
from tsdkd_plugin.experiments.runner import (
    CommandResult,
    JobError,
    StageFailed,
    StepProgress,
    child_env,
    fresh_stage_dir,
    require_saved_model,
    run_logged,
    tsdkd_command,
    upstream_command,
)
from tsdkd_plugin.toy import arith_task

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


def run_on_policy(
    budget: DistillBudget,
    *,
    trainer: str,
    method_flags: Sequence[str],
    student_dir: Path,
    prompts_file: Path,
    stage_dir: Path,
    seed: int,
    timeout_s: float,
    verbose: bool = False,
    desc: str,
) -> tuple[Path, CommandResult, dict]:
    """One on-policy run: `train_tsdkd` (trainer "tsdkd") or upstream `train_ppo_ray` (trainer "grpo")
    with the budget's shared flags plus `method_flags`. Returns (saved HF model dir, command result,
    notes: what the run logged to TensorBoard, its per-rollout curve and the rollouts and samples it
    really trained on, which checks rather than assumes that it got its budget)."""
    output_dir = stage_dir / "model"
    tensorboard_dir = stage_dir / "tensorboard"
    args = distill_flags(budget, student_dir=student_dir, prompts_file=prompts_file, output_dir=output_dir, seed=seed)
    args += [*method_flags, "--logger.tensorboard_dir", str(tensorboard_dir)]
    if trainer == "tsdkd":
        command = tsdkd_command(args)
    elif trainer == "grpo":
        command = upstream_command("openrlhf.cli.train_ppo_ray", args, ray_job=True)
    else:
        raise ValueError(f"unknown on-policy trainer {trainer!r}")
    result = run_logged(
        command, stage_dir / "train.log",
        desc=f"{desc} ({budget.rollouts} rollouts, {budget.optimizer_steps} optimizer steps)",
        progress=StepProgress(budget.rollouts, "global_step"), env=child_env(stage_dir), cwd=stage_dir,
        timeout_s=timeout_s, verbose=verbose,
    )
    require_saved_model(output_dir, desc)
    curve = training_curve(tensorboard_dir)
    return output_dir, result, {
        "rollouts_planned": budget.rollouts, "rollouts": logged_rollouts(curve),
        "samples_planned": budget.num_samples, "samples": logged_samples(curve),
        "optimizer_steps_planned": budget.optimizer_steps,
        "optimizer_steps": logged_samples(curve) // budget.train_batch_size,
        "training_curve": curve,
    }


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
    on_policy = dict(student_dir=ctx.student_dir, prompts_file=ctx.prompts_file, stage_dir=stage_dir, seed=seed,
                     timeout_s=ctx.timeout_s, verbose=ctx.verbose, desc=f"{method.name} seed {seed}")
    if method.runner == "tsdkd":
        return run_on_policy(d, trainer="tsdkd", method_flags=tsdkd_flags(method.objective, teacher_dir=ctx.teacher_dir),
                             **on_policy)
    if method.runner == "grpo":
        return run_on_policy(d, trainer="grpo", method_flags=GRPO_FLAGS, **on_policy)
    if method.runner == "seqkd":
        return run_seqkd(seed, ctx, stage_dir)
    if method.runner == "dpo":
        return run_dpo(seed, ctx, stage_dir)
    raise ValueError(f"unknown runner {method.runner!r}")


def _distill_sft_recipe(ctx: RunContext, n_rows: int, batch_size: int, seed: int) -> SFTRecipe:
    """train_sft settings matching the on-policy runs: same lr and schedule, one epoch."""
    d = ctx.budget.distill
    return SFTRecipe(role="student", n_train=n_rows, epochs=1, batch_size=batch_size, lr=d.lr,
                     lr_scheduler=d.lr_scheduler, warmup_ratio=d.warmup_ratio, seed=seed, max_len=d.max_len)


def _run_offline_trainer(module: str, args: list[str], steps: int, stage_dir: Path, ctx: RunContext,
                         desc: str) -> tuple[Path, CommandResult, dict]:
    """train_sft / train_dpo on a data file written for this run; their TensorBoard curve is kept."""
    tensorboard_dir = stage_dir / "tensorboard"
    result = run_logged(
        upstream_command(module, [*args, "--logger.tensorboard_dir", str(tensorboard_dir)], ray_job=False),
        stage_dir / "train.log", desc=f"{desc} ({steps} steps)", progress=StepProgress(steps, "epoch_bar"),
        env=child_env(stage_dir), cwd=stage_dir, timeout_s=ctx.timeout_s, verbose=ctx.verbose,
    )
    output_dir = stage_dir / "model"
    require_saved_model(output_dir, module.rsplit(".", 1)[-1])
    return output_dir, result, {"optimizer_steps": steps, "training_curve": training_curve(tensorboard_dir)}


def run_seqkd(seed: int, ctx: RunContext, stage_dir: Path) -> tuple[Path, CommandResult, dict]:
    d = ctx.budget.distill
    rows = ctx.prompt_rows[: d.n_prompts]
    responses = sample_responses(ctx.teacher_dir, rows, d.samples_per_prompt, seed, d.max_new_tokens,
                                 desc=f"seqkd seed {seed}: teacher sampling")
    data = [{arith_task.PROMPT_KEY: row[arith_task.PROMPT_KEY], arith_task.SFT_OUTPUT_KEY: _assistant(text)}
            for row, group in zip(rows, responses) for text in group]
    data_file = arith_task.write_jsonl(stage_dir / "seqkd_sft.jsonl", data)
    recipe = _distill_sft_recipe(ctx, len(data), d.train_batch_size, seed)
    args = sft_flags(recipe, ctx.student_dir, data_file, stage_dir / "model", stage_dir / "ds-ckpt")
    model_dir, result, notes = _run_offline_trainer("openrlhf.cli.train_sft", args, recipe.steps, stage_dir, ctx,
                                                    f"seqkd seed {seed}")
    correct = sum(arith_task.verify(text, row[arith_task.LABEL_KEY]) for row, group in zip(rows, responses) for text in group)
    return model_dir, result, {**notes, "teacher_sample_accuracy": correct / max(1, len(data))}


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
    pair_batch = dpo_pair_batch(d)
    if len(data) < pair_batch:
        raise StageFailed(f"dpo seed {seed}: only {len(data)} distinct pairs, fewer than one batch of {pair_batch}")
    data_file = arith_task.write_jsonl(stage_dir / "dpo_pairs.jsonl", data)
    args = dpo_flags(d, student_dir=ctx.student_dir, data_file=data_file, output_dir=stage_dir / "model",
                     ds_ckpt_dir=stage_dir / "ds-ckpt", beta=DPO_BETA, seed=seed)
    model_dir, result, notes = _run_offline_trainer("openrlhf.cli.train_dpo", args, len(data) // pair_batch,
                                                    stage_dir, ctx, f"dpo seed {seed}")
    n_pairs = max(1, len(data))
    return model_dir, result, {
        **notes, "pairs": len(data),
        "chosen_accuracy": chosen_correct / n_pairs, "rejected_accuracy": rejected_correct / n_pairs,
    }
