"""`pgsidecar lab sim`: run seeds of the simulated cluster with the real agent and print a JSON
summary (seeds, violations with the command that replays each, simulated seconds per wall
second); `--replay SEED` runs one seed in this process and prints its whole trace."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pgsidecar.lab.sim.agent import agent_factory
from pgsidecar.lab.sim.cluster import NO_FAULT_MIX, FaultMix, SimResult, replay, run_seeds


def replay_command(result: SimResult, faults: str, duration: float) -> str:
    extra = f" --faults {faults}" if faults != "default" else ""
    extra += f" --duration {duration:g}" if duration != 600.0 else ""
    return (
        f"pgsidecar lab sim --replay {result.seed} --members {result.members} "
        f"--synchronous-mode {result.synchronous_mode}{extra}"
    )


def cmd_sim(args: argparse.Namespace) -> int:
    mix = NO_FAULT_MIX if args.faults == "none" else FaultMix()
    if args.replay is not None:
        result = replay(
            args.replay,
            args.members or 3,
            args.synchronous_mode,
            mix,
            agent_factory,
            duration=args.duration,
        )
        return 0 if result.ok else 1
    sizes = [args.members] if args.members else [3, 5]
    report = run_seeds(
        range(args.first_seed, args.first_seed + args.seeds),
        sizes,
        args.synchronous_mode,
        mix,
        agent_factory,
        jobs=args.jobs,
        duration=args.duration,
    )
    summary: dict[str, Any] = {
        "seeds": len(report.results),
        "members": sizes,
        "synchronous_mode": args.synchronous_mode,
        "faults": args.faults,
        "passed": len(report.results) - len(report.failures),
        "violations": [
            {
                "seed": r.seed,
                "members": r.members,
                "invariant": r.violation.invariant,
                "at": r.violation.at,
                "message": r.violation.message,
                "replay": replay_command(r, args.faults, args.duration),
            }
            for r in report.failures
            if r.violation is not None
        ],
        "virtual_seconds": round(report.virtual_seconds, 1),
        "wall_seconds": round(report.wall_seconds, 1),
        "simulated_per_wall_second": round(report.simulated_per_wall_second, 1),
        "simulated_per_cpu_second": round(report.simulated_per_cpu_second, 1),
        "seeds_per_minute": round(60 * len(report.results) / report.wall_seconds, 1)
        if report.wall_seconds
        else 0.0,
        "jobs": report.jobs,
    }
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 1 if report.failures else 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pgsidecar.lab import soak

    lab = sub.add_parser(
        "lab", help="the lab: deterministic simulation of whole clusters, the endurance soak"
    )
    lab_sub = lab.add_subparsers(dest="lab_cmd", required=True)
    soak.add_parser(lab_sub)
    s = lab_sub.add_parser(
        "sim", help="run seeds of a simulated cluster with the real agent (docs/simulation.md)"
    )
    s.add_argument("--seeds", type=int, default=10, help="how many seeds (default 10)")
    s.add_argument("--first-seed", type=int, default=1)
    s.add_argument(
        "--members", type=int, choices=[3, 5], default=None, help="default: 3 and 5 in turn"
    )
    s.add_argument("--synchronous-mode", choices=["off", "on", "strict"], default="off")
    s.add_argument("--faults", choices=["default", "none"], default="default")
    s.add_argument("--duration", type=float, default=600.0, help="virtual seconds per seed")
    s.add_argument("--jobs", type=int, default=2, help="worker processes")
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.add_argument(
        "--replay", type=int, metavar="SEED", help="run one seed here and print its trace"
    )
    s.set_defaults(func=cmd_sim)
