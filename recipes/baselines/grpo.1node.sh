#!/usr/bin/env bash
# Baseline: OpenRLHF GRPO on the student, same prompts and generation budget as TSD-KD, rewarded by
# a math verifier (recipes/rewards/math_verifier.py) instead of a teacher. One node, 8 GPUs (80 GB).
#
#   GPUs: 8 shared (upstream's usual GRPO layout): policy and reference under ZeRO-3 colocated with
#   8 vLLM engines that sleep while the policy trains.
#   Same budget as TSD-KD: TSD-KD's reference run generates 3 episodes x N prompts x 1 response and
#   takes one optimizer step per 128 responses. GRPO needs a group per prompt (8 samples), so it
#   samples 16 prompts x 8 = 128 responses per step, and its prompt count is capped so the total
#   matches: MAX_PROMPTS = BUDGET_RESPONSES / 8. Set BUDGET_RESPONSES to 3 x the number of TSD-KD
#   prompts (prepare_data prints it); the default is 3 x 80,000.
#   lr 1e-6 (GRPO on 1-2B models diverges at TSD-KD's 5e-6); KL to the start model as a k3 loss.
#
# Data: the TSD-KD prompts with a reference answer that is not the student's own: ground truth
# from UltraInteract-SFT (the prompts' source, verified responses joined by instruction), else the
# teacher's greedy final answer; prompts with neither are left out (docs/recipes.md, "Data"):
#   python -m tsdkd_plugin.recipes_tools.sampling --model Qwen/Qwen2.5-14B-Instruct --gpus 8 \
#       --prompts data/tsdkd_prompts.jsonl --num-samples 1 --temperature 0 --out gen/teacher_answers.jsonl
#   python -m tsdkd_plugin.recipes_tools.prepare_data labels --prompts data/tsdkd_prompts.jsonl \
#       --ground-truth openbmb/UltraInteract_sft --teacher-answers gen/teacher_answers.jsonl \
#       --require-label --out data/grpo_prompts.jsonl
# Run: bash recipes/cluster/ray_up.sh head && bash recipes/baselines/grpo.1node.sh
# Other pairs: STUDENT_MODEL=google/gemma-2-2b-it or Qwen/Qwen3-1.7B (with MAX_NEW_TOKENS=2048).
#
# Environment (defaults in brackets): STUDENT_MODEL [Qwen/Qwen2.5-1.5B-Instruct],
# PROMPT_DATA [data/grpo_prompts.jsonl], BUDGET_RESPONSES [240000], MAX_NEW_TOKENS [1024],
# OUTPUT_DIR [ckpt/<recipe>], REWARD_FUNC [recipes/rewards/math_verifier.py],
# RAY_HEAD_ADDRESS [127.0.0.1], RAY_DASHBOARD_PORT [8265], WANDB_API_KEY.
source "$(dirname "$0")/../lib/common.sh"

STUDENT_MODEL="${STUDENT_MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
check_model_ref STUDENT_MODEL
shared_path PROMPT_DATA "$REPO_ROOT/data/grpo_prompts.jsonl"
shared_path OUTPUT_DIR "$REPO_ROOT/ckpt/${RECIPE_NAME%.sh}"
shared_path REWARD_FUNC "$RECIPES_DIR/rewards/math_verifier.py"
[ -f "$REWARD_FUNC" ] || die "REWARD_FUNC=$REWARD_FUNC does not exist; point it at a file defining reward_func(queries, prompts, labels)"
N_SAMPLES=8
BUDGET_RESPONSES="${BUDGET_RESPONSES:-240000}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-1024}"
MAX_PROMPTS=$((BUDGET_RESPONSES / N_SAMPLES))
logger_args "grpo-baseline"

ARGS=(
  --actor.model_name_or_path "$STUDENT_MODEL"

  --actor.num_nodes 1 --actor.num_gpus_per_node 8
  --ref.num_nodes 1 --ref.num_gpus_per_node 8
  --train.colocate_all --vllm.num_engines 8 --vllm.tensor_parallel_size 1
  --vllm.enable_sleep --ds.enable_sleep --vllm.gpu_memory_utilization 0.6
  --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable

  --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.label_key label
  --data.apply_chat_template --data.max_samples "$MAX_PROMPTS"
  --reward.remote_url "$REWARD_FUNC"

  # GRPO: group-normalized advantages over 8 samples per prompt, KL to the start model as a loss.
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt "$N_SAMPLES"
  --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 1e-3

  # Rollouts as TSD-KD's: temperature 1.0, chain-of-thought length, 128 responses per step.
  --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.max_new_tokens "$MAX_NEW_TOKENS" --data.max_len $((MAX_NEW_TOKENS + 1024))
  --rollout.batch_size 16 --rollout.micro_batch_size 8
  --train.batch_size 128 --train.micro_batch_size 4
  --train.num_episodes 1 --train.max_epochs 1
  --actor.adam.lr 1e-6 --actor.lr_scheduler cosine --actor.lr_warmup_ratio 0.1
  --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.0 --actor.max_norm 1.0
  --train.seed 42

  --ckpt.output_dir "$OUTPUT_DIR/final" --ckpt.path "$OUTPUT_DIR/checkpoints"
  --ckpt.save_steps 200 --ckpt.save_hf --ckpt.max_num 3 --ckpt.load_enable
  --logger.logging_steps 1 "${LOGGER_ARGS[@]}"
)

launch_ray_job openrlhf.cli.train_ppo_ray "${ARGS[@]}"
