#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs first (scripts/setup.sh
# --deps-only), then lint, types, and the tiers fastest first (docs/testing.md): tests/unit, then
# tests/contract and tests/e2e (real PostgreSQL, etcd, Kafka), then tests/faults. .ci/run calls
# exactly this.
# With arguments, runs pytest with them instead of the tiers (e.g. a file or -k).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh --deps-only
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m ruff format --check .
$PY -m mypy fsm events pgsidecar
if (($#)); then
    exec $PY -m pytest -q -p no:cacheprovider "$@"
fi
start=$SECONDS
failed=()
# the tiers are folders (docs/testing.md): unit (no external process), sim (seeds of simulated
# clusters with the real agent), contract and e2e (real PostgreSQL, etcd, Kafka), faults
for tier in "tests/unit" "tests/sim" "tests/contract tests/e2e" "tests/faults"; do
    echo "== tier: $tier ($((SECONDS - start)) s so far)"
    # every tier runs even after a failure, so one run shows everything that is wrong
    # shellcheck disable=SC2086 # the tier is a list of folders
    $PY -m pytest -q -p no:cacheprovider $tier || failed+=("$tier")
done
if ((${#failed[@]})); then
    echo "== FAILED tiers: ${failed[*]} ($((SECONDS - start)) s)"
    exit 1
fi
echo "== all tiers passed in $((SECONDS - start)) s"
