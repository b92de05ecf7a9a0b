#!/usr/bin/env bash
# The whole test suite on a fresh or existing machine: set-up (idempotent), then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export TSDKD_DEVICE="${TSDKD_DEVICE:-cpu}"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure, not a pass." >&2
fi
exit "$status"
