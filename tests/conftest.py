"""Suite-wide collection order: the few CI tests that run for tens of seconds (``long``) go
first, so that with two xdist workers one of them is not left running alone at the end."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: else as is
