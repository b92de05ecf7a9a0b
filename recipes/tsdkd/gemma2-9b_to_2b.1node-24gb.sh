#!/usr/bin/env bash
# TSD-KD: Gemma-2-9B-it -> Gemma-2-2B-it on one node of 8 GPUs with 24 GB each (L4, A10, 4090),
# teacher on its own GPUs. Same training setup as gemma2-9b_to_2b.1node.sh; memory settings differ.
#
#   GPUs: 4 policy + 2 vLLM engines + 2 teacher GPUs, as the 80 GB recipe, but
#   - ZeRO-3 with Adam states offloaded to CPU: the student's bf16 weights, gradients and fp32
#     Adam states (16 bytes x 2.6B = 42 GB) would not fit 4 x 24 GB; sharded and offloaded, about
#     2.4 GiB of them stay on each GPU and 7.3 GiB per GPU go to host memory (docs/memory.md).
#   - The teacher (9.2B, 18.5 GB in bf16) no longer fits one 24 GB GPU next to its activations:
#     the teacher group prepares it with the same ZeRO-3 stage, so its 2 GPUs hold half each.
#   - Micro-batch 1 (accumulation 32): a 2048 x 256,000 logit row block is 2 GB in fp32.
#   Slower per step than the 80 GB recipe (CPU Adam, ZeRO-3 gathers); same results in expectation.
#
# Run: bash recipes/cluster/ray_up.sh head && bash recipes/tsdkd/gemma2-9b_to_2b.1node-24gb.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/gemma2-9b_to_2b.1node-24gb.sh
#
# gpu-memory-gb: 24
# Environment (defaults in brackets): STUDENT_MODEL [google/gemma-2-2b-it],
# TEACHER_MODEL [google/gemma-2-9b-it], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265], WANDB_API_KEY.
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-google/gemma-2-2b-it}"
TEACHER_MODEL="${TEACHER_MODEL:-google/gemma-2-9b-it}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-gemma2-9b-to-2b-24gb"

ARGS=(
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_MODEL"

  --actor.num_nodes 1 --actor.num_gpus_per_node 4
  --vllm.num_engines 2 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85
  --teacher.placement separate --teacher.num_nodes 1 --teacher.num_gpus_per_node 2
  --teacher.sparse_top_k 64

  # Memory: see the header.
  --ds.zero_stage 3 --ds.adam_offload --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 1024 --data.max_len 2048
  --rollout.batch_size 128 --rollout.micro_batch_size 2
  --train.batch_size 128 --train.micro_batch_size 1
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
