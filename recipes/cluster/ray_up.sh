#!/usr/bin/env bash
# Start the Ray cluster that the recipes submit to. Run once per node, head first:
#
#   node 0:      bash recipes/cluster/ray_up.sh head
#   node 1..N:   RAY_HEAD_ADDRESS=<node 0 IP> bash recipes/cluster/ray_up.sh worker
#   then, on any machine that reaches node 0:
#                RAY_HEAD_ADDRESS=<node 0 IP> SHARED_DIR=/shared/tsdkd bash recipes/tsdkd/<recipe>.sh
#
# Every node needs the same Python environment (pip install 'tsdkd-plugin[gpu]') and the same
# paths for data, reward functions and checkpoints (a shared file system, SHARED_DIR in the
# multi-node recipes). `ray stop` on each node tears the cluster down.
#
# Environment: NUM_GPUS (per node, default 8), RAY_GCS_PORT (default 6379),
# RAY_DASHBOARD_PORT (job server, default 8265), NODE_IP (this node's address; Ray picks one
# when unset), RAY_HEAD_ADDRESS (required for `worker`), TSDKD_RECIPE_EXTRA_ARGS (more `ray start`
# options, appended last: e.g. --num-cpus, --temp-dir, or the agent ports of a second node on
# the same machine, as the toy-scale test does).
source "$(dirname "$0")/../lib/common.sh"

role="${1:-}"
case "$role" in
  head|worker) ;;
  *) die "usage: ray_up.sh head | worker (got '${role}')" ;;
esac
num_gpus="${NUM_GPUS:-8}"
gcs_port="${RAY_GCS_PORT:-6379}"
node_ip_args=()
[ -n "${NODE_IP:-}" ] && node_ip_args=(--node-ip-address "$NODE_IP")
read -r -a extra_args <<< "${TSDKD_RECIPE_EXTRA_ARGS:-}"
[ "$role" = worker ] && require_env RAY_HEAD_ADDRESS "the IP or host name of the node where 'ray_up.sh head' ran"
command -v ray >/dev/null || die "the 'ray' command is not on PATH; install the plugin with its gpu extra (pip install 'tsdkd-plugin[gpu]')"

case "$role" in
  head)
    # --dashboard-host 0.0.0.0: `ray job submit` from other machines talks to the dashboard's job server.
    exec ray start --head --port "$gcs_port" "${node_ip_args[@]}" --num-gpus "$num_gpus" \
      --dashboard-host 0.0.0.0 --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" "${extra_args[@]}"
    ;;
  worker)
    probe_ray_head "$RAY_HEAD_ADDRESS" "$gcs_port" \
      || die "the Ray head at $RAY_HEAD_ADDRESS:$gcs_port (RAY_HEAD_ADDRESS:RAY_GCS_PORT) did not answer within ${RAY_PROBE_TIMEOUT:-3}s; start it first with 'bash recipes/cluster/ray_up.sh head'"
    exec ray start --address "$RAY_HEAD_ADDRESS:$gcs_port" "${node_ip_args[@]}" --num-gpus "$num_gpus" "${extra_args[@]}"
    ;;
esac
