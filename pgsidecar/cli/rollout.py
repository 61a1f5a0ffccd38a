"""`pgsidecar rollout`: update an OnDelete StatefulSet's pods to its new revision, replicas
first, then a switchover, then the old master; stops at the first member that does not come
back healthy. The order and the waiting are in pgsidecar/rollout.py; this is the glue: the
flags, the DCS (from --config / --dir), the Kubernetes API access."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

from pgsidecar.cli.common import EXIT_REFUSED, add_target, config_from_args, err


def cmd_rollout(args: argparse.Namespace) -> int:
    from events.dcs import DCSError
    from events.dcs.factory import create_dcs
    from pgsidecar.rollout import DcsCluster, KubeAccess, KubeClient, Rollout, RolloutError

    cfg = config_from_args(args)
    namespace = args.namespace or cfg.kubernetes.namespace or os.environ.get("POD_NAMESPACE")
    if not namespace:
        err("rollout: give --namespace (the StatefulSet's namespace)")
        return EXIT_REFUSED
    access = KubeAccess(
        namespace=namespace,
        api_url=args.api_url,
        token_file=args.token_file,
        ca_file=args.ca_file,
        kubeconfig=args.kubeconfig
        or (None if args.api_url or args.in_cluster else os.path.expanduser("~/.kube/config")),
        context=args.context,
    )

    async def go() -> int:
        kube = KubeClient(access)
        dcs = create_dcs(cfg.dcs, cfg.cluster)
        try:
            await asyncio.wait_for(dcs.connect(), timeout=15)
            rollout = Rollout(
                kube=kube,
                cluster=DcsCluster(dcs, cfg.api.client_context()),
                statefulset=args.statefulset or cfg.cluster,
                member_timeout=args.member_timeout,
                switchover_timeout=args.switchover_timeout,
                poll=args.poll,
            )
            plan = await rollout.plan()
            for line in plan.describe():
                print(line)
            if args.dry_run or not plan.steps:
                return 0
            await rollout.run(plan)
            print(f"rollout done: every member of {plan.statefulset} is on {plan.revision}")
            return 0
        finally:
            with contextlib.suppress(Exception):
                await dcs.close()
            with contextlib.suppress(Exception):
                await kube.close()

    try:
        return asyncio.run(go())
    except RolloutError as exc:
        err(f"rollout: {exc}")
    except (DCSError, TimeoutError) as exc:
        err(f"rollout: cannot reach the DCS ({cfg.dcs.type}): {exc or 'timed out'}")
    return EXIT_REFUSED


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rp = sub.add_parser(
        "rollout",
        help="update an OnDelete StatefulSet: replicas first, switch over, then the old master",
    )
    add_target(rp)
    rp.add_argument("--statefulset", help="the StatefulSet (default: the cluster's name)")
    rp.add_argument("--namespace", help="its namespace (default: kubernetes.namespace)")
    rp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rp.add_argument(
        "--member-timeout",
        type=float,
        default=600.0,
        help="seconds for each member to come back healthy on the new revision",
    )
    rp.add_argument(
        "--switchover-timeout",
        type=float,
        default=60.0,
        help="seconds for the new master to take over and accept writes",
    )
    rp.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    access = rp.add_argument_group("Kubernetes API access (default: ~/.kube/config)")
    access.add_argument("--kubeconfig", help="a kubeconfig file")
    access.add_argument("--context", help="the kubeconfig context (default: its current one)")
    access.add_argument("--in-cluster", action="store_true", help="the pod's service account")
    access.add_argument("--api-url", help="the API server's URL (with --token-file)")
    access.add_argument("--token-file", help="a bearer token for --api-url")
    access.add_argument("--ca-file", help="the CA bundle of --api-url")
    rp.set_defaults(func=cmd_rollout)
