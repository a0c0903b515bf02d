"""ModelCatalog: which models each replica serves, from its own ``GET /v1/models``.

A background loop asks every replica for its model list (concurrently, each with a timeout),
records the models in the pool — which is what routing by model uses — and keeps the gateway's
``/v1/models`` answer, the union over replicas, ready as bytes.

Invariants:

* A replica is ``starting`` until it has listed at least one model; the first successful list
  makes it ``ready``. A later failed refresh keeps its last list (ejecting replicas is passive
  health's business, not the catalog's).
* Failures are logged on transitions (ok → failing → ok), not on every round.
* Starting replicas are asked again every ``STARTING_PROBE_S`` (capacity is coming); a
  membership change wakes the loop at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp
import orjson

from gateway.errors import GatewayError, UpstreamResponseInvalid
from gateway.pool import ReplicaPool
from gateway.upstream import fetch_json, join_url
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

STARTING_PROBE_S = 1.0


class ModelCatalog:
    def __init__(
        self,
        pool: ReplicaPool,
        *,
        refresh_interval_s: float,
        refresh_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._pool = pool
        self._session: aiohttp.ClientSession | None = None
        self._interval_s = refresh_interval_s
        self._timeout_s = refresh_timeout_s
        self._clock = clock
        self._failing: dict[ReplicaId, str] = {}
        self._body: bytes | None = None
        self._wake = asyncio.Event()
        pool.add_listener(self._membership_changed)

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

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: it must belong to the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=1)
            )
        return self._session

    async def refresh_once(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for rid in self._pool.ids():
                tg.create_task(self._refresh(rid))

    async def run(self) -> None:
        while True:
            await self.refresh_once()
            delay = STARTING_PROBE_S if self._pool.has_unlisted() else self._interval_s
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _refresh(self, rid: ReplicaId) -> None:
        url = join_url(self._pool.url(rid), "/v1/models")
        try:
            doc = await fetch_json(self._get_session(), url, timeout_s=self._timeout_s)
            cards = _model_cards(doc)
        except GatewayError as exc:
            if self._failing.get(rid) != exc.code:
                logger.warning("replica %s: cannot list models: %s", rid, exc.message)
            self._failing[rid] = exc.code
            return
        if rid not in self._pool:
            return
        if self._failing.pop(rid, None) is not None:
            logger.info("replica %s: lists models again", rid)
        models = [str(c["id"]) for c in cards]
        if frozenset(models) != self._pool.state(rid).models:
            logger.info("replica %s serves %s", rid, ", ".join(sorted(models)) or "no models")
        self._pool.set_models(rid, models, cards)
        self._body = None
        if models:
            self._pool.promote(rid, self._clock())

    def _membership_changed(self, members: frozenset[ReplicaId]) -> None:
        self._body = None
        for rid in set(self._failing) - members:
            del self._failing[rid]
        self._wake.set()


def _model_cards(doc: object) -> tuple[Mapping[str, object], ...]:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise UpstreamResponseInvalid("GET /v1/models: no 'data' list")
    return tuple(c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str))
