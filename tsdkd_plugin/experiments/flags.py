"""The OpenRLHF flags of every toy training command: SFT (`train_sft`), on-policy runs (`train_tsdkd`,
`train_ppo_ray`), the TSD-KD objective, and DPO (`train_dpo`). Every value comes from a budget
(`tsdkd_plugin.experiments.budgets`), so two methods given the same budget get the same flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tsdkd_plugin.toy
from tsdkd_plugin.experiments.budgets import DistillBudget, SFTRecipe
from tsdkd_plugin.toy import arith_task

# Passed by path to OpenRLHF (--reward.remote_url), which imports it by itself.
REWARD_FUNC_PATH = Path(tsdkd_plugin.toy.__file__).resolve().with_name("reward_func.py")


# DeepSpeed settings of every toy training command (SFT, DPO, GRPO, TSD-KD): one CPU process
# (nothing to shard), fp32 (bf16 matmuls are slow on most CPUs), PyTorch attention.
TOY_DS_FLAGS = ("--ds.zero_stage", "0", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa")


# OpenRLHF's `blending_datasets` splits --data.dataset / --data.prompt_dataset at these: a list of
# datasets at ',', a dataset and its split name at '@'.
DATASET_PATH_SEPARATORS = ",@"


def dataset_flag_value(data_file: Path) -> str:
    """The value of --data.dataset / --data.prompt_dataset for one data file. OpenRLHF's
    `blending_datasets` reads it as a comma-separated list of datasets and cuts each at "@" (a split
    name), so a path holding either would load something else: a ValueError naming the path. Runs
    whose directory names hold a comma (a comparison's "lr=3e-05,beta=0.5" run directories) pass the
    file's name relative to the trainer's working directory instead."""
    value = str(data_file)
    if any(mark in value for mark in DATASET_PATH_SEPARATORS):
        raise ValueError(
            f"data file {value} has a ',' or '@' in its path, which OpenRLHF's --data.dataset reads as a "
            "list separator or a split name: use a directory without them (or a path relative to the "
            "trainer's working directory)"
        )
    return value


def sft_flags(recipe: SFTRecipe, model_dir: Path, data_file: Path, output_dir: Path, ds_ckpt_dir: Path) -> list[str]:
    """train_sft flags; the micro batch equals the batch, so one step is one optimizer update."""
    return [
        "--model.model_name_or_path",
        str(model_dir),
        "--data.dataset",
        dataset_flag_value(data_file),
        "--data.input_key",
        arith_task.PROMPT_KEY,
        "--data.output_key",
        arith_task.SFT_OUTPUT_KEY,
        "--data.apply_chat_template",
        "--data.max_len",
        str(recipe.max_len),
        "--train.batch_size",
        str(recipe.batch_size),
        "--train.micro_batch_size",
        str(recipe.batch_size),
        "--train.max_epochs",
        str(recipe.epochs),
        "--train.seed",
        str(recipe.seed),
        "--adam.lr",
        str(recipe.lr),
        "--lr_scheduler",
        recipe.lr_scheduler,
        "--lr_warmup_ratio",
        str(recipe.warmup_ratio),
        "--min_lr_ratio",
        str(recipe.min_lr_ratio),
        *TOY_DS_FLAGS,
        "--ckpt.output_dir",
        str(output_dir),
        # DeepSpeed checkpoints (none are written without --ckpt.save_steps) stay out of the cache.
        "--ckpt.path",
        str(ds_ckpt_dir),
        "--logger.logging_steps",
        "10",
    ]


def distill_flags(
    budget: DistillBudget,
    *,
    student_dir: Path,
    prompts_file: Path,
    output_dir: Path,
    seed: int,
    with_verifier_reward: bool = True,
) -> list[str]:
    """Flags shared by every on-policy run (train_tsdkd, train_ppo_ray): upstream train_ppo_ray's own."""
    flags = [
        "--actor.model_name_or_path",
        str(student_dir),
        "--data.prompt_dataset",
        dataset_flag_value(prompts_file),
        "--data.input_key",
        arith_task.PROMPT_KEY,
        "--data.label_key",
        arith_task.LABEL_KEY,
        "--data.apply_chat_template",
        "--data.max_samples",
        str(budget.n_prompts),
        "--data.max_len",
        str(budget.max_len),
        "--rollout.max_new_tokens",
        str(budget.max_new_tokens),
        "--rollout.n_samples_per_prompt",
        str(budget.samples_per_prompt),
        "--rollout.batch_size",
        str(budget.rollout_batch_size),
        "--rollout.micro_batch_size",
        str(budget.micro_batch_size),
        "--rollout.temperature",
        "1.0",
        "--train.batch_size",
        str(budget.train_batch_size),
        "--train.micro_batch_size",
        str(budget.micro_batch_size),
        "--train.max_epochs",
        "1",
        "--train.num_episodes",
        "1",
        "--train.seed",
        str(seed),
        "--actor.adam.lr",
        str(budget.lr),
        "--actor.lr_scheduler",
        budget.lr_scheduler,
        "--actor.lr_warmup_ratio",
        str(budget.warmup_ratio),
        "--actor.num_nodes",
        "1",
        "--actor.num_gpus_per_node",
        "1",
        "--vllm.num_engines",
        "1",
        "--vllm.tensor_parallel_size",
        "1",
        # No graph capture for a toy model: on these CPUs it costs 9-10 s of every engine start
        # (vLLM's AOT-compile cache fails to reload, "'function' object has no attribute
        # 'finalize_loading'", so every run compiles again) and saves nothing per rollout; the
        # losses of a 4-rollout TSD-KD run were bit-identical with and without it.
        "--vllm.enforce_eager",
        *TOY_DS_FLAGS,
        "--ckpt.output_dir",
        str(output_dir),
        "--ckpt.path",
        str(output_dir.parent / "ds-ckpt"),
        "--ckpt.save_steps",
        "-1",
        "--logger.logging_steps",
        "1",
    ]
    if with_verifier_reward:
        # Training-time sample accuracy is logged as the reward; the TSD-KD loss does not use it.
        flags += ["--reward.remote_url", str(REWARD_FUNC_PATH)]
    return flags


def tsdkd_flags(objective: Mapping[str, object], *, teacher_dir: Path, placement: str = "colocate") -> list[str]:
    """--teacher.* and --tsdkd.* flags. Colocated by default: on two cores a separate teacher
    process would only add start-up time and inter-process transport."""
    flags = [
        "--teacher.model_name_or_path",
        str(teacher_dir),
        "--teacher.placement",
        placement,
        "--teacher.num_nodes",
        "1",
        "--teacher.num_gpus_per_node",
        "1",
    ]
    for name, value in objective.items():
        flags += [f"--tsdkd.{name}", str(value)]
    return flags


def grpo_flags(estimator: str = "group_norm") -> list[str]:
    """GRPO through upstream train_ppo_ray: group-normalized advantages (or another critic-free
    estimator) from the verifier reward, which distill_flags adds; no KL term (--algo.kl.init_coef 0:
    no reference model)."""
    return ["--algo.advantage.estimator", estimator, "--algo.kl.init_coef", "0"]


def dpo_flags(
    budget: DistillBudget,
    *,
    student_dir: Path,
    data_file: Path,
    output_dir: Path,
    ds_ckpt_dir: Path,
    beta: float,
    seed: int,
) -> list[str]:
    """train_dpo flags on a pairs file; a pair holds two sequences, so half as many pairs per step as
    the budget's sequences per step (and per micro batch) gives the same sequences per step."""
    return [
        "--model.model_name_or_path",
        str(student_dir),
        "--ref.model_name_or_path",
        str(student_dir),
        "--data.dataset",
        dataset_flag_value(data_file),
        "--data.prompt_key",
        arith_task.PROMPT_KEY,
        "--data.chosen_key",
        arith_task.CHOSEN_KEY,
        "--data.rejected_key",
        arith_task.REJECTED_KEY,
        "--data.apply_chat_template",
        "--data.max_len",
        str(budget.max_len),
        "--model.beta",
        str(beta),
        "--train.batch_size",
        str(dpo_pair_batch(budget)),
        "--train.micro_batch_size",
        str(max(1, budget.micro_batch_size // 2)),
        "--train.max_epochs",
        "1",
        "--train.seed",
        str(seed),
        "--adam.lr",
        str(budget.lr),
        "--lr_scheduler",
        budget.lr_scheduler,
        "--lr_warmup_ratio",
        str(budget.warmup_ratio),
        *TOY_DS_FLAGS,
        "--ckpt.output_dir",
        str(output_dir),
        "--ckpt.path",
        str(ds_ckpt_dir),
        "--logger.logging_steps",
        "10",
    ]


def dpo_pair_batch(budget: DistillBudget) -> int:
    """Pairs per DPO optimizer step: as many sequences per step as the on-policy methods train on."""
    return max(1, budget.train_batch_size // 2)
