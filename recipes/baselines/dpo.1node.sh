#!/usr/bin/env bash
# Baseline: OpenRLHF DPO on the student with offline pairs built from the same prompts as TSD-KD:
# the teacher's response preferred to the student's, or the teacher's best-scored student sample
# preferred to its worst (recipes/baselines/dpo_pairs.1node.sh). One node, 8 GPUs.
#
#   8 processes under ZeRO-3: policy and frozen reference (the start model) both sharded.
#   A DeepSpeed job (`deepspeed --module openrlhf.cli.train_dpo`, no Ray actors), submitted through
#   the Ray head like every recipe: Ray runs it on a node with NUM_GPUS free GPUs and reserves them.
#   Same budget as TSD-KD where it applies: 3 epochs over one pair per prompt, effective batch
#   128 (8 GPUs x micro 2 x 8 accumulation), cosine with 10% warm-up, bf16. DPO's usual learning
#   rate (5e-7) and beta 0.1: at TSD-KD's 5e-6, DPO on 1-2B models overfits the pairs in an epoch.
#
# Data: the student samples 4 responses per TSD-KD prompt, the teacher ranks them (its
# length-normalized log-likelihood, the score of TSD-KD's sequence-level ranking), best vs worst:
#   bash recipes/baselines/dpo_pairs.1node.sh          # writes data/dpo_pairs.jsonl
# Run: bash recipes/cluster/ray_up.sh head && bash recipes/baselines/dpo.1node.sh
# Other pairs: STUDENT_MODEL=google/gemma-2-2b-it or Qwen/Qwen3-1.7B.
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# DPO_PAIRS [data/dpo_pairs.jsonl], NUM_GPUS [8], OUTPUT_DIR [ckpt/<recipe>],
# RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265], WANDB_API_KEY.
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
check_model_ref STUDENT_MODEL
shared_path DPO_PAIRS "$REPO_ROOT/data/dpo_pairs.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
NUM_GPUS="${NUM_GPUS:-8}"
logger_args "dpo-baseline"

ARGS=(
  --model.model_name_or_path "$STUDENT_MODEL"
  --ref.model_name_or_path "$STUDENT_MODEL"

  --data.dataset "$DPO_PAIRS" --data.prompt_key prompt --data.chosen_key chosen --data.rejected_key rejected
  --data.apply_chat_template --data.max_len 2048

  --ds.zero_stage 3 --ds.param_dtype bf16 --model.gradient_checkpointing_enable

  --model.beta 0.1
  --train.batch_size 128 --train.micro_batch_size 2 --train.max_epochs 3
  --adam.lr 5e-7 --lr_scheduler cosine --lr_warmup_ratio 0.1
  --adam.betas 0.9 0.999 --adam.weight_decay 0.0 --max_norm 1.0
  --train.seed 42

  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_deepspeed "$NUM_GPUS" openrlhf.cli.train_dpo "${ARGS[@]}"
