"""Operator commands that move the master or act on members: switchover (planned, now or at a
time), restart (one, or a rolling restart of all), reinit, and a manual failover when there is no
healthy master. Each goes through the member's REST API (token required) or the DCS, and becomes
an input of the machines, recorded like any other."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from events.dcs import DCS
from fsm.inputs import member_view
from pgsidecar.cli.common import EXIT_REFUSED, add_target, config_from_args, err, run_with_dcs
from pgsidecar.config import AgentConfig, ConfigError
from pgsidecar.ops import OpsError

# -- switchover ------------------------------------------------------------------------------------


def parse_at(text: str) -> float:
    """An ISO 8601 time (UTC if no offset), or +SECONDS from now."""
    if text.startswith("+"):
        try:
            return time.time() + float(text[1:])
        except ValueError:
            raise ConfigError(f"--at {text!r}: expected +SECONDS or an ISO 8601 time") from None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--at {text!r}: expected an ISO 8601 time such as 2026-11-25T22:00:00Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def cmd_switchover(args: argparse.Namespace) -> int:
    from events.dcs.factory import create_dcs
    from pgsidecar.ops import (
        SwitchoverError,
        cancel_switchover,
        request_switchover,
        wait_for_leader,
    )

    cfg = config_from_args(args)

    async def go() -> int:
        dcs = create_dcs(cfg.dcs, cfg.cluster)
        await dcs.connect()
        try:
            try:
                if args.cancel:
                    sw = await cancel_switchover(dcs)
                    print(
                        f"switchover cancelled: {sw.get('from')} -> {sw.get('to') or 'best replica'}"
                    )
                    return 0
                at = parse_at(args.at) if args.at else None
                cmd = await request_switchover(dcs, args.to, at)
            except SwitchoverError as exc:
                print(f"pgsidecar: switchover refused: {exc}", file=sys.stderr)
                return 1
            when = f" at {args.at}" if args.at else ""
            print(f"switchover requested: {cmd['from']} -> {cmd['to'] or 'best replica'}{when}")
            if args.wait <= 0 or args.at:
                return 0
            view = await wait_for_leader(dcs, cmd["from"], args.wait)
            if view is None or view.leader is None:
                print(f"pgsidecar: no new master within {args.wait:g} s", file=sys.stderr)
                return 1
            print(f"new master: {view.leader.name} (term {view.leader.term})")
            return 0
        finally:
            await dcs.close()

    return asyncio.run(go())


# -- restart / reinit / failover -------------------------------------------------------------------


def _api(
    url: str,
    path: str,
    token: str | None,
    method: str = "GET",
    timeout: float = 5,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request to a member's API; ``context`` verifies an https member (api.tls.ca_file)
    and carries the client certificate members may ask for."""
    req = urllib.request.Request(
        url.rstrip("/") + path, method=method, data=b"{}" if method == "POST" else None
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        return exc.code, body
    except (OSError, ValueError) as exc:
        return 0, {"error": str(exc)}


def _members(view: Any) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in view.members.items() if isinstance(d, dict)}


def _wait_member(
    url: str,
    want: str,
    deadline: float,
    progress: bool = False,
    context: ssl.SSLContext | None = None,
) -> bool:
    """Until the member's /status shows it back: running and (replica) streaming, or master."""
    last = None
    while time.monotonic() < deadline:
        code, st = _api(url, "/status", None, context=context)
        if code == 200:
            state = (st.get("role"), st.get("busy"), st.get("pg_running"), st.get("streaming"))
            if progress and state != last:
                print(
                    f"  {st.get('name')}: role {state[0]}, {'busy: ' + str(state[1]) if state[1] else 'idle'}, "
                    f"PostgreSQL {'running' if state[2] else 'stopped'}{', streaming' if state[3] else ''}"
                )
                last = state
            if (
                not st.get("busy")
                and st.get("pg_running")
                and (
                    (want == "master" and st.get("role") == "master")
                    or (want == "replica" and st.get("role") == "replica" and st.get("streaming"))
                )
            ):
                return True
        time.sleep(0.3)
    return False


def _command(cfg: AgentConfig, url: str, name: str) -> None:
    code, body = _api(
        url, f"/{name}", cfg.api.resolve_token(), method="POST", context=cfg.api.client_context()
    )
    if code != 202:
        raise OpsError(body.get("error") or f"the member's API answered {code or 'nothing'}")


def cmd_restart(args: argparse.Namespace) -> int:
    async def body(cfg: AgentConfig, dcs: DCS) -> int:
        view = await dcs.read_cluster()
        if isinstance(view.config, dict) and view.config.get("pause") is True:
            raise OpsError(
                "the cluster is paused; resume it first (a rolling restart needs the agents)"
            )
        members = _members(view)
        leader = view.leader.name if view.leader else None
        if args.name and args.name not in members:
            raise OpsError(
                f"{args.name!r} is not a member (members: {', '.join(sorted(members)) or 'none'})"
            )
        names = [args.name] if args.name else sorted(members, key=lambda n: (n == leader, n))
        if args.pending_only:
            names = [n for n in names if members[n].get("pending_restart")]
            if not names:
                print("no member has a pending restart")
                return 0
        for n in names:
            if n == leader and args.switchover and len(members) > 1:
                from pgsidecar.ops import request_switchover, wait_for_leader

                print(f"{n} is the master: switching over first")
                await request_switchover(dcs, None)
                new = await wait_for_leader(dcs, n, args.timeout)
                if new is None or new.leader is None:
                    raise OpsError(f"no new master within {args.timeout:g} s; {n} not restarted")
                print(f"new master: {new.leader.name}")
                members = _members(await dcs.read_cluster())
                leader = new.leader.name
            url = members[n].get("api_url")
            if not isinstance(url, str):
                raise OpsError(f"{n} publishes no API address")
            print(f"restarting {n} ({'master' if n == leader else 'replica'})")
            _command(cfg, url, "restart")
            await asyncio.sleep(1.0)
            ok = await asyncio.to_thread(
                _wait_member,
                url,
                "master" if n == leader else "replica",
                time.monotonic() + args.timeout,
                False,
                cfg.api.client_context(),
            )
            if not ok:
                raise OpsError(f"{n} did not come back within {args.timeout:g} s; stopping here")
            print(f"  {n} is back")
        return 0

    return run_with_dcs(args, "restart", body)


def cmd_reinit(args: argparse.Namespace) -> int:
    async def body(cfg: AgentConfig, dcs: DCS) -> int:
        view = await dcs.read_cluster()
        members = _members(view)
        if args.name not in members:
            raise OpsError(
                f"{args.name!r} is not a member (members: {', '.join(sorted(members)) or 'none'})"
            )
        if view.leader is not None and view.leader.name == args.name:
            raise OpsError(f"{args.name} is the master: switch over first, then reinit it")
        url = members[args.name].get("api_url")
        if not isinstance(url, str):
            raise OpsError(f"{args.name} publishes no API address")
        _command(cfg, url, "reinit")
        print(
            f"reinitializing {args.name}: its data is thrown away and cloned again "
            "(from the backup repository when it holds a backup, else from the master)"
        )
        ok = await asyncio.to_thread(
            _wait_member,
            url,
            "replica",
            time.monotonic() + args.timeout,
            True,
            cfg.api.client_context(),
        )
        if not ok:
            raise OpsError(
                f"{args.name} is not streaming again after {args.timeout:g} s (see its agent.log)"
            )
        print(f"{args.name} is a streaming replica again")
        return 0

    return run_with_dcs(args, "reinit", body)


def cmd_failover(args: argparse.Namespace) -> int:
    async def body(cfg: AgentConfig, dcs: DCS) -> int:
        view = await dcs.read_cluster()
        if view.leader is not None:
            raise OpsError(
                f"{view.leader.name} is a healthy master; use `pgsidecar switchover --to {args.to}`"
            )
        if isinstance(view.config, dict) and view.config.get("pause") is True:
            raise OpsError("the cluster is paused; resume it first (failover needs the agents)")
        members = _members(view)
        if args.to not in members:
            raise OpsError(
                f"{args.to!r} is not a member (members: {', '.join(sorted(members)) or 'none'})"
            )
        target = member_view(args.to, members[args.to])
        if target is None or not target.running:
            raise OpsError(f"{args.to}'s PostgreSQL is not running")
        ahead = {}
        for n, raw in members.items():
            m = member_view(n, raw)
            if n != args.to and m is not None and m.running and m.position > target.position:
                ahead[n] = (
                    (m.lsn or 0) - (target.lsn or 0) if m.timeline == target.timeline else None
                )
        if ahead and not args.force:
            detail = ", ".join(
                f"{n} (+{b} bytes)" if b is not None else f"{n} (later timeline)"
                for n, b in ahead.items()
            )
            raise OpsError(
                f"{args.to} is behind {detail}; pick the most advanced member, or --force"
            )
        if ahead:
            known = [b for b in ahead.values() if b is not None]
            print(
                f"--force: {max(known) if known else 'an unknown number of'} bytes of WAL will be abandoned"
            )
        await dcs.put_switchover(
            {"from": None, "to": args.to, "force": bool(args.force), "requested_at": time.time()}
        )
        from pgsidecar.ops import wait_for_leader

        new = await wait_for_leader(dcs, None, args.timeout)
        if new is None or new.leader is None or new.leader.name != args.to:
            err(f"{args.to} did not take over within {args.timeout:g} s (see its agent.log)")
            return EXIT_REFUSED
        print(f"new master: {args.to} (term {new.leader.term})")
        return 0

    return run_with_dcs(args, "failover", body)


# -- parsers ----------------------------------------------------------------------------------------


def add_switchover_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sw = sub.add_parser(
        "switchover", help="planned switchover: the target catches up, then promotes"
    )
    add_target(sw)
    sw.add_argument("--to", help="target member (default: the most advanced replica)")
    sw.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the new master (0: do not)"
    )
    sw.add_argument(
        "--at", help="scheduled: ISO 8601 time (UTC unless an offset is given) or +SECONDS"
    )
    sw.add_argument("--cancel", action="store_true", help="cancel a pending (scheduled) switchover")
    sw.set_defaults(func=cmd_switchover)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add restart, reinit and failover to the top-level parser."""
    rp = sub.add_parser("restart", help="restart PostgreSQL of a member, or of all (rolling)")
    add_target(rp)
    g = rp.add_mutually_exclusive_group(required=True)
    g.add_argument("name", nargs="?", help="the member")
    g.add_argument(
        "--all", action="store_true", help="rolling: replicas one at a time, the master last"
    )
    rp.add_argument(
        "--pending-only", action="store_true", help="only members with a pending restart"
    )
    rp.add_argument(
        "--switchover", action="store_true", help="switch over before restarting the master"
    )
    rp.add_argument("--timeout", type=float, default=120.0)
    rp.set_defaults(func=cmd_restart)

    ri = sub.add_parser(
        "reinit", help="throw a replica's data away and clone it again from the master"
    )
    add_target(ri)
    ri.add_argument("name")
    ri.add_argument("--timeout", type=float, default=600.0)
    ri.set_defaults(func=cmd_reinit)

    fo = sub.add_parser("failover", help="promote NAME when there is no healthy master")
    add_target(fo)
    fo.add_argument("--to", required=True, help="the member to promote")
    fo.add_argument(
        "--force", action="store_true", help="even if it is behind another member (abandons WAL)"
    )
    fo.add_argument("--timeout", type=float, default=60.0)
    fo.set_defaults(func=cmd_failover)
