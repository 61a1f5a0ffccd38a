#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs first (scripts/setup.sh
# --deps-only), then runs lint, types and every test. .ci/run calls exactly this.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh --deps-only
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m ruff format --check .
$PY -m mypy fsm
exec $PY -m pytest -q -p no:cacheprovider "$@"
