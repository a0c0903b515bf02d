"""Who may use the gateway and where requests may go: API keys (401 in the OpenAI shape, never
logged, reloaded without restart, per-key priority and concurrency), the credential replicas
see, the admin port's address and switches, and proof that the gateway is never an open proxy.

Replicas here are real servers: the simulator, or ``ScriptedReplica`` where a test must see
exactly which headers and paths reached a replica; an "evil" server stands for any host a
request might try to reach through the gateway."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from benchmarks.sim.server import ReplicaSettings
from gateway.auth import KeyStore
from gateway.errors import ConfigError
from gateway.log import JsonFormatter, PlainFormatter
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, post_chat, wait_pool
from tests.gateway.raw_http import raw_request
from tests.gateway.scripted_replica import ScriptedReplica, StartScripted, scripted_replicas

KEY_A = "sk-alpha-0123456789"
KEY_B = "sk-bravo-9876543210"
KEY_C = "sk-charlie-55555555"
CLASSES = {"critical": 1, "standard": 0, "sheddable": -1}


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(params=[True, False], ids=["callbacks", "tasks"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """The gateway tests here run on both request paths (authentication is on both)."""
    return bool(request.param)


def _keys_yaml(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"keys": entries}))
    os.replace(tmp, path)  # atomically, as a ConfigMap or Secret update is


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def start_scripted() -> AsyncIterator[StartScripted]:
    async with scripted_replicas() as start:
        yield start


# -- client API keys ------------------------------------------------------------------------


async def test_requests_without_a_valid_key_get_401_in_the_openai_shape_and_go_nowhere(
    tmp_path: Path, start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    (replica,) = await start_scripted(1)
    keys = tmp_path / "keys.yaml"
    _keys_yaml(keys, [{"name": "team-a", "key": KEY_A}])
    server = await start_gateway([replica.url], auth={"keys_file": str(keys)})
    body = _chat(replica.model)
    for headers in (
        None,
        _bearer("sk-wrong-0000000000"),
        _bearer(KEY_A + "x"),
        _bearer(KEY_A[:-1]),
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
        {"Authorization": KEY_A},
    ):
        status, err = await post_chat(server, body, headers)
        assert status == 401, headers
        assert err["error"]["code"] == "invalid_api_key"
        assert err["error"]["type"] == "invalid_request_error"
        assert KEY_A not in str(err)
    async with aiohttp.ClientSession() as http:  # every route of the proxy port is guarded
        async with http.get(f"http://127.0.0.1:{server.port}/v1/models") as resp:
            assert resp.status == 401
        # Refused from the headers alone: a declared 1 GB body is never read.
        async with http.post(
            f"http://127.0.0.1:{server.port}/v1/chat/completions",
            data=_slow_body(),
            headers={"Content-Length": str(1 << 30), "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 401
    assert replica.generation_requests() == []
    status, ok = await post_chat(server, body, _bearer(KEY_A))
    assert status == 200 and ok["choices"][0]["message"]["content"] == "ok"
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-nope-12345678", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(**body)
    assert info.value.code == "invalid_api_key"
    assert server.gateway.pool.total_inflight() == 0


async def _slow_body() -> Any:
    yield b'{"model": "m", '
    await asyncio.Event().wait()  # never sends the rest: the gateway must not wait for it


async def test_keys_are_never_logged(
    tmp_path: Path,
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (replica,) = await start_replicas(1)
    keys = tmp_path / "keys.yaml"
    _keys_yaml(keys, [{"name": "team-a", "key": KEY_A}])
    caplog.set_level(logging.DEBUG)
    server = await start_gateway([replica.url], auth={"keys_file": str(keys)})
    await post_chat(server, _chat(replica.model), _bearer(KEY_A))
    await post_chat(server, _chat(replica.model), _bearer(KEY_B))
    await post_chat(server, {"model": 1}, _bearer(KEY_A))  # an error path too
    _keys_yaml(keys, [{"name": "team-a", "key": KEY_A}, {"name": "x", "key": "short"}])
    await server.stop()  # flushes the access lines of the requests above
    access = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(access) == 3
    # Which key made each request is logged by its name; the unknown key has none.
    keys_logged = [PlainFormatter().format(r).rsplit(" key=", 1)[1] for r in access]
    assert sorted(keys_logged) == ["-", "team-a", "team-a"]
    for record in caplog.records:
        for text in (PlainFormatter().format(record), JsonFormatter().format(record)):
            assert KEY_A not in text and KEY_B not in text
            assert "Bearer" not in text


async def test_keys_reload_without_restart_from_a_kubernetes_secret_mount(
    tmp_path: Path, start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (replica,) = await start_replicas(1)
    secret = tmp_path / "secret"
    _secret_version(
        secret, "v1", {"team-a": KEY_A + "\n", "team-b": f"{KEY_B}\npriority: critical"}
    )
    # Re-checked on every request (any interval > 0 works; tiny here to make it immediate).
    server = await start_gateway(
        [replica.url], auth={"keys_dir": str(secret), "reload_interval_s": 1e-9}
    )
    body = _chat(replica.model)
    assert (await post_chat(server, body, _bearer(KEY_A)))[0] == 200
    assert (await post_chat(server, body, _bearer(KEY_B)))[0] == 200
    assert (await post_chat(server, body, _bearer(KEY_C)))[0] == 401
    # The kubelet's atomic update: a new timestamped directory, then ``..data`` swapped to it.
    _secret_version(secret, "v2", {"team-b": KEY_B, "team-c": KEY_C})
    assert (await post_chat(server, body, _bearer(KEY_C)))[0] == 200
    assert (await post_chat(server, body, _bearer(KEY_A)))[0] == 401  # revoked
    assert (await post_chat(server, body, _bearer(KEY_B)))[0] == 200
    # A broken update keeps the last good keys.
    _secret_version(secret, "v3", {"team-b": KEY_B, "team-c": f"{KEY_C}\npriority: bogus"})
    for _ in range(3):
        assert (await post_chat(server, body, _bearer(KEY_C)))[0] == 200


def _secret_version(root: Path, version: str, files: dict[str, str]) -> None:
    """The layout of a Secret volume: ``..<version>/<key>``, ``..data -> ..<version>``,
    ``<key> -> ..data/<key>``."""
    root.mkdir(exist_ok=True)
    data = root / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, root / "..data")
    for entry in root.iterdir():
        if not entry.name.startswith(".") and entry.name not in files:
            entry.unlink()
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_key_store_reload_semantics_with_an_injected_clock(tmp_path: Path) -> None:
    now = [0.0]
    keys = tmp_path / "keys.yaml"
    _keys_yaml(keys, [{"name": "a", "key": KEY_A, "priority": "critical", "max_concurrency": 2}])
    store = KeyStore(
        keys_file=keys, priority_classes=CLASSES, reload_interval_s=5.0, clock=lambda: now[0]
    )
    key = store.authenticate(f"Bearer {KEY_A}")
    assert (key.name, key.priority, key.max_concurrency) == ("a", 1, 2)
    assert store.authenticate(f"bearer   {KEY_A}  ").name == "a"  # scheme is case-insensitive
    _keys_yaml(keys, [{"name": "b", "key": KEY_B}])
    now[0] = 4.9
    assert store.authenticate(f"Bearer {KEY_A}").name == "a"  # not checked yet
    now[0] = 5.0
    assert store.authenticate(f"Bearer {KEY_B}").name == "b"
    assert store.reloads == 1
    _keys_yaml(keys, [{"name": "b", "key": KEY_B}, {"name": "b", "key": KEY_C}])  # duplicate
    now[0] = 10.0
    assert store.authenticate(f"Bearer {KEY_B}").name == "b"
    assert store.reload_errors == 1
    _keys_yaml(keys, [])  # an empty source revokes everything
    now[0] = 15.0
    with pytest.raises(Exception, match="invalid API key"):
        store.authenticate(f"Bearer {KEY_B}")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "holds no keys"),
        ([{"name": "a", "key": "short"}], ">= 8 characters"),
        ([{"name": "a", "key": KEY_A}, {"name": "b", "key": KEY_A}], "are the same key"),
        ([{"name": "a", "key": KEY_A, "priority": "vip"}], "unknown priority class 'vip'"),
        ([{"name": "a", "key": KEY_A, "max_concurrency": 0}], "max_concurrency must be >= 1"),
        ([{"name": "a", "key": KEY_A, "colour": "red"}], "unknown field"),
    ],
)
def test_bad_key_files_are_rejected_at_startup_without_echoing_keys(
    tmp_path: Path, entries: list[dict[str, Any]], message: str
) -> None:
    keys = tmp_path / "keys.yaml"
    _keys_yaml(keys, entries)
    with pytest.raises(ConfigError, match=message) as info:
        KeyStore(keys_file=keys, priority_classes=CLASSES, reload_interval_s=1, clock=lambda: 0)
    assert KEY_A not in str(info.value)


async def test_per_key_concurrency_limit_is_a_429_and_slots_are_released(
    tmp_path: Path,
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    fast_settings: ReplicaSettings,
) -> None:
    (replica,) = await start_replicas(1, fast_settings.with_overrides(weights_floor_s=0.01))
    keys = tmp_path / "keys.yaml"
    _keys_yaml(
        keys,
        [{"name": "small", "key": KEY_A, "max_concurrency": 2}, {"name": "other", "key": KEY_B}],
    )
    server = await start_gateway([replica.url], auth={"keys_file": str(keys)})
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    long = {**_chat(replica.model), "max_tokens": 40, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        streams = [await http.post(url, json=long, headers=_bearer(KEY_A)) for _ in range(2)]
        for s in streams:
            assert s.status == 200
            await s.content.readuntil(b"\n\n")
        async with http.post(url, json=_chat(replica.model), headers=_bearer(KEY_A)) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
        async with http.post(url, json=_chat(replica.model), headers=_bearer(KEY_B)) as resp:
            assert resp.status == 200  # another key is not affected
        streams[0].close()  # a client that disconnects gives its slot back...
        assert (await streams[1].read()).endswith(b"data: [DONE]\n\n")  # ...so does one that ends
        pool = server.gateway.pool
        await wait_pool(pool, lambda: pool.total_inflight() == 0)
        both = [http.post(url, json=long, headers=_bearer(KEY_A)) for _ in range(2)]
        for resp in await asyncio.gather(*both):
            assert resp.status == 200
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_a_keys_priority_class_orders_the_buffer_and_the_header_is_ignored(
    tmp_path: Path,
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    fast_settings: ReplicaSettings,
) -> None:
    (replica,) = await start_replicas(1, fast_settings.with_overrides(weights_floor_s=0.01))
    keys = tmp_path / "keys.yaml"
    _keys_yaml(
        keys,
        [
            {"name": "batch", "key": KEY_A, "priority": "sheddable"},
            {"name": "chat", "key": KEY_B, "priority": "critical"},
            {"name": "plain", "key": KEY_C},
        ],
    )
    server = await start_gateway(
        [replica.url],
        auth={"keys_file": str(keys)},
        saturation={"max_inflight_per_replica": 1},
    )
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    buffer = server.gateway.buffer
    finished: list[str] = []

    async def one(http: aiohttp.ClientSession, key: str, name: str, tokens: int) -> None:
        body = {**_chat(replica.model), "max_tokens": tokens, "ignore_eos": True}
        headers = {**_bearer(key), "x-kvgate-priority": "critical"}  # ignored under auth
        async with http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        finished.append(name)

    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(one(http, KEY_C, "first", 30))
        await wait_pool(server.gateway.pool, lambda: server.gateway.pool.total_inflight() == 1)
        low = asyncio.create_task(one(http, KEY_A, "sheddable", 2))
        await _until(lambda: buffer.queued == 1)
        high = asyncio.create_task(one(http, KEY_B, "critical", 2))
        await _until(lambda: buffer.queued == 2)
        await asyncio.gather(first, low, high)
    assert finished == ["first", "critical", "sheddable"]


async def _until(predicate: Any, limit_s: float = 2.0) -> None:
    # The buffer has no "queue changed" signal to wait on: a bounded poll.
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# -- the credential replicas see --------------------------------------------------------------


async def test_client_authorization_is_not_forwarded_unless_configured(
    start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    (replica,) = await start_scripted(1)
    server = await start_gateway([replica.url])
    await post_chat(server, _chat(replica.model), _bearer("sk-client-secret-1"))
    (seen,) = replica.generation_requests()
    assert "Authorization" not in seen.headers
    forwarding = await start_gateway([replica.url], upstream={"forward_client_auth": True})
    await post_chat(forwarding, _chat(replica.model), _bearer("sk-client-secret-1"))
    assert replica.generation_requests()[-1].headers["Authorization"] == "Bearer sk-client-secret-1"


async def test_a_configured_upstream_token_replaces_the_clients_and_is_reread(
    tmp_path: Path, start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    (replica,) = await start_scripted(1)
    token = tmp_path / "upstream-token"
    token.write_text("replica-token-1\n")
    keys = tmp_path / "keys.yaml"
    _keys_yaml(keys, [{"name": "a", "key": KEY_A}])
    server = await start_gateway(
        [replica.url],
        auth={"keys_file": str(keys)},
        upstream={"api_key_file": str(token)},
    )
    await post_chat(server, _chat(replica.model), _bearer(KEY_A))
    assert replica.generation_requests()[-1].headers.getall("Authorization") == [
        "Bearer replica-token-1"
    ]
    tmp = tmp_path / "t.tmp"
    tmp.write_text("replica-token-2")
    os.replace(tmp, token)
    # Re-read at most every 5 s.
    proxy = server.gateway.proxy
    proxy._credentials._next_check = 0.0  # skip the 5 s wait; the re-read itself is real
    await post_chat(server, _chat(replica.model), _bearer(KEY_A))
    assert replica.generation_requests()[-1].headers["Authorization"] == "Bearer replica-token-2"


# -- the admin port ------------------------------------------------------------------------


def _bindable(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


async def test_admin_port_binds_its_own_address_and_is_absent_from_the_proxy_port(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    if not _bindable("127.0.0.2"):
        pytest.skip("127.0.0.2 is not bindable here")
    (replica,) = await start_replicas(1)
    server = await start_gateway([replica.url], admin={"host": "127.0.0.2", "port": 0})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.2:{server.admin_port}/metrics") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{server.admin_port}/metrics")
        for path in ("/metrics", "/debug/replicas", "/healthz", "/readyz"):
            async with http.get(f"http://127.0.0.1:{server.port}{path}") as resp:
                assert resp.status == 404, path
                assert (await resp.json())["error"]["code"] == "not_found"


async def test_debug_endpoints_can_be_turned_off(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (replica,) = await start_replicas(1)
    admin = {"host": "127.0.0.1", "port": 0, "debug_endpoints": False}
    server = await start_gateway([replica.url], admin=admin)
    base = f"http://127.0.0.1:{server.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/debug/replicas") as resp:
            assert resp.status == 404
        async with http.get(base + "/metrics") as resp:
            assert resp.status == 200


# -- never an open proxy -------------------------------------------------------------------


@pytest.fixture
async def evil(start_scripted: StartScripted) -> ScriptedReplica:
    """Any other host: nothing may ever reach it through the gateway."""
    (server,) = await start_scripted(1, model="evil")
    return server


def _raw(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode() + body


async def test_upstreams_come_only_from_discovery_never_from_the_request(
    start_scripted: StartScripted, start_gateway: StartGateway, evil: ScriptedReplica
) -> None:
    (replica,) = await start_scripted(1)
    server = await start_gateway([replica.url])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    elsewhere = f"127.0.0.1:{evil.port}"
    spoofed = _raw(
        "POST",
        "/v1/chat/completions",
        f"X-Forwarded-Host: {elsewhere}",
        "X-Forwarded-Proto: http",
        f"Forwarded: host={elsewhere}",
        body=body,
    ).replace(b"Host: 127.0.0.1", f"Host: {elsewhere}".encode())
    answered = [
        # Absolute-form target naming another host: the path is served, by a replica.
        await raw_request(
            server.port, _raw("POST", f"http://{elsewhere}/v1/chat/completions", body=body)
        ),
        # Host and forwarding headers naming another host.
        await raw_request(server.port, spoofed),
    ]
    assert [status for status, _ in answered] == [200, 200]
    refused = {
        "traversal": _raw("POST", "/v1/../sim/control", body=body),
        "encoded traversal": _raw("POST", "/v1/%2e%2e/metrics", body=body),
        "double slash": _raw("POST", "//v1/chat/completions", body=body),
        "inner double slash": _raw("POST", "/v1//chat/completions", body=body),
        "other api": _raw("POST", "/v1/files", body=body),
        "admin path": _raw("GET", "/metrics"),
        "connect": b"CONNECT " + elsewhere.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "absolute other path": _raw("GET", f"http://{elsewhere}/metrics"),
        "wrong method": _raw("GET", "/v1/chat/completions"),
    }
    for name, data in refused.items():
        status, _ = await raw_request(server.port, data)
        assert status in (400, 404, 405), (name, status)
    assert evil.seen == []
    assert replica.paths() == ["/v1/chat/completions"] * 2
    for seen in replica.generation_requests():
        assert seen.headers["Host"] == f"127.0.0.1:{replica.port}"  # the replica's, not ours
