#!/usr/bin/env bash
# TSD-KD: Gemma-2-9B-it -> Gemma-2-2B-it on one node of 8 GPUs (80 GB),
# teacher on its own GPUs. Same training setup as qwen2.5-14b_to_1.5b.1node.sh except where
# Gemma's 256k vocabulary needs a smaller micro-batch (below).
#
#   GPUs: 4 policy (student, ZeRO-2) + 2 vLLM engines (student rollouts) + 2 teacher replicas.
#   Why: the 2.6B student's training state fits 4 GPUs under ZeRO-2 (docs/memory.md); a 9.2B
#   teacher in bf16 (~18.5 GB) fits one GPU, and two replicas score a rollout batch while the
#   policy trains. Gemma-2's 256,000-row logits are 1.7x Qwen's: micro-batch 2 (accumulation 16)
#   keeps the per-GPU logit memory of a 2048-token micro-batch as the Qwen recipes have it.
#
# Run (data first: docs/recipes.md):
#   bash recipes/cluster/ray_up.sh head
#   python -m tsdkd_plugin.recipes_tools.prepare_data prompts --out data/tsdkd_prompts.jsonl
#   bash recipes/tsdkd/gemma2-9b_to_2b.1node.sh
# Check without a cluster: TSDKD_RECIPE_DRY_RUN=1 bash recipes/tsdkd/gemma2-9b_to_2b.1node.sh
#
# Environment (defaults in brackets): STUDENT_MODEL [google/gemma-2-2b-it],
# TEACHER_MODEL [google/gemma-2-9b-it], PROMPT_DATA [data/tsdkd_prompts.jsonl],
# OUTPUT_DIR [ckpt/<recipe>], RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265],
# WANDB_API_KEY [unset: TensorBoard under OUTPUT_DIR].
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-google/gemma-2-2b-it}"
TEACHER_MODEL="${TEACHER_MODEL:-google/gemma-2-9b-it}"
check_model_ref STUDENT_MODEL
check_model_ref TEACHER_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/tsdkd_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
logger_args "tsdkd-gemma2-9b-to-2b"

ARGS=(
  # Models. Both use Gemma's tokenizer (256,000 ids, same logit rows). Gemma's chat template has
  # no system role: the prepared prompts carry user turns only.
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
  --rollout.batch_size 128 --rollout.micro_batch_size 4

  # Optimisation, as the reference (TRL defaults under its GKD trainer): effective batch 128
  # (here 4 GPUs x micro 2 x 16 accumulation steps; 8 x 4 x 4 in the paper), lr 5e-6, cosine
  # decay to 0 after 10% warm-up, AdamW betas (0.9, 0.999), no weight decay, clip 1.0,
  # 3 passes over the prompts (episodes), one update per rollout batch (max_epochs 1 keeps
  # every update on-policy).
  --train.batch_size 128 --train.micro_batch_size 2
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
