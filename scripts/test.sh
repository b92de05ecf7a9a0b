#!/usr/bin/env bash
# The whole test suite on a fresh or existing machine: set-up (idempotent), the static checks
# (ruff lint, ruff format, import-linter's layer contracts of docs/LAYOUT.md), then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`, see docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export TSDKD_DEVICE="${TSDKD_DEVICE:-cpu}"
# Static checks first: they take seconds and a finding fails the run before the long part.
# Their configuration is in pyproject.toml ([tool.ruff], [tool.importlinter]).
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/lint-imports
status=0
# The 15 slowest tests are listed at the end: where the suite's time goes (docs/testing.md).
.venv/bin/python -m pytest --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure, not a pass." >&2
fi
exit "$status"
