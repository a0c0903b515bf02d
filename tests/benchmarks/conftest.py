"""Fixtures that start simulated replicas in-process, on 127.0.0.1 with free ports.

``sim_replica``: one started replica with the fast test profile (2 ms steps, ready at once).
``start_replicas``: a factory, ``await start_replicas(3, settings)`` -> list of started replicas;
every replica it started is stopped at teardown. Tests elsewhere can import these fixtures
(``from tests.benchmarks.conftest import sim_replica, start_replicas``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica

StartReplicas = Callable[..., Awaitable[list[SimReplica]]]


@pytest.fixture
def fast_settings() -> ReplicaSettings:
    return ReplicaSettings.fast()


@pytest.fixture
async def start_replicas() -> AsyncIterator[StartReplicas]:
    started: list[SimReplica] = []

    async def start(
        n: int = 1, settings: ReplicaSettings | None = None, *, seed: int = 0
    ) -> list[SimReplica]:
        replicas = [SimReplica(settings or ReplicaSettings.fast(), seed=seed + i) for i in range(n)]
        for replica in replicas:
            started.append(replica)
            await replica.start()
        return replicas

    yield start
    for replica in started:
        await replica.stop()


@pytest.fixture
async def sim_replica(start_replicas: StartReplicas) -> SimReplica:
    (replica,) = await start_replicas(1)
    return replica
