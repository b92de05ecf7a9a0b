#!/usr/bin/env bash
# TSD-KD: Qwen2.5-14B-Instruct -> Qwen2.5-1.5B-Instruct on one node of 8 GPUs (80 GB),
# teacher on its own GPUs. The reference recipe: the other recipes differ from it only where
# their header says so.
#
#   GPUs: 4 policy (student, ZeRO-2) + 2 vLLM engines (student rollouts) + 2 teacher replicas.
#   Why: the student's training state is small (docs/memory.md), so 4 GPUs train it; rollouts of
#   1024-token chains of thought dominate the step time, so 2 engines; a 14B teacher in bf16
#   (~30 GB) fits one GPU, and two replicas score a rollout batch while the policy trains.
#
# Run (data first: docs/recipes.md):
#   bash recipes/cluster/ray_up.sh head
#   python -m tsdkd_plugin.recipes_tools.prepare_data prompts --out data/tsdkd_prompts.jsonl
#   bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/qwen2.5-14b_to_1.5b.1node.sh
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# TEACHER_MODEL [Qwen/Qwen2.5-14B-Instruct], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265],
# WANDB_API_KEY [unset: TensorBoard under OUTPUT_DIR].
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
TEACHER_MODEL="${TEACHER_MODEL:-Qwen/Qwen2.5-14B-Instruct}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-qwen2.5-14b-to-1.5b"

ARGS=(
  # Models. Both use Qwen2.5's tokenizer (151,665 tokens); their logit rows differ
  # (151,936 vs 152,064) and the objective compares the shared ids only.
  --actor.model_name_or_path "$STUDENT_MODEL"
  --teacher.model_name_or_path "$TEACHER_MODEL"

  # Layout (8 GPUs): see the header.
  --actor.num_nodes 1 --actor.num_gpus_per_node 4
  --vllm.num_engines 2 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85
  --teacher.placement separate --teacher.num_nodes 1 --teacher.num_gpus_per_node 2
  # Separate teacher: its signals travel through Ray as top-K log-probs per token (plus a tail
  # bucket), not as 152k-wide rows.
  --teacher.sparse_top_k 64

  # Memory: ZeRO-2 partitions gradients and Adam states over the 4 policy GPUs; gradient
  # checkpointing keeps activations of 2048-token sequences small.
  --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  # Data: prompts as chat messages rendered by the model's own chat template.
  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.apply_chat_template

  # Rollouts: the student writes its own chain of thought (on-policy, GKD lambda = 1), one
  # sample per prompt at temperature 1.0 as in the reference. 1024 new tokens, not the
  # reference code's accidental 128: reasoning chains are cut off otherwise. max_len leaves
  # up to 1024 tokens of prompt.
  --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens 1024 --data.max_len 2048
  --rollout.batch_size 128 --rollout.micro_batch_size 8

  # Optimisation, as the reference (TRL defaults under its GKD trainer): effective batch 128
  # (here 4 GPUs x micro 4 x 8 accumulation steps; 8 x 4 x 4 in the paper), lr 5e-6, cosine
  # decay to 0 after 10% warm-up, AdamW betas (0.9, 0.999), no weight decay, clip 1.0,
  # 3 passes over the prompts (episodes), one update per rollout batch (max_epochs 1 keeps
  # every update on-policy).
  --train.batch_size 128 --train.micro_batch_size 4
  --train.num_episodes 3 --train.max_epochs 1
  --actor.adam.lr 5e-6 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.0 --actor.max_norm 1.0
  --train.seed 42

  # Objective (docs/objective.md): generalized JSD with beta 0.9 gated by the entropy gap,
  # ListMLE on the student's top-k candidates ranked by the teacher (token level), entropy term.
  --tsdkd.beta 0.9 --tsdkd.temperature 1.0 --tsdkd.gate soft --tsdkd.indirect_level token

  # Checkpoints: DeepSpeed state (weights, optimizer, scheduler, data position) every 200 steps,
  # the 3 newest kept, plus HF weights for evaluation. --ckpt.load_enable: a rerun of this
  # command (same OUTPUT_DIR) continues from the newest checkpoint instead of starting over.
  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_ray_job openrlhf.cli.train_tsdkd "${ARGS[@]}"
