"""The Consul emulator itself: it must behave as Consul's documentation says (and be stricter
where Consul would silently accept a client mistake), or the backend tests prove nothing.

Plain HTTP requests here, no py-consul: these tests pin the wire format the backend relies on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.consul_emulator import ConsulEmulator, parse_duration
from tests.support.fixtures_consul import HealthEndpoint

TOKEN = "s3cr3t-acl-token"


class Api:
    """A tiny raw client: (status, headers, decoded body) per request."""

    def __init__(self, emulator: ConsulEmulator, token: str | None = None) -> None:
        self.emulator = emulator
        self.token = token
        self.http = aiohttp.ClientSession()

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | list[tuple[str, str]] | None = None,
        body: Any = None,
        data: bytes | None = None,
        token: str | None = None,
        limit: float = 5.0,
    ) -> tuple[int, Any, Any]:
        headers = {}
        if token or self.token:
            headers["X-Consul-Token"] = token or self.token or ""
        if body is not None:
            data = json.dumps(body).encode()
        async with self.http.request(
            method,
            self.emulator.url + path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=limit),
        ) as resp:
            raw = await resp.read()
            try:
                decoded: Any = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode(errors="replace")
            return resp.status, resp.headers, decoded

    async def session(self, **fields: Any) -> str:
        status, _, body = await self.call("PUT", "/v1/session/create", body=fields)
        assert status == 200, body
        return str(body["ID"])

    async def put(self, key: str, value: bytes = b"v", **params: Any) -> bool:
        status, _, body = await self.call(
            "PUT", f"/v1/kv/{key}", params={k: str(v) for k, v in params.items()}, data=value
        )
        assert status == 200, body
        return bool(body)

    async def get(self, key: str, **params: Any) -> tuple[int, Any, Any]:
        return await self.call(
            "GET", f"/v1/kv/{key}", params={k: str(v) for k, v in params.items()}
        )

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def emu() -> AsyncIterator[ConsulEmulator]:
    emulator = ConsulEmulator(min_ttl=0.2)
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def api(emu: ConsulEmulator) -> AsyncIterator[Api]:
    client = Api(emu)
    yield client
    await client.close()


async def _wait_until(pred: Any, within: float = 3.0) -> float:
    """Poll ``pred`` (state of the in-process emulator); returns the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < within, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


# -- durations and strict parameters -------------------------------------------------------------


def test_go_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1.5h") == 5400
    assert parse_duration("0") == 0
    for bad in ("10", "", "s", "1x", "1s2", "--1s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    "params",
    [
        {"recursive": ""},  # typo of recurse: Consul would ignore it and read one key
        {"recurse": "false"},  # Consul treats any presence as true
        {"index": "abc"},
        {"index": "-1"},
        {"wait": "10"},  # no unit
        {"wait": "soon"},
        {"stale": "", "consistent": ""},
    ],
)
async def test_bad_query_parameters_are_refused(api: Api, params: dict[str, str]) -> None:
    status, _, body = await api.call("GET", "/v1/kv/a", params=params)
    assert status == 400, body


async def test_repeated_parameter_and_token_in_url_are_refused(api: Api) -> None:
    status, _, _ = await api.call("GET", "/v1/kv/a", params=[("index", "1"), ("index", "2")])
    assert status == 400
    status, _, body = await api.call("GET", "/v1/kv/a", params={"token": "x"})
    assert status == 400 and "X-Consul-Token" in body


async def test_wrong_datacenter_and_method(api: Api) -> None:
    status, _, body = await api.call("GET", "/v1/kv/a", params={"dc": "elsewhere"})
    assert status == 500 and "No path to datacenter" in body
    status, _, _ = await api.call("GET", "/v1/session/create")
    assert status == 405
    status, _, _ = await api.call("POST", "/v1/kv/a")
    assert status == 405


async def test_status_leader(api: Api, emu: ConsulEmulator) -> None:
    assert (await api.call("GET", "/v1/status/leader"))[2] == "127.0.0.1:8300"
    emu.leaderless = True
    assert (await api.call("GET", "/v1/status/leader"))[2] == ""


# -- ACL -----------------------------------------------------------------------------------------


async def test_acl_token_is_enforced() -> None:
    async with ConsulEmulator(acl_token=TOKEN) as emulator:
        api = Api(emulator)
        try:
            status, _, body = await api.call("GET", "/v1/kv/a")
            assert status == 403 and body.startswith("Permission denied")
            status, _, body = await api.call("GET", "/v1/kv/a", token="wrong")
            assert (status, body) == (403, "ACL not found")
            status, _, _ = await api.call("GET", "/v1/kv/a", token=TOKEN)
            assert status == 404  # allowed; the key just does not exist
            # the status endpoints need no token, as in Consul
            assert (await api.call("GET", "/v1/status/leader"))[0] == 200
            # the header is the only place a token may travel
            assert all(TOKEN not in path for _m, path in emulator.request_log)
        finally:
            await api.close()


# -- sessions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "status", "text"),
    [
        ({"TTL": "0.1s"}, 500, "Invalid Session TTL"),
        ({"TTL": "86401s"}, 500, "Invalid Session TTL"),
        ({"TTL": "ten seconds"}, 500, "invalid"),
        ({"TTL": 10}, 400, "TTL"),
        ({"Behavior": "keep"}, 500, "Invalid Behavior"),
        ({"LockDelay": "61s"}, 500, "Lock delay"),
        ({"Checks": ["no-such-check"]}, 500, "Missing check"),
        ({"Node": "other-node"}, 500, "Missing node"),
        ({"Colour": "blue"}, 400, "unknown field"),
    ],
)
async def test_session_create_validation(
    api: Api, fields: dict[str, Any], status: int, text: str
) -> None:
    got, _, body = await api.call("PUT", "/v1/session/create", body=fields)
    assert got == status, body
    assert text in body


async def test_session_defaults_and_check_rules(api: Api, emu: ConsulEmulator) -> None:
    default = await api.session()
    s = emu.sessions[default]
    assert (s.node_checks, s.lock_delay, s.behavior, s.ttl) == (["serfHealth"], 15.0, "release", "")
    # field names match case-insensitively (py-consul sends lower case)
    legacy = await api.session(checks=[], lockdelay="0s", behavior="delete", ttl="1s")
    s = emu.sessions[legacy]
    assert (s.node_checks, s.lock_delay, s.behavior, s.ttl_seconds) == ([], 0.0, "delete", 1.0)
    modern = await api.session(NodeChecks=[])
    assert emu.sessions[modern].node_checks == []
    # a small number is seconds, as in Consul's LockDelay fix-up
    assert emu.sessions[await api.session(LockDelay=5)].lock_delay == 5.0
    status, _, info = await api.call("GET", f"/v1/session/info/{legacy}")
    assert status == 200 and info[0]["Behavior"] == "delete" and info[0]["LockDelay"] == 0
    assert info[0]["NodeChecks"] == [] and info[0]["TTL"] == "1s"
    listed = (await api.call("GET", "/v1/session/list"))[2]
    assert len(listed) == 4 and {default, legacy, modern} <= {x["ID"] for x in listed}


async def test_session_renew_destroy_info_of_unknown(api: Api) -> None:
    unknown = "adf4238a-882b-9ddc-4a9d-5b6758e4159e"
    status, _, body = await api.call("PUT", f"/v1/session/renew/{unknown}")
    assert status == 404 and "not found" in body
    status, _, body = await api.call("PUT", f"/v1/session/destroy/{unknown}")
    assert (status, body) == (200, True)
    status, _, body = await api.call("GET", f"/v1/session/info/{unknown}")
    assert (status, body) == (200, [])
    status, _, _ = await api.call("PUT", "/v1/session/renew/not-a-uuid")
    assert status == 400


async def test_ttl_invalidation_time_and_renewal(emu: ConsulEmulator, api: Api) -> None:
    sid = await api.session(TTL="0.5s", Behavior="delete", LockDelay="0s")
    assert await api.put("k", acquire=sid)
    # renewals keep it alive past its TTL
    for _ in range(4):
        await asyncio.sleep(0.25)
        status, _, body = await api.call("PUT", f"/v1/session/renew/{sid}")
        assert status == 200 and body[0]["ID"] == sid
    lived = await _wait_until(lambda: sid not in emu.sessions)
    assert 0.4 <= lived < 0.8, lived  # default: exactly the TTL after the last renewal
    assert (await api.get("k"))[0] == 404
    assert (await api.call("PUT", f"/v1/session/renew/{sid}"))[0] == 404


async def test_ttl_multiplier_emulates_the_worst_case() -> None:
    async with ConsulEmulator(min_ttl=0.2, ttl_multiplier=2.0) as emulator:
        api = Api(emulator)
        try:
            sid = await api.session(TTL="0.4s")
            lived = await _wait_until(lambda: sid not in emulator.sessions)
            assert 0.75 <= lived < 1.2
        finally:
            await api.close()


async def test_behavior_release_and_delete(emu: ConsulEmulator, api: Api) -> None:
    rel = await api.session(Behavior="release", LockDelay="0s")
    dele = await api.session(Behavior="delete", LockDelay="0s")
    assert await api.put("r", b"1", acquire=rel)
    assert await api.put("d", b"2", acquire=dele)
    before = (await api.get("r"))[2][0]
    await api.call("PUT", f"/v1/session/destroy/{rel}")
    await api.call("PUT", f"/v1/session/destroy/{dele}")
    after = (await api.get("r"))[2][0]
    assert "Session" not in after
    assert after["LockIndex"] == before["LockIndex"] == 1
    assert after["ModifyIndex"] > before["ModifyIndex"]
    assert base64.b64decode(after["Value"]) == b"1"
    assert (await api.get("d"))[0] == 404


async def test_lock_delay_refuses_acquire_for_its_duration(emu: ConsulEmulator, api: Api) -> None:
    holder = await api.session(LockDelay="0.5s")
    other = await api.session(LockDelay="0s")
    assert await api.put("lock", acquire=holder)
    t0 = time.monotonic()
    emu.invalidate_session(holder, "test")
    assert await api.put("lock", acquire=other) is False
    while not await api.put("lock", acquire=other):
        assert time.monotonic() - t0 < 2
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 >= 0.45
    # lock-delay 0: free at once
    emu.invalidate_session(other, "test")
    third = await api.session(LockDelay="0s")
    assert await api.put("lock", acquire=third)


async def test_agent_restart_invalidates_sessions_and_refuses_connections(
    emu: ConsulEmulator, api: Api
) -> None:
    sid = await api.session(Behavior="delete", NodeChecks=[])
    assert await api.put("held", acquire=sid)
    await emu.stop_listener()
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("GET", "/v1/status/leader", limit=1)
    await emu.start_listener()
    assert (await api.call("GET", "/v1/status/leader"))[0] == 200
    assert sid in emu.sessions  # a listener outage alone does not touch sessions
    await emu.restart_agent()
    assert sid not in emu.sessions
    assert (await api.get("held"))[0] == 404


async def test_gossip_blip_only_hits_sessions_with_serf_health(
    emu: ConsulEmulator, api: Api
) -> None:
    with_serf = await api.session()
    without = await api.session(NodeChecks=[])
    assert emu.gossip_blip() == [with_serf]
    assert with_serf not in emu.sessions and without in emu.sessions


# -- KV ------------------------------------------------------------------------------------------


async def test_kv_entry_fields_and_indexes(emu: ConsulEmulator, api: Api) -> None:
    assert await api.put("a/x", b"hello", flags=42)
    status, headers, body = await api.get("a/x")
    entry = body[0]
    assert status == 200
    assert entry["Key"] == "a/x" and base64.b64decode(entry["Value"]) == b"hello"
    assert entry["Flags"] == 42 and entry["LockIndex"] == 0 and "Session" not in entry
    assert entry["CreateIndex"] == entry["ModifyIndex"]
    assert int(headers["X-Consul-Index"]) >= entry["ModifyIndex"]
    assert await api.put("a/x", b"again")
    again = (await api.get("a/x"))[2][0]
    assert again["CreateIndex"] == entry["CreateIndex"]
    assert again["ModifyIndex"] > entry["ModifyIndex"]
    assert await api.put("a/empty", b"")
    assert (await api.get("a/empty"))[2][0]["Value"] is None
    status, headers, raw = await api.get("a/x", raw="")
    assert (status, raw) == (200, "again")
    status, headers, _ = await api.get("a/missing")
    assert status == 404 and int(headers["X-Consul-Index"]) > 0


async def test_kv_keys_recurse_and_separator(api: Api) -> None:
    for key in ("p/a", "p/b/1", "p/b/2", "q/c"):
        assert await api.put(key)
    status, _, keys = await api.get("p/", keys="")
    assert keys == ["p/a", "p/b/1", "p/b/2"]
    _, _, keys = await api.get("p/", keys="", separator="/")
    assert keys == ["p/a", "p/b/"]
    _, _, entries = await api.get("p/", recurse="")
    assert [e["Key"] for e in entries] == ["p/a", "p/b/1", "p/b/2"]
    assert (await api.get("nothing/", recurse=""))[0] == 404
    assert (await api.get("p/", raw="", recurse=""))[0] == 400


async def test_kv_acquire_and_release(emu: ConsulEmulator, api: Api) -> None:
    s1 = await api.session(LockDelay="0s")
    s2 = await api.session(LockDelay="0s")
    assert await api.put("l", b"one", acquire=s1)
    e = (await api.get("l"))[2][0]
    assert (e["Session"], e["LockIndex"]) == (s1, 1)
    # the holder updates the value without bumping LockIndex
    assert await api.put("l", b"two", acquire=s1)
    e2 = (await api.get("l"))[2][0]
    assert (e2["LockIndex"], base64.b64decode(e2["Value"])) == (1, b"two")
    assert await api.put("l", b"x", acquire=s2) is False
    assert await api.put("l", b"x", release=s2) is False
    assert await api.put("l", b"released", release=s1)
    e3 = (await api.get("l"))[2][0]
    assert "Session" not in e3 and e3["LockIndex"] == 1
    assert base64.b64decode(e3["Value"]) == b"released"
    assert await api.put("l", b"three", acquire=s2)
    assert (await api.get("l"))[2][0]["LockIndex"] == 2
    # a write without ?acquire proceeds even on a held key and keeps the lock
    assert await api.put("l", b"plain")
    assert (await api.get("l"))[2][0]["Session"] == s2
    # an unknown session is an error, as in Consul
    status, _, body = await api.call(
        "PUT", "/v1/kv/l2", params={"acquire": "adf4238a-882b-9ddc-4a9d-5b6758e4159e"}
    )
    assert status == 500 and "invalid session" in body


async def test_kv_cas_rules(api: Api) -> None:
    assert await api.put("c", b"1", cas=0)
    assert await api.put("c", b"2", cas=0) is False  # cas=0: create only
    idx = (await api.get("c"))[2][0]["ModifyIndex"]
    assert await api.put("c", b"3", cas=idx + 1) is False
    assert await api.put("c", b"3", cas=idx)
    idx = (await api.get("c"))[2][0]["ModifyIndex"]
    assert (await api.call("DELETE", "/v1/kv/c", params={"cas": "0"}))[2] is False
    assert (await api.call("DELETE", "/v1/kv/c", params={"cas": str(idx - 1)}))[2] is False
    assert (await api.call("DELETE", "/v1/kv/c", params={"cas": str(idx)}))[2] is True
    # Consul reports a cas-delete of an absent key as done
    assert (await api.call("DELETE", "/v1/kv/c", params={"cas": "5"}))[2] is True
    sid = await api.session()
    status, _, body = await api.call(
        "PUT", "/v1/kv/c", params={"cas": "0", "acquire": sid}, data=b"x"
    )
    assert status == 400 and "ignore the cas" in body


async def test_kv_delete_recurse_and_value_size(api: Api) -> None:
    for key in ("t/a", "t/b", "u/c"):
        assert await api.put(key)
    assert (await api.call("DELETE", "/v1/kv/t/", params={"recurse": ""}))[2] is True
    assert (await api.get("t/", recurse=""))[0] == 404
    assert (await api.get("u/c"))[0] == 200
    status, _, _ = await api.call("PUT", "/v1/kv/big", data=b"x" * (512 * 1024 + 1))
    assert status == 413


# -- blocking queries ----------------------------------------------------------------------------


async def test_blocking_query_returns_on_change_or_after_wait(
    emu: ConsulEmulator, api: Api
) -> None:
    assert await api.put("w/a")
    _, headers, _ = await api.get("w/", recurse="")
    index = int(headers["X-Consul-Index"])

    t0 = time.monotonic()
    status, headers, _ = await api.get("w/", recurse="", index=index, wait="300ms")
    waited = time.monotonic() - t0
    assert status == 200 and int(headers["X-Consul-Index"]) == index
    assert 0.28 <= waited < 0.3 * 17 / 16 + 0.2  # wait plus at most wait/16 of jitter

    async def write_later() -> None:
        await asyncio.sleep(0.2)
        await api.put("w/b")

    writer = asyncio.create_task(write_later())
    t0 = time.monotonic()
    _, headers, entries = await api.get("w/", recurse="", index=index, wait="5s")
    assert time.monotonic() - t0 < 0.5
    assert int(headers["X-Consul-Index"]) > index and len(entries) == 2
    await writer
    # a change outside the prefix does not wake it
    index = int(headers["X-Consul-Index"])
    other = asyncio.create_task(api.put("elsewhere"))
    t0 = time.monotonic()
    _, headers, _ = await api.get("w/", recurse="", index=index, wait="300ms")
    assert time.monotonic() - t0 >= 0.28 and int(headers["X-Consul-Index"]) == index
    await other
    # an index from the future blocks; a stale one returns at once
    t0 = time.monotonic()
    await api.get("w/", recurse="", index=index - 1, wait="5s")
    assert time.monotonic() - t0 < 0.2


async def test_deletes_advance_a_prefix_index_until_tombstones_are_reaped(
    emu: ConsulEmulator, api: Api
) -> None:
    assert await api.put("g/a")
    assert await api.put("g/b")
    await api.call("DELETE", "/v1/kv/g/b")
    _, headers, entries = await api.get("g/", recurse="")
    after_delete = int(headers["X-Consul-Index"])
    assert after_delete > entries[0]["ModifyIndex"]  # the tombstone's index counts
    emu.reap_tombstones()
    _, headers, _ = await api.get("g/", recurse="")
    assert int(headers["X-Consul-Index"]) < after_delete  # the index went backwards


async def test_snapshot_restore_sends_indexes_back_and_wakes_queries(
    emu: ConsulEmulator, api: Api
) -> None:
    assert await api.put("s/a", b"old")
    snap = emu.snapshot()
    assert await api.put("s/a", b"new")
    _, headers, _ = await api.get("s/", recurse="")
    index = int(headers["X-Consul-Index"])
    waiting = asyncio.create_task(api.get("s/", recurse="", index=index, wait="5s"))
    await asyncio.sleep(0.1)
    emu.restore(snap)
    _, headers, entries = await asyncio.wait_for(waiting, 1.0)
    assert int(headers["X-Consul-Index"]) < index
    assert base64.b64decode(entries[0]["Value"]) == b"old"


async def test_index_is_never_zero_unless_forced(emu: ConsulEmulator, api: Api) -> None:
    fresh = ConsulEmulator(start_index=0)
    async with fresh:
        raw = Api(fresh)
        try:
            assert (await raw.get("nothing"))[1]["X-Consul-Index"] == "1"
        finally:
            await raw.close()
    emu.force_index_zero = True
    assert (await api.get("nothing"))[1]["X-Consul-Index"] == "0"


# -- agent services, catalog, health --------------------------------------------------------------


async def test_service_registration_check_catalog_and_health(
    emu: ConsulEmulator, api: Api, health_endpoint: HealthEndpoint
) -> None:
    base, codes = health_endpoint.url, health_endpoint.codes
    payload = {  # the spelling py-consul sends
        "name": "pg",
        "id": "pg-1",
        "port": 5432,
        "tags": ["master"],
        "checks": [{"http": base + "/primary", "interval": "100ms", "timeout": "1s"}],
    }
    status, _, _ = await api.call(
        "PUT",
        "/v1/agent/service/register",
        params={"replace-existing-checks": "true"},
        body=payload,
    )
    assert status == 200
    services = (await api.call("GET", "/v1/agent/services"))[2]
    assert services["pg-1"]["Tags"] == ["master"] and services["pg-1"]["Port"] == 5432
    await _wait_until(lambda: emu.checks["service:pg-1"].status == "passing")
    healthy = (await api.call("GET", "/v1/health/service/pg", params={"passing": ""}))[2]
    assert [h["Service"]["ID"] for h in healthy] == ["pg-1"]
    assert (await api.call("GET", "/v1/catalog/service/pg", params={"tag": "master"}))[2]
    assert (await api.call("GET", "/v1/catalog/service/pg", params={"tag": "replica"}))[2] == []

    # re-registration: new tag, new check URL (replacing the old check), now failing
    payload["tags"] = ["replica"]
    payload["checks"] = [{"http": base + "/replica", "interval": "100ms"}]
    await api.call(
        "PUT", "/v1/agent/service/register", params={"replace-existing-checks": ""}, body=payload
    )
    await _wait_until(lambda: emu.checks["service:pg-1"].status == "critical")
    assert list(emu.checks) == ["service:pg-1"]
    assert emu.checks["service:pg-1"].http == base + "/replica"
    assert (await api.call("GET", "/v1/health/service/pg", params={"passing": ""}))[2] == []
    codes["/replica"] = 200
    await _wait_until(lambda: emu.checks["service:pg-1"].status == "passing")
    checks = (await api.call("GET", "/v1/agent/checks"))[2]
    assert checks["service:pg-1"]["Status"] == "passing"

    assert (await api.call("PUT", "/v1/agent/service/deregister/pg-1"))[0] == 200
    assert (await api.call("PUT", "/v1/agent/service/deregister/pg-1"))[0] == 404
    assert (await api.call("GET", "/v1/agent/services"))[2] == {}
    assert emu.checks == {}


@pytest.mark.parametrize(
    "payload",
    [
        {"Port": 5432},  # no name
        {"Name": "pg", "Port": "5432"},
        {"Name": "pg", "Port": 70000},
        {"Name": "pg", "Colour": "blue"},
        {"Name": "pg", "Check": {"HTTP": "http://127.0.0.1:1/"}},  # no interval
        {"Name": "pg", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "often"}},
        {"Name": "pg", "Tags": "master"},
    ],
)
async def test_service_registration_validation(api: Api, payload: dict[str, Any]) -> None:
    status, _, body = await api.call("PUT", "/v1/agent/service/register", body=payload)
    assert status == 400, body


async def test_injected_failures_and_latency(emu: ConsulEmulator, api: Api) -> None:
    emu.inject_failure(status=500, body="rpc error: No cluster leader", count=2)
    assert (await api.get("x"))[0] == 500
    assert (await api.get("x"))[0] == 500
    assert (await api.get("x"))[0] == 404
    emu.inject_failure(status=200, body="<html>proxy</html>", content_type="text/html")
    assert (await api.get("x"))[2] == "<html>proxy</html>"
    emu.latency = 0.2
    t0 = time.monotonic()
    await api.get("x")
    assert time.monotonic() - t0 >= 0.19
