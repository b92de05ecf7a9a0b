#!/usr/bin/env bash
# TSD-KD: Qwen3-8B -> Qwen3-1.7B on one node of 8 GPUs (80 GB),
# everything colocated: student, vLLM engines and teacher share all 8 GPUs.
# Differs from qwen3-8b_to_1.7b.1node.sh in layout only; same training setup.
#
#   GPUs: 8 shared. Policy on 8 GPUs under ZeRO-3, 8 vLLM engines (TP 1) that sleep while the
#   policy trains, and the teacher loaded inside each policy actor (dense transport: full teacher
#   logits, no Ray transfer, no top-K truncation).
#   Why ZeRO-3: the colocated teacher is prepared with the policy's DeepSpeed stage, so ZeRO-3
#   shards its 8.2B bf16 weights 8 ways (~2 GB per GPU instead of ~16.4 GB), which leaves room
#   for vLLM's KV cache and the logits of 3072-token thinking sequences (docs/memory.md).
#   When: twice the rollout engines and policy GPUs of the separate layout, at the price of
#   phases that do not overlap (generate, then score and train).
#
# Run: bash recipes/cluster/ray_up.sh head && bash recipes/tsdkd/qwen3-8b_to_1.7b.1node-colocate.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/qwen3-8b_to_1.7b.1node-colocate.sh
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen3-1.7B],
# TEACHER_MODEL [Qwen/Qwen3-8B], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265],
# WANDB_API_KEY [unset: TensorBoard under OUTPUT_DIR].
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen3-1.7B}"
TEACHER_MODEL="${TEACHER_MODEL:-Qwen/Qwen3-8B}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-qwen3-8b-to-1.7b-colocate"

ARGS=(
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_MODEL"

  # Layout: all colocated on 8 GPUs. Upstream requires vLLM engines x TP = policy GPUs here.
  --actor.num_nodes 1 --actor.num_gpus_per_node 8
  --train.colocate_all
  --vllm.num_engines 8 --vllm.tensor_parallel_size 1
  # Sleep: vLLM frees its KV cache and weights while the policy trains, DeepSpeed offloads the
  # policy's states while vLLM generates, so the two phases do not add up.
  --vllm.enable_sleep --ds.enable_sleep --vllm.gpu_memory_utilization 0.6
  --teacher.placement colocate

  --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  # Rollouts and optimisation: as qwen3-8b_to_1.7b.1node.sh (thinking: 2048 new tokens).
  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 2048 --data.max_len 3072
  --rollout.batch_size 128 --rollout.micro_batch_size 4
  --train.batch_size 128 --train.micro_batch_size 2
  --train.num_episodes 3 --train.max_epochs 1
  --actor.adam.lr 5e-6 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.0 --actor.max_norm 1.0
  --train.seed 42

  --tsdkd.beta 0.9 --tsdkd.temperature 1.0 --tsdkd.gate soft --tsdkd.indirect_level token

  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_ray_job openrlhf.cli.train_tsdkd "${ARGS[@]}"
