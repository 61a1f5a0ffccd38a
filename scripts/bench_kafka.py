#!/usr/bin/env python3
"""Benchmark of the Kafka audit stream against a real local broker; prints one JSON object.

    python scripts/bench_kafka.py [--records 20000] [--outage-records 10000]
                                  [--outage-seconds 10] [--outage kill|pause|both]

Starts its own broker (pgsidecar/lab/kafka_broker.py) on free loopback ports in a temp dir and stops it
by pid at the end. Figures: records/s a KafkaSink publishes (broker-acknowledged, acks=all,
idempotent), the time ``emit`` takes (what publishing adds to a transition), and the spool's
recovery after an outage: ``kill`` = SIGKILL and restart of the broker, ``pause`` = SIGSTOP
(a hung broker) then SIGCONT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from events.kafka import benchmark  # noqa: E402
from pgsidecar.lab.kafka_broker import KAFKA_VERSION, KafkaBroker, fetch, java_available  # noqa: E402
from pgsidecar.procutil import free_port_range  # noqa: E402


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port_range(2)
    broker = KafkaBroker(workdir / "kafka", port, port + 1)
    t0 = time.perf_counter()
    await asyncio.to_thread(broker.start)
    out: dict[str, Any] = {
        "kafka_version": KAFKA_VERSION,
        "broker_start_seconds": round(time.perf_counter() - t0, 2),
        "python": platform.python_version(),
    }
    try:
        modes = ["kill", "pause"] if args.outage == "both" else [args.outage]
        for n, mode in enumerate(modes):

            async def outage(mode: str = mode) -> None:
                if mode == "kill":
                    broker.kill()
                else:
                    broker.pause()

            async def restore(mode: str = mode) -> None:
                if mode == "kill":
                    await asyncio.to_thread(broker.start)
                else:
                    broker.resume()

            res = await benchmark(
                broker.bootstrap,
                workdir / f"spool-{mode}",
                records=args.records,
                outage=outage,
                restore=restore,
                outage_records=args.outage_records,
                outage_seconds=args.outage_seconds,
                topic=f"pgsidecar.bench{n}.events",
            )
            if "publish" not in out:
                out["publish"] = res["publish"]
            out[f"recovery_{mode}"] = res["recovery"]
    finally:
        broker.stop(timeout=20)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--outage-records", type=int, default=10_000)
    ap.add_argument("--outage-seconds", type=float, default=10.0)
    ap.add_argument("--outage", choices=["kill", "pause", "both"], default="both")
    args = ap.parse_args()
    if not java_available():
        print(json.dumps({"error": "java not found: the broker needs a Java 17 runtime"}))
        return 2
    fetch()
    with tempfile.TemporaryDirectory(prefix="pgsidecar-bench-kafka-") as tmp:
        out = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
