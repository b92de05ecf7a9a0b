#!/usr/bin/env bash
# Set-up (idempotent) and the main job on the built-in default: tiny teacher and student
# on the built-in arithmetic reasoning task, TSD-KD through `openrlhf.cli.train_tsdkd`
# on CPU, evaluation and a report. Extra arguments go to the job (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export TSDKD_DEVICE="${TSDKD_DEVICE:-cpu}"
exec .venv/bin/python -m tsdkd_plugin.experiments.main_job "$@"
