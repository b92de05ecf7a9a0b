#!/usr/bin/env bash
# TSD-KD: Gemma-2-9B-it -> Gemma-2-2B-it on two nodes of 8 GPUs (80 GB).
# Differs from gemma2-9b_to_2b.1node.sh in layout only; same training setup.
#
#   GPUs: 16. Policy on 8 (ZeRO-2, micro 2 x 8 accumulation = 128: Gemma's 256k-row logits),
#   4 vLLM engines, 4 teacher replicas. Ray places each group where GPUs are free; the policy
#   group fills one node, rollout engines and teacher replicas the other, so the NCCL-heavy
#   gradient traffic stays inside a node.
#
# Multi-node steps:
#   1. node 0:      bash recipes/cluster/ray_up.sh head
#   2. node 1:      RAY_HEAD_ADDRESS=<node 0 IP> bash recipes/cluster/ray_up.sh worker
#   3. data once, on the shared file system:
#                   python -m tsdkd_plugin.recipes_tools.prepare_data prompts --out $SHARED_DIR/data/tsdkd_prompts.jsonl
#   4. anywhere that reaches node 0:
#                   RAY_HEAD_ADDRESS=<node 0 IP> SHARED_DIR=/shared/tsdkd bash recipes/tsdkd/gemma2-9b_to_2b.2nodes.sh
# Check without a cluster:
#   RAY_HEAD_ADDRESS=x SHARED_DIR=/shared/tsdkd TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/gemma2-9b_to_2b.2nodes.sh
#
# Environment: RAY_HEAD_ADDRESS (required), SHARED_DIR (required: a directory every node mounts
# at the same path; data and checkpoints live there), STUDENT_MODEL [google/gemma-2-2b-it],
# TEACHER_MODEL [google/gemma-2-9b-it], PROMPT_DATA [$SHARED_DIR/data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [$SHARED_DIR/ckpt/<recipe>], RAY_DASHBOARD_PORT [8265], WANDB_API_KEY.
source "$(dirname "$0")/../lib/common.sh"

require_env RAY_HEAD_ADDRESS "the IP or host name of the Ray head node (see recipes/cluster/ray_up.sh)"
require_env SHARED_DIR "a directory on a file system that every node mounts at the same path"
STUDENT_MODEL="${STUDENT_MODEL:-google/gemma-2-2b-it}"
TEACHER_MODEL="${TEACHER_MODEL:-google/gemma-2-9b-it}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$SHARED_DIR/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$SHARED_DIR/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-gemma2-9b-to-2b-2nodes"

ARGS=(
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_MODEL"

  # Layout (16 GPUs on 2 nodes): see the header.
  --actor.num_nodes 1 --actor.num_gpus_per_node 8
  --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85
  --teacher.placement separate --teacher.num_nodes 1 --teacher.num_gpus_per_node 4
  --teacher.sparse_top_k 64

  --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 1024 --data.max_len 2048
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
