"""ModelCatalog: the replicas' control-plane calls — readiness probes and model lists.

One background loop (``run``) makes the calls that ``HealthTracker`` and the model lists need,
concurrently, each with a timeout:

* the health probes the tracker asks for (``HealthTracker.due``): starting replicas on their
  backoff, ejected replicas whose ejection time is over (the half-open probe). ``GET
  health.probe_path``; by default ``/health`` (vLLM, SGLang, TGI), and ``/v1/health/ready``
  (NIM) when ``/health`` is a 404; a replica with neither is judged by its model list alone
  (logged once). 200 is healthy; anything else, a refused connection or a timeout is not.
* ``GET /v1/models``: of a starting replica as soon as its probe passes (then every
  ``STARTING_LIST_S`` until it lists a model), and of every ready replica every
  ``models.refresh_interval_s``.

It records the models in the pool (what routing by model uses), tells the tracker (which
decides the phase), and keeps the gateway's ``/v1/models`` answer, the union over replicas,
ready as bytes.

Invariants:

* A replica is ``ready`` only after its health probe passed and it listed at least one model
  (``HealthTracker``). A later failed refresh keeps its last list (ejecting replicas is passive
  health's business, not the catalog's).
* No fixed tick: the loop sleeps until the next probe or list falls due, and a pool change
  (new replica, phase or admission change) wakes it at once, so a new replica is probed within
  one event-loop turn.
* Failures are logged on transitions (ok → failing → ok), not on every round.
* Probes are a bare HTTP/1.1 GET on asyncio streams (status line only, ``Connection: close``):
  errors are ``OSError``/``TimeoutError``/``ValueError``, so no aiohttp exception is matched
  outside ``upstream.py``.
* Both calls carry the gateway's own credential (``upstream.api_key_file``, through the same
  ``UpstreamCredentials`` the proxy uses), read per call so a rotated file is picked up: a
  replica that requires an API key (vLLM ``--api-key`` guards every ``/v1`` path, NIM's
  ``/v1/health/ready`` included when behind one) must still list its models and pass its
  probe. The token never reaches a log line: failures name the path and the status only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import orjson

from gateway.auth import UpstreamCredentials
from gateway.errors import GatewayError, UpstreamResponseInvalid
from gateway.health import HealthTracker
from gateway.pool import ReplicaPool
from gateway.upstream import credential_hint, fetch_json, join_url
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

STARTING_LIST_S = 1.0  # model list retry for a replica that is healthy but lists nothing yet
DEFAULT_PROBE_PATHS = ("/health", "/v1/health/ready")
_NO_PROBE = ""  # remembered path for a replica with no health endpoint at all


class ModelCatalog:
    def __init__(
        self,
        pool: ReplicaPool,
        *,
        refresh_interval_s: float,
        refresh_timeout_s: float,
        clock: Callable[[], float],
        health: HealthTracker,
        probe_path: str | None = None,
        probe_timeout_s: float = 2.0,
        credentials: UpstreamCredentials | None = None,
    ) -> None:
        self._pool = pool
        self._credentials = credentials
        self._session: aiohttp.ClientSession | None = None
        self._interval_s = refresh_interval_s
        self._timeout_s = refresh_timeout_s
        self._clock = clock
        self._health = health
        self._probe_paths = DEFAULT_PROBE_PATHS if probe_path is None else (probe_path,)
        self._probe_timeout_s = probe_timeout_s
        self._path: dict[ReplicaId, str] = {}  # the health path that answered, per replica
        self._listed_at: dict[ReplicaId, float] = {}
        self._failing: dict[ReplicaId, str] = {}
        self._unhealthy: dict[ReplicaId, str] = {}
        self._body: bytes | None = None
        self._wake = asyncio.Event()
        pool.add_listener(self._membership_changed)
        pool.changes.subscribe(self._wake.set)

    def models_body(self) -> bytes:
        """``/v1/models``: the union of the replicas' model cards (first replica by id wins)."""
        body = self._body
        if body is None:
            cards: dict[str, Mapping[str, object]] = {}
            for rid in self._pool.ids():
                for card in self._pool.model_cards(rid):
                    cards.setdefault(str(card["id"]), card)
            body = self._body = orjson.dumps(
                {"object": "list", "data": [cards[k] for k in sorted(cards)]}
            )
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _authorization(self) -> str | None:
        """The ``Authorization`` value the gateway itself presents to replicas, if any.

        Asked per call: the credentials re-read their file when it changes. A control-plane
        call has no client header to forward, so this is exactly what the proxy would add.
        """
        return None if self._credentials is None else self._credentials.authorization()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: it must belong to the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=1)
            )
        return self._session

    # -- rounds ----------------------------------------------------------------------------

    async def refresh_once(self) -> None:
        """Probe every starting replica and list every member's models now, whatever is due
        (ejected replicas still wait for their half-open probe)."""
        async with asyncio.TaskGroup() as tg:
            for rid in self._pool.ids():
                phase = self._pool.state(rid).phase
                if phase == "starting":
                    tg.create_task(self._check(rid, probe=True, list_models=True))
                elif phase == "ready":
                    tg.create_task(self._check(rid, probe=False, list_models=True))

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            probes = set(self._health.due())
            lists = {rid for rid in self._pool.ids() if self._list_due(rid, now)}
            if probes or lists:
                async with asyncio.TaskGroup() as tg:
                    for rid in probes | lists:
                        tg.create_task(self._check(rid, rid in probes, rid in lists))
            delay = self._next_delay()
            if self._wake.is_set() or delay == 0.0:
                await asyncio.sleep(0)  # a change during the round: look again at once
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _list_due(self, rid: ReplicaId, now: float) -> bool:
        state = self._pool.state(rid)
        last = self._listed_at.get(rid)
        if state.phase == "starting":
            retry = last is None or now - last >= STARTING_LIST_S
            return self._health.probe_ok(rid) and not state.models and retry
        return state.phase == "ready" and (last is None or now - last >= self._interval_s)

    def _next_delay(self) -> float | None:
        now = self._clock()
        times: list[float] = []
        probe = self._health.next_due_at()
        if probe is not None:
            times.append(probe)
        for rid in self._pool.ids():
            state = self._pool.state(rid)
            last = self._listed_at.get(rid, now)
            if state.phase == "ready":
                times.append(last + self._interval_s)
            elif state.phase == "starting" and self._health.probe_ok(rid) and not state.models:
                times.append(last + STARTING_LIST_S)
        return max(0.0, min(times) - now) if times else None

    async def _check(self, rid: ReplicaId, probe: bool, list_models: bool) -> None:
        if rid not in self._pool:  # removed between scheduling and running
            return
        if probe:
            ok = await self._probe(rid)
            if rid not in self._pool:
                return
            self._health.probe_result(rid, ok)
            if not ok:
                return
            state = self._pool.state(rid)
            list_models = list_models or (state.phase == "starting" and not state.models)
        if list_models and rid in self._pool:
            await self._refresh(rid)

    # -- health probe ----------------------------------------------------------------------

    async def _probe(self, rid: ReplicaId) -> bool:
        url = self._pool.url(rid)
        known = self._path.get(rid)
        if known == _NO_PROBE:
            return True
        paths = self._probe_paths if known is None else (known,)
        authorization = self._authorization()
        reason = ""
        for i, path in enumerate(paths):
            try:
                status = await _get_status(url, path, self._probe_timeout_s, authorization)
            except TimeoutError:
                reason = f"no answer within {self._probe_timeout_s:g} s"
                break
            except (OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                break
            if status == 404 and known is None:
                if i + 1 < len(paths):
                    continue
                if len(paths) > 1:  # none of the default paths exists: trust the model list
                    self._path[rid] = _NO_PROBE
                    logger.warning(
                        "replica %s has no health endpoint (%s); ready once it lists models",
                        rid,
                        ", ".join(paths),
                    )
                    return True
            if status == 200:
                self._path[rid] = path
                if self._unhealthy.pop(rid, None) is not None:
                    logger.info("replica %s: health probe passes", rid)
                return True
            reason = f"GET {path} answered {status}{credential_hint(status)}"
            break
        if self._unhealthy.get(rid) != reason:
            logger.info("replica %s not healthy yet: %s", rid, reason)
        self._unhealthy[rid] = reason
        return False

    # -- model list ------------------------------------------------------------------------

    async def _refresh(self, rid: ReplicaId) -> None:
        url = join_url(self._pool.url(rid), "/v1/models")
        self._listed_at[rid] = self._clock()
        try:
            doc = await fetch_json(
                self._get_session(),
                url,
                timeout_s=self._timeout_s,
                authorization=self._authorization(),
            )
            cards = _model_cards(doc)
        except GatewayError as exc:
            if self._failing.get(rid) != exc.code:
                logger.warning("replica %s: cannot list models: %s", rid, exc.message)
            self._failing[rid] = exc.code
            return
        if rid not in self._pool:
            return
        if self._failing.pop(rid, None) is not None:
            logger.info("replica %s lists models again", rid)
        models = [str(c["id"]) for c in cards]
        if frozenset(models) != self._pool.state(rid).models:
            logger.info("replica %s serves %s", rid, ", ".join(sorted(models)) or "no models")
        self._pool.set_models(rid, models, cards)
        self._body = None
        self._health.models_listed(rid)

    def _membership_changed(self, members: frozenset[ReplicaId]) -> None:
        self._body = None
        for table in (self._failing, self._unhealthy, self._path, self._listed_at):
            for rid in table.keys() - members:
                del table[rid]
        self._wake.set()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # one for all replicas: it is costly to build


async def _get_status(url: str, path: str, timeout_s: float, authorization: str | None) -> int:
    """The status code of ``GET url+path`` (the body is not read; the connection is closed)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    tls = _tls_context() if https else None
    request = (
        f"GET {parts.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "User-Agent: kvgate-health\r\nAccept: */*\r\nConnection: close\r\n"
    ).encode("latin-1")
    if authorization is not None:
        # UpstreamCredentials admits no whitespace or control character in a token, so it
        # cannot end the header early; UTF-8, as aiohttp sends it on the other calls.
        request += b"Authorization: " + authorization.encode("utf-8") + b"\r\n"
    request += b"\r\n"
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port or (443 if https else 80), ssl=tls
        )
        try:
            writer.write(request)
            line = await reader.readline()
        finally:
            writer.close()
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ValueError("not an HTTP response")
    return int(fields[1])


def _model_cards(doc: object) -> tuple[Mapping[str, object], ...]:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise UpstreamResponseInvalid("GET /v1/models: no 'data' list")
    return tuple(c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str))
