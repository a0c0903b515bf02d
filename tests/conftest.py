"""Suite-wide scheduling: the few CI tests that run for tens of seconds (``long``) go first, one
after another on one xdist worker (``make test`` runs with ``--dist loadgroup``), while the
other worker takes the rest.

Two of them must keep real time: the live routing check's simulated replicas, and the soak's
latency and memory bounds. When the long tests shared the two cores with each other, one CI
run saw the live check's replicas fall 5.1 ms per step behind (its bound is 5 ms): a void run,
and a failed suite. One after another, each shares the machine only with short tests."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(pytest.mark.xdist_group("long"))
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: else as is
