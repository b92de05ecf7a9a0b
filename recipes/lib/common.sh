# shellcheck shell=bash disable=SC2034  # sets variables for the recipes that source it
# Shared by every launch script in recipes/ (sourced, never run on its own).
#
# What a recipe does with it:
#   require_env NAME "what it is"      stop at once when a required variable is unset
#   shared_path VAR DEFAULT            an absolute path (every Ray node must see the same file)
#   launch_ray_job MODULE ARGS...      `ray job submit ... -- python3 -m MODULE ARGS...`
#   launch_deepspeed NUM_GPUS MODULE ARGS...   `deepspeed --module MODULE ARGS...` (DPO)
#
# Modes, for checking a recipe without a cluster (the test suite uses both):
#   TSDKD_RECIPE_PRINT_ARGS=1  print "launcher\0module\0arg\0arg..." and exit; nothing is contacted
#   TSDKD_RECIPE_DRY_RUN=1     parse the command with the real argument parser and print the
#                              resolved plan (groups, GPUs per group, nodes) as JSON; nothing launches
#
# Ray head: RAY_HEAD_ADDRESS (host) and RAY_DASHBOARD_PORT (job server, default 8265). Before
# submitting, the job server is probed over TCP with a RAY_PROBE_TIMEOUT-second limit (default 3),
# so an unreachable head fails in seconds with a message instead of hanging in `ray job submit`.

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

launch_ray_job() {
  local module="$1"
  shift
  if [ "${TSDKD_RECIPE_PRINT_ARGS:-0}" = 1 ]; then
    printf '%s\0' ray-job "$module" "$@"
    exit 0
  fi
  if [ "${TSDKD_RECIPE_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" -m tsdkd_plugin.recipes_tools.recipe_check --plan --module "$module" -- "$@"
  fi
  check_ray_head
  local host="${RAY_HEAD_ADDRESS:-127.0.0.1}" port="${RAY_DASHBOARD_PORT:-8265}"
  echo "$RECIPE_NAME: submitting $module to http://$host:$port" >&2
  exec ray job submit --address "http://$host:$port" -- python3 -m "$module" "$@"
}

# DPO is a plain DeepSpeed job (no Ray): `deepspeed` starts one process per GPU, on this node or,
# with HOSTFILE set, on every host listed there (passwordless ssh, same paths everywhere).
launch_deepspeed() {
  local num_gpus="$1" module="$2"
  shift 2
  if [ "${TSDKD_RECIPE_PRINT_ARGS:-0}" = 1 ]; then
    printf '%s\0' "deepspeed:$num_gpus" "$module" "$@"
    exit 0
  fi
  if [ "${TSDKD_RECIPE_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" -m tsdkd_plugin.recipes_tools.recipe_check --plan --module "$module" \
      --deepspeed-gpus "$num_gpus" -- "$@"
  fi
  command -v deepspeed >/dev/null || die "the 'deepspeed' command is not on PATH; install the plugin with its gpu extra"
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist; list one 'host slots=8' line per node, or unset it for one node"
    exec deepspeed --hostfile "$HOSTFILE" --module "$module" "$@"
  fi
  exec deepspeed --num_gpus "$num_gpus" --module "$module" "$@"
}
