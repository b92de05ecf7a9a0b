#!/usr/bin/env bash
# Data for the DPO baseline (recipes/baselines/dpo.1node.sh): preference pairs on the TSD-KD prompts.
# The student samples 4 responses per prompt with vLLM (temperature 1.0, 1024 new tokens, as
# TSD-KD's rollouts); the teacher scores each with TSD-KD's own sequence score (its
# length-normalized log-likelihood of the response, computed by the TSD-KD teacher's code); the
# best-scored response is `chosen`, the worst `rejected`.
#
#   One node, NUM_GPUS GPUs, no Ray: the prompts are split into one shard per GPU; each shard is
#   sampled by its own vLLM engine, then scored by its own teacher replica (a 14B teacher in bf16
#   fits one 80 GB GPU; the teacher must fit one GPU). Resumable: finished shards in WORK_DIR are
#   kept, so rerunning after a crash continues (delete WORK_DIR when models or prompts change).
#
# Run (after prepare_data prompts, docs/recipes.md), on a GPU node:
#   bash recipes/baselines/dpo_pairs.1node.sh      # -> data/dpo_pairs.jsonl, then dpo.1node.sh
# Other pairs: STUDENT_MODEL=google/gemma-2-2b-it TEACHER_MODEL=google/gemma-2-9b-it, or
# Qwen/Qwen3-1.7B and Qwen/Qwen3-8B (with MAX_NEW_TOKENS=2048).
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# TEACHER_MODEL [Qwen/Qwen2.5-14B-Instruct], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# DPO_PAIRS [data/dpo_pairs.jsonl], WORK_DIR [gen/dpo_pairs], NUM_GPUS [8], NUM_SAMPLES [4],
# MAX_NEW_TOKENS [1024], PYTHON [python3].
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
TEACHER_MODEL="${TEACHER_MODEL:-Qwen/Qwen2.5-14B-Instruct}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path DPO_PAIRS "$REPO_ROOT/data/dpo_pairs.jsonl"
shared_path WORK_DIR "$REPO_ROOT/gen/dpo_pairs"

ARGS=(
  --student "$STUDENT_MODEL" --teacher "$TEACHER_MODEL"
  --prompts "$PROMPT_DATA" --out "$DPO_PAIRS" --work-dir "$WORK_DIR"
  --gpus "${NUM_GPUS:-8}" --gpus-per-process 1
  --num-samples "${NUM_SAMPLES:-4}" --temperature 1.0 --top-p 1.0 --max-new-tokens "${MAX_NEW_TOKENS:-1024}"
  --dtype bf16
)

run_on_this_node tsdkd_plugin.recipes_tools.dpo_pairs "${ARGS[@]}"
