# shellcheck shell=bash disable=SC2034  # sets variables for the recipes that source it
# Shared by every launch script in recipes/ (sourced, never run on its own).
#
# What a recipe does with it:
#   require_env NAME "what it is"      stop at once when a required variable is unset
#   shared_path VAR DEFAULT            an absolute path (every Ray node must see the same file)
#   launch_ray_job MODULE ARGS...      `ray job submit ... -- python3 -m MODULE ARGS...`
#   launch_deepspeed NUM_GPUS MODULE ARGS...   `ray job submit --entrypoint-num-gpus NUM_GPUS ...
#                                      -- deepspeed --num_gpus NUM_GPUS --module MODULE ARGS...` (DPO:
#                                      a DeepSpeed job on one node, whose GPUs Ray reserves)
#   run_on_this_node MODULE ARGS...    `$PYTHON -m MODULE ARGS...` here (data preparation on a GPU node)
#
# Overrides, e.g. to run a recipe at toy scale (docs/recipes.md, "Toy scale"); they apply in
# every mode below, so an overridden command is parsed and dry-run like the recipe's own:
#   TSDKD_RECIPE_EXTRA_ARGS="--flag value ..."   appended after the recipe's flags; for an option
#                              given twice the parser keeps the last value, so these win.
#                              Whitespace-separated, no quoting (no spaces inside a value).
#   TSDKD_RECIPE_DROP_FLAGS="--switch ..."       switches (flags without a value, e.g.
#                              --vllm.enable_sleep) removed from the recipe's flags: a switch
#                              cannot be turned off by appending.
#
# Modes, for checking a recipe without a cluster (the test suite uses both):
#   TSDKD_RECIPE_PRINT_ARGS=1  print "launcher\0module\0arg\0arg..." and exit; nothing is contacted
#   TSDKD_RECIPE_DRY_RUN=1     parse the command with the real argument parser and print the
#                              resolved plan (groups, GPUs per group, nodes) as JSON; nothing launches
#
# Ray head: RAY_HEAD_ADDRESS (host) and RAY_DASHBOARD_PORT (job server, default 8265). Before
# submitting, the job server is probed over TCP with a RAY_PROBE_TIMEOUT-second limit (default 3),
# so an unreachable head fails in seconds with a message instead of hanging in `ray job submit`.
#
# A submitted job gets an id naming the recipe (<recipe>-<date>-<time>-<random>); its output is
# shown and kept in $OUTPUT_DIR/logs/<id>.log. When the job does not succeed, the recipe ends
# with one line naming the id, the job's status and error, and where the full log is, and exits 1.

set -euo pipefail

RECIPE_NAME="$(basename "$0")"
RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "$RECIPES_DIR/.." && pwd)"
PYTHON="${PYTHON:-python3}"

die() {
  echo "$RECIPE_NAME: error: $*" >&2
  exit 2
}

require_env() {
  local name="$1" what="$2"
  if [ -z "${!name:-}" ]; then
    die "environment variable $name is not set ($what); export $name=... and run again"
  fi
}

# shared_path VAR DEFAULT: sets VAR to an absolute path (default when unset). Ray workers run in
# their own directories on other nodes, so relative paths would silently point elsewhere.
shared_path() {
  local name="$1" default="$2" value
  value="${!name:-$default}"
  case "$value" in
    /*) ;;
    *) value="$PWD/$value" ;;
  esac
  printf -v "$name" '%s' "$value"
}

# A model is a HF hub name (org/name) or a local directory; a path that looks local must exist
# at submit time on this node (the same path is read on every node).
check_model_ref() {
  local name="$1" value="${!1}"
  case "$value" in
    /*|./*|../*|~*)
      [ -d "$value" ] || die "$name=$value is not a directory; set it to a HF model name or a local model directory" ;;
  esac
}

probe_ray_head() {
  local host="$1" port="$2" limit="${RAY_PROBE_TIMEOUT:-3}"
  timeout "$limit" bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

check_ray_head() {
  local host="${RAY_HEAD_ADDRESS:-127.0.0.1}" port="${RAY_DASHBOARD_PORT:-8265}"
  if ! probe_ray_head "$host" "$port"; then
    die "the Ray head's job server at $host:$port (RAY_HEAD_ADDRESS:RAY_DASHBOARD_PORT) did not answer within ${RAY_PROBE_TIMEOUT:-3}s; start it with 'bash recipes/cluster/ray_up.sh head' on the head node (or set RAY_HEAD_ADDRESS / RAY_DASHBOARD_PORT to a running head)"
  fi
  command -v ray >/dev/null || die "the 'ray' command is not on PATH; install the plugin with its gpu extra (pip install 'tsdkd-plugin[gpu]')"
}

# Options that --logger.* takes from the environment: W&B when WANDB_API_KEY is set, else TensorBoard.
logger_args() {
  local run_name="$1"
  if [ -n "${WANDB_API_KEY:-}" ]; then
    LOGGER_ARGS=(--logger.wandb.key "$WANDB_API_KEY" --logger.wandb.run_name "$run_name")
  else
    LOGGER_ARGS=(--logger.tensorboard_dir "$OUTPUT_DIR/tensorboard")
  fi
}

# with_overrides ARGS...: sets RECIPE_ARGS to ARGS minus TSDKD_RECIPE_DROP_FLAGS, plus
# TSDKD_RECIPE_EXTRA_ARGS at the end.
with_overrides() {
  local -a drop extra
  local arg next index
  read -r -a drop <<< "${TSDKD_RECIPE_DROP_FLAGS:-}"
  read -r -a extra <<< "${TSDKD_RECIPE_EXTRA_ARGS:-}"
  local -a args=("$@")
  RECIPE_ARGS=()
  for ((index = 0; index < ${#args[@]}; index++)); do
    arg="${args[index]}"
    if [[ " ${drop[*]} " == *" $arg "* ]]; then
      next="${args[index + 1]:-}"
      # Removing an option that takes a value would leave the value behind as a stray argument.
      if [ -n "$next" ] && [[ "$next" != --* ]]; then
        die "TSDKD_RECIPE_DROP_FLAGS names $arg, which takes a value in this recipe ($arg $next); override its value in TSDKD_RECIPE_EXTRA_ARGS instead"
      fi
      continue
    fi
    RECIPE_ARGS+=("$arg")
  done
  RECIPE_ARGS+=("${extra[@]}")
}

# The value of the last `FLAG value` in RECIPE_ARGS (empty when absent).
recipe_flag_value() {
  local flag="$1" index value=""
  for ((index = 0; index < ${#RECIPE_ARGS[@]} - 1; index++)); do
    [ "${RECIPE_ARGS[index]}" = "$flag" ] && value="${RECIPE_ARGS[index + 1]}"
  done
  printf '%s' "$value"
}

# Say whether this run resumes: with --ckpt.load_enable a rerun continues from the checkpoint that
# `latest` names under --ckpt.path (train_ppo_ray and train_tsdkd keep the policy's under _actor/).
report_resume_point() {
  local module="$1" ckpt_path latest_file
  ckpt_path="$(recipe_flag_value --ckpt.path)"
  [ -n "$ckpt_path" ] || return 0
  [[ " ${RECIPE_ARGS[*]} " == *" --ckpt.load_enable "* ]] || return 0
  latest_file="$ckpt_path/_actor/latest"
  [ "$module" = openrlhf.cli.train_dpo ] && latest_file="$ckpt_path/latest"
  if [ -s "$latest_file" ]; then
    echo "$RECIPE_NAME: resuming from $(cat "$latest_file") in $(dirname "$latest_file") (--ckpt.load_enable; move $ckpt_path away to start over)" >&2
  else
    echo "$RECIPE_NAME: no checkpoint in $ckpt_path yet: starting at step 0 (a rerun of this command resumes from the last checkpoint)" >&2
  fi
}

# submit_ray_job MODULE ENTRYPOINT_GPUS COMMAND...: submit COMMAND as a Ray job, follow its output
# (also into $OUTPUT_DIR/logs/<id>.log) and exit 0 only when the job succeeded.
submit_ray_job() {
  local module="$1" entrypoint_gpus="$2"
  shift 2
  check_ray_head
  local host="${RAY_HEAD_ADDRESS:-127.0.0.1}" port="${RAY_DASHBOARD_PORT:-8265}"
  local address="http://$host:$port" job_id log rc=0 status="" message="" driver_error
  job_id="${RECIPE_NAME%.sh}-$(date +%Y%m%d-%H%M%S)-$RANDOM"
  job_id="${job_id//./_}"
  mkdir -p "$OUTPUT_DIR/logs"
  log="$OUTPUT_DIR/logs/$job_id.log"
  local -a resources=()
  if [ "$entrypoint_gpus" -gt 0 ]; then resources=(--entrypoint-num-gpus "$entrypoint_gpus"); fi
  report_resume_point "$module"
  echo "$RECIPE_NAME: submitting $module to $address as Ray job $job_id (log: $log)" >&2
  trap 'echo "$RECIPE_NAME: interrupted; Ray job $job_id keeps running: ray job stop --address $address $job_id" >&2; exit 130' INT
  ray job submit --address "$address" --submission-id "$job_id" "${resources[@]}" -- "$@" 2>&1 | tee "$log" || rc=$?
  trap - INT
  IFS=$'\t' read -r status message < <(ray_job_outcome "$address" "$job_id" || true) || true
  # `ray job submit` exits 1 when the job FAILED but 0 when it was STOPPED: the status decides. If it
  # cannot be read ($PYTHON without ray), the exit status of `ray job submit` does.
  if [ "$rc" = 0 ] && { [ "${status:-}" = SUCCEEDED ] || [ -z "${status:-}" ]; }; then
    return 0
  fi
  case "${status:-}" in
    "")
      echo "$RECIPE_NAME: error: Ray job $job_id did not succeed or was not accepted by $address (ray job submit exit status $rc); its output is in $log" >&2 ;;
    PENDING|RUNNING)
      echo "$RECIPE_NAME: error: lost contact with Ray job $job_id, which is still $status; follow it with: ray job logs --follow --address $address $job_id (output so far: $log)" >&2 ;;
    *)
      # The driver's own one-line error (our CLIs and argparse print "<prog>: error: <sentence>").
      driver_error="$(grep -E '^[^ ]+( -m [^ ]+)?: error: ' "$log" | grep -v "^$RECIPE_NAME: " | tail -n 1 || true)"
      echo "$RECIPE_NAME: error: Ray job $job_id $status${message:+ ($message)}${driver_error:+: $driver_error}; full log: $log (or: ray job logs --address $address $job_id)" >&2 ;;
  esac
  exit 1
}

# ray_job_outcome ADDRESS JOB_ID: prints "STATUS<tab>first clause of Ray's status message".
ray_job_outcome() {
  "$PYTHON" - "$1" "$2" 2>/dev/null <<'PY'
import sys

from ray.job_submission import JobSubmissionClient

info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
# e.g. "Job entrypoint command failed with exit code 2, last available logs (truncated ...): ..."
message = (info.message or "").splitlines()[0].split(", last available logs")[0] if info.message else ""
print(f"{info.status.value}\t{message}")
PY
}

launch_ray_job() {
  local module="$1"
  shift
  with_overrides "$@"
  if [ "${TSDKD_RECIPE_PRINT_ARGS:-0}" = 1 ]; then
    printf '%s\0' ray-job "$module" "${RECIPE_ARGS[@]}"
    exit 0
  fi
  if [ "${TSDKD_RECIPE_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" -m tsdkd_plugin.recipes_tools.recipe_check --plan --module "$module" -- "${RECIPE_ARGS[@]}"
  fi
  submit_ray_job "$module" 0 python3 -m "$module" "${RECIPE_ARGS[@]}"
}

# DPO is a plain DeepSpeed job: `deepspeed` starts one process per GPU. Submitted through Ray like
# every recipe (same head, logs, `ray job stop`); --entrypoint-num-gpus makes Ray run it on a node
# with that many free GPUs and hand them to it (CUDA_VISIBLE_DEVICES).
launch_deepspeed() {
  local num_gpus="$1" module="$2"
  shift 2
  with_overrides "$@"
  if [ "${TSDKD_RECIPE_PRINT_ARGS:-0}" = 1 ]; then
    printf '%s\0' "deepspeed:$num_gpus" "$module" "${RECIPE_ARGS[@]}"
    exit 0
  fi
  if [ "${TSDKD_RECIPE_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" -m tsdkd_plugin.recipes_tools.recipe_check --plan --module "$module" \
      --deepspeed-gpus "$num_gpus" -- "${RECIPE_ARGS[@]}"
  fi
  submit_ray_job "$module" "$num_gpus" deepspeed --num_gpus "$num_gpus" --module "$module" "${RECIPE_ARGS[@]}"
}

# Data preparation that uses this node's GPUs directly (no Ray): same overrides and print mode.
run_on_this_node() {
  local module="$1"
  shift
  with_overrides "$@"
  if [ "${TSDKD_RECIPE_PRINT_ARGS:-0}" = 1 ]; then
    printf '%s\0' local "$module" "${RECIPE_ARGS[@]}"
    exit 0
  fi
  echo "$RECIPE_NAME: running $PYTHON -m $module on this node" >&2
  exec "$PYTHON" -m "$module" "${RECIPE_ARGS[@]}"
}
