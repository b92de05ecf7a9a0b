#!/usr/bin/env bash
# TSD-KD: Qwen2.5-14B-Instruct -> Qwen2.5-1.5B-Instruct on one node of 8 GPUs (80 GB), the
# teacher served elsewhere by vLLM (--teacher.remote_url): no teacher group in this job.
# As the reference recipe (qwen2.5-14b_to_1.5b.1node.sh) except the teacher and the layout.
#
#   GPUs here: 4 policy (student, ZeRO-2) + 4 vLLM engines (student rollouts).
#   Why: the 2 GPUs the reference gives its teacher replicas go to rollouts, which dominate the
#   step time; the teacher's forward runs on the inference cluster, which scores each sample's
#   prompt log-probs (prefill only) over HTTP.
#
# The teacher server (docs/server_teacher.md), on the inference machine, before this recipe:
#   vllm serve Qwen/Qwen2.5-14B-Instruct --served-model-name Qwen/Qwen2.5-14B-Instruct \
#     --max-logprobs 64 --max-model-len 2049 --tensor-parallel-size 2 --dtype bfloat16 \
#     --host 0.0.0.0 --port 8000
#   (--max-logprobs >= --teacher.remote_top_k below; --max-model-len >= --data.max_len + 1.)
#
# Run (data first: docs/recipes.md):
#   bash recipes/cluster/ray_up.sh head
#   python -m tsdkd_plugin.recipes_tools.prepare_data prompts --out data/tsdkd_prompts.jsonl
#   TEACHER_URL=http://<inference host>:8000 bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node-remote-teacher.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node-remote-teacher.sh
# (the launch itself checks the server first: its model name, context length, log-prob limit and
# that its tokenizer is the student's, before any Ray worker starts).
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# TEACHER_SERVED_NAME [Qwen/Qwen2.5-14B-Instruct: vllm serve --served-model-name],
# TEACHER_URL [http://127.0.0.1:8000: a server on the Ray head node; comma-separated for replicas],
# TSDKD_TEACHER_API_KEY [unset; set it when the server runs with --api-key],
# PROMPT_DATA [data/tsdkd_prompts.jsonl], OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1],
# RAY_DASHBOARD_PORT [8265], WANDB_API_KEY [unset: TensorBoard under OUTPUT_DIR].
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
TEACHER_SERVED_NAME="${TEACHER_SERVED_NAME:-Qwen/Qwen2.5-14B-Instruct}"
TEACHER_URL="${TEACHER_URL:-http://127.0.0.1:8000}"
check_model_ref STUDENT_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-qwen2.5-14b-to-1.5b-remote-teacher"

ARGS=(
  # Models. The teacher is the server's: named as it serves it; its tokenizer must be the
  # student's (Qwen2.5's, 151,665 tokens), checked id by id through the server before launch.
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_SERVED_NAME"
  --teacher.remote_url "$TEACHER_URL"

  # Layout (8 GPUs): see the header. No --teacher.placement / group sizes: no teacher group.
  --actor.num_nodes 1 --actor.num_gpus_per_node 4
  --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85
  # Sparse transport as the reference: top-64 log-probs per token (+ tail bucket). The server is
  # asked for R = 64 per position (its --max-logprobs must allow it); more makes the teacher's
  # scores of the student's candidates exact at more positions, at a proportional answer size
  # (vLLM's JSON is ~110 B x R per token: ~15 MB per 2048-token sample at R = 64; docs/server_teacher.md).
  --teacher.sparse_top_k 64 --teacher.remote_top_k 64
  # 16 samples scored at once (one request each); a request may take 10 minutes (a 2048-token
  # prefill behind a busy server), retried twice with backoff, then the run stops with the last
  # checkpoint intact.
  --teacher.remote_concurrency 16 --teacher.timeout_s 600 --teacher.max_retries 2

  # Memory: ZeRO-2 partitions gradients and Adam states over the 4 policy GPUs; gradient
  # checkpointing keeps activations of 2048-token sequences small.
  --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  # Data: prompts as chat messages rendered by the model's own chat template.
  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  # Rollouts, optimisation, objective and checkpoints: as the reference recipe (see its comments).
  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 1024 --data.max_len 2048
  --rollout.batch_size 128 --rollout.micro_batch_size 8
  --train.batch_size 128 --train.micro_batch_size 4
  --train.num_episodes 3 --train.max_epochs 1
  --actor.adam.lr 5e-6 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.0 --actor.max_norm 1.0
  --train.seed 42
  # tau must be 1: vLLM gives prompt log-probs at temperature 1 only.
  --tsdkd.beta 0.9 --tsdkd.temperature 1.0 --tsdkd.gate soft --tsdkd.indirect_level token

  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_ray_job openrlhf.cli.train_tsdkd "${ARGS[@]}"
