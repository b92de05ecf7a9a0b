#!/usr/bin/env bash
# TSD-KD: Qwen2.5-14B-Instruct -> Qwen2.5-1.5B-Instruct with a LoRA student, on one node of 8 GPUs
# with 24 GB each (L4, A10, 4090). Same data, rollouts and objective as qwen2.5-14b_to_1.5b.1node.sh;
# memory settings and the learning rate differ.
#
#   GPUs: 2 policy (LoRA student) + 2 vLLM engines + 4 teacher GPUs.
#   - LoRA (rank 64, alpha 128, every linear layer): the 1.5B base stays frozen in bf16 and
#     only ~74M adapter parameters (docs/memory.md) carry gradients and Adam states, so 2 policy
#     GPUs suffice without CPU Adam offload (full weights: 16 bytes x 1.5B = 25 GB of state).
#   - The 14B teacher (29.5 GB in bf16) does not fit one 24 GB GPU: the teacher group is prepared
#     with the same ZeRO-3 stage, sharded over its 4 GPUs (~7.4 GB each).
#   - At every weight sync the vLLM engines receive the merged weights (base + adapter delta,
#     computed out of place; tsdkd_plugin/host/lora_sync.py): rollouts stay on-policy.
#   - Micro-batch 1 (accumulation 64): a 2048 x 151,936 logit block is 1.2 GB in fp32.
#   - The final checkpoint is the adapter (OpenRLHF saves PEFT weights only). Merge it before
#     evaluation:
#       python -m openrlhf.cli.lora_combiner --model_path Qwen/Qwen2.5-1.5B-Instruct \
#         --lora_path "$OUTPUT_DIR/final" --output_path "$OUTPUT_DIR/merged"
#
# reference-setup-deviation: actor.adam.lr (LoRA adapters need a larger step than full weights: 1e-4, the usual LoRA rate, instead of 5e-6)
#
# Run: bash recipes/cluster/ray_up.sh head && bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node-24gb-lora.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node-24gb-lora.sh
#
# gpu-memory-gb: 24
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# TEACHER_MODEL [Qwen/Qwen2.5-14B-Instruct], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265], WANDB_API_KEY.
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
TEACHER_MODEL="${TEACHER_MODEL:-Qwen/Qwen2.5-14B-Instruct}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-qwen2.5-14b-to-1.5b-24gb-lora"

ARGS=(
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_MODEL"

  --actor.num_nodes 1 --actor.num_gpus_per_node 2
  --vllm.num_engines 2 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85
  --teacher.placement separate --teacher.num_nodes 1 --teacher.num_gpus_per_node 4
  --teacher.sparse_top_k 64

  # Memory: see the header.
  --ds.lora.rank 64 --ds.lora.alpha 128 --ds.lora.target_modules all-linear --ds.lora.dropout 0
  --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 1024 --data.max_len 2048
  --rollout.batch_size 128 --rollout.micro_batch_size 2
  --train.batch_size 128 --train.micro_batch_size 1
  --train.num_episodes 3 --train.max_epochs 1
  --actor.adam.lr 1e-4 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.0 --actor.max_norm 1.0
  --train.seed 42

  --tsdkd.beta 0.9 --tsdkd.temperature 1.0 --tsdkd.gate soft --tsdkd.indirect_level token

  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_ray_job openrlhf.cli.train_tsdkd "${ARGS[@]}"
