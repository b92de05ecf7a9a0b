#!/usr/bin/env bash
# Evaluate several checkpoints on the reasoning benchmarks (vLLM, greedy) and compare them.
#
#   RUNS="teacher=Qwen/Qwen2.5-14B-Instruct student=Qwen/Qwen2.5-1.5B-Instruct \
#         tsdkd=ckpt/qwen2.5-14b_to_1.5b.1node/final grpo=ckpt/grpo.1node/final dpo=ckpt/dpo.1node/final" \
#   bash recipes/eval/evaluate_runs.sh
#
# Writes RESULTS_DIR/<name>.json per run (skipped when it exists: delete it to re-evaluate), then
# RESULTS_DIR/comparison.md and comparison.png with differences against BASELINE.
# MBPP executes model-written code: run this inside a container or sandbox.
#
# Environment (defaults in brackets): RUNS (required: space-separated name=model pairs, a model
# being a HF name or a HF-format checkpoint directory), RESULTS_DIR [results], BASELINE [student],
# BENCHMARKS [the evaluate command's default list: the paper's ten], TP [1: GPUs per model; 4 or 8
# for 14B teachers to go faster], MAX_GEN_TOKS [1024; 2048+ for Qwen3 thinking],
# TSDKD_RECIPE_EXTRA_ARGS [more evaluate options, appended last so they win, e.g. "--disable-thinking";
# at toy scale "--backend hf --device cpu --include-path tasks/"], PYTHON [python3].
source "$(dirname "$0")/../lib/common.sh"

require_env RUNS "space-separated name=model pairs, e.g. RUNS=\"student=Qwen/Qwen2.5-1.5B-Instruct tsdkd=ckpt/x/final\""
RESULTS_DIR="${RESULTS_DIR:-results}"
BASELINE="${BASELINE:-student}"
read -r -a runs <<< "$RUNS"
read -r -a extra <<< "${TSDKD_RECIPE_EXTRA_ARGS:-}"
benchmark_args=()
[ -n "${BENCHMARKS:-}" ] && benchmark_args=(--benchmarks "$BENCHMARKS")

# Check every run before the first (long) evaluation starts.
names=()
for run in "${runs[@]}"; do
  name="${run%%=*}" model="${run#*=}"
  [ "$name" != "$run" ] && [ -n "$name" ] && [ -n "$model" ] || die "RUNS entry '$run' is not name=model"
  # A path that exists, or that is spelled as a path, must be a HF-format checkpoint; anything else
  # is taken as a hub name (org/model).
  case "$model" in
    /*|./*|../*|~*) local_model=1 ;;
    *) [ -e "$model" ] && local_model=1 || local_model=0 ;;
  esac
  if [ "$local_model" = 1 ] && [ ! -f "$model/config.json" ]; then
    die "run '$name': $model is not a HF-format checkpoint (no config.json; merge LoRA runs with openrlhf.cli.lora_combiner first)"
  fi
  names+=("$name")
done

results=()
for run in "${runs[@]}"; do
  name="${run%%=*}" model="${run#*=}"
  out="$RESULTS_DIR/$name.json"
  results+=("$out")
  if [ -f "$out" ]; then
    echo "evaluate_runs.sh: $out exists, not re-evaluating $name" >&2
    continue
  fi
  "$PYTHON" -m tsdkd_plugin.recipes_tools.evaluate --model "$model" --name "$name" --out "$out" \
    --backend vllm --tensor-parallel-size "${TP:-1}" --max-gen-toks "${MAX_GEN_TOKS:-1024}" \
    --allow-code-execution --log-samples "$RESULTS_DIR/samples" "${benchmark_args[@]}" "${extra[@]}"
done

baseline_args=()
[[ " ${names[*]} " == *" $BASELINE "* ]] && baseline_args=(--baseline "$BASELINE")
"$PYTHON" -m tsdkd_plugin.recipes_tools.compare "${results[@]}" "${baseline_args[@]}" \
  --out-md "$RESULTS_DIR/comparison.md" --out-png "$RESULTS_DIR/comparison.png"
cat "$RESULTS_DIR/comparison.md"
