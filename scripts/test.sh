#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs first (scripts/setup.sh
# --deps-only), then lint, types, and the tiers fastest first (docs/testing.md): unit, then
# integration (real PostgreSQL, etcd, Kafka), then the fault suite. .ci/run calls exactly this.
# With arguments, runs pytest with them instead of the tiers (e.g. a file or -k).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh --deps-only
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m ruff format --check .
$PY -m mypy fsm
if (($#)); then
    exec $PY -m pytest -q -p no:cacheprovider "$@"
fi
start=$SECONDS
failed=()
for tier in "not integration" "integration and not faults" "faults"; do
    echo "== tier: -m \"$tier\" ($((SECONDS - start)) s so far)"
    # every tier runs even after a failure, so one run shows everything that is wrong
    $PY -m pytest -q -p no:cacheprovider -m "$tier" || failed+=("$tier")
done
if ((${#failed[@]})); then
    echo "== FAILED tiers: ${failed[*]} ($((SECONDS - start)) s)"
    exit 1
fi
echo "== all tiers passed in $((SECONDS - start)) s"
