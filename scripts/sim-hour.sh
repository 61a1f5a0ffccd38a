#!/usr/bin/env bash
# As many simulator seeds as a time budget holds (docs/simulation.md, "The long run"): batches
# of `pgsidecar lab sim` (3 and 5 members in turn, the default fault mix), the three
# synchronous modes in turn, consecutive seeds from FIRST; a batch starts only while the one
# before it would still end inside the budget. One JSON line per batch goes to OUT (lab sim
# prints nothing until a batch ends, hence batches), then a total.
#   bash scripts/sim-hour.sh [MINUTES=60] [OUT=sim-hour.jsonl] [FIRST=100000] [BATCH=500]
set -euo pipefail
MINUTES=${1:-60}
OUT=${2:-sim-hour.jsonl}
FIRST=${3:-100000}
BATCH=${4:-500}
PY=${PYTHON:-python3}
modes=(off on strict)
budget=$((MINUTES * 60))
start=$SECONDS
last=0
i=0
: >"$OUT"
while (($((SECONDS - start)) + last < budget)); do
    mode=${modes[$((i % 3))]}
    began=$SECONDS
    # a batch with a violation exits 1: its line (seed, invariant, replay command) is kept
    $PY -m pgsidecar lab sim --seeds "$BATCH" --first-seed "$FIRST" --synchronous-mode "$mode" \
        --jobs 2 --json >>"$OUT" || true
    last=$((SECONDS - began))
    echo "batch $i: seeds $FIRST..$((FIRST + BATCH - 1)), mode $mode, ${last} s" >&2
    FIRST=$((FIRST + BATCH))
    i=$((i + 1))
done
$PY - "$OUT" "$((SECONDS - start))" <<'EOF'
import json
import sys

batches = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
seeds = sum(b["seeds"] for b in batches)
virtual = sum(b["virtual_seconds"] for b in batches)
wall = int(sys.argv[2])
violations = [v for b in batches for v in b["violations"]]
print(json.dumps({
    "batches": len(batches),
    "seeds": seeds,
    "passed": sum(b["passed"] for b in batches),
    "violations": violations,
    "virtual_seconds": round(virtual, 1),
    "wall_seconds": wall,
    "simulated_per_wall_second": round(virtual / wall, 1) if wall else 0.0,
    "seeds_per_minute": round(60 * seeds / wall, 1) if wall else 0.0,
}))
EOF
