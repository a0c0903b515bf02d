"""Static membership: a fixed list of replica URLs, or a file re-read when it changes.

``StaticDiscovery(urls)`` pushes one snapshot and then idles until cancelled.

``FileWatch(path, load)`` re-reads a file on change (polled: inode, size and mtime) and on
demand (``request_reload()``, which the CLI wires to SIGHUP). ``load`` is any callable returning
the URL list, so the gateway's config loader plugs in directly; the default reads one URL per
line (``#`` comments allowed).

Invariants:
- The first load must succeed; its error propagates, because at startup there is no good
  membership to fall back to and a typo should fail fast.
- A later load that fails (file missing mid-rewrite, parse error, invalid URL) keeps the last
  good snapshot, is counted and is logged once per failing streak. Reloading therefore never
  drops traffic: replicas leave only because a good file no longer lists them, and even then the
  pool drains them (in-flight requests finish).
- A snapshot is pushed only when the set of replicas changes.
- Files should be replaced atomically (rename, as Kubernetes ConfigMap volumes do). An in-place
  rewrite that is read half-written is corrected at the next poll; meanwhile the missing replicas
  are merely draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from gateway.discovery.base import (
    DiscoveredReplica,
    DiscoveryErrors,
    MembershipSink,
    format_hostport,
)

__all__ = ["FileWatch", "StaticDiscovery", "read_url_file", "replicas_from_urls"]

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def replicas_from_urls(urls: Iterable[str]) -> tuple[DiscoveredReplica, ...]:
    """Validate base URLs and turn them into replicas named "host:port".

    Raises ValueError naming the offending URL. Exact duplicates collapse; two different URLs
    for the same host:port are rejected because the name must identify one replica.
    """
    by_name: dict[str, DiscoveredReplica] = {}
    for raw in urls:
        url = raw.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"replica URL {raw!r}: expected http(s)://host[:port][/prefix]")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"replica URL {raw!r}: query, fragment and credentials not allowed")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ValueError(f"replica URL {raw!r}: {exc}") from exc
        name = format_hostport(parts.hostname, port)
        replica = DiscoveredReplica(name=name, url=url, ready=True)
        previous = by_name.setdefault(name, replica)
        if previous.url != url:
            raise ValueError(f"replica URLs {previous.url!r} and {url!r} are the same replica")
    return tuple(by_name.values())


def read_url_file(path: Path) -> list[str]:
    """One URL per line; blank lines and ``#`` comments are ignored."""
    urls = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            urls.append(text)
    return urls


class StaticDiscovery:
    """A fixed URL list, validated at construction."""

    def __init__(self, urls: Sequence[str], *, source: str = "static") -> None:
        self.source = source
        self._members = replicas_from_urls(urls)

    async def run(self, sink: MembershipSink) -> None:
        sink.set_members(self.source, self._members)
        await asyncio.get_running_loop().create_future()  # idle until cancelled


_Stamp = tuple[int, int, int, int]


class FileWatch:
    """Membership from a file, reloaded when it changes or when asked (SIGHUP)."""

    def __init__(
        self,
        path: Path,
        load: Callable[[], Sequence[str]] | None = None,
        *,
        poll_interval_s: float = 2.0,
        load_errors: tuple[type[Exception], ...] = (OSError, ValueError),
        source: str = "static",
    ) -> None:
        """``load_errors`` are the exceptions a failed reload may raise (add the config
        loader's error type); anything else is a bug and ends the task."""
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        self.source = source
        self.errors = DiscoveryErrors(source, logger)
        self._path = path
        self._load: Callable[[], Sequence[str]] = load or (lambda: read_url_file(path))
        self._poll_interval_s = poll_interval_s
        self._load_errors: tuple[type[Exception], ...] = (*load_errors, OSError, ValueError)
        self._reload_requested = asyncio.Event()
        self._stamp: _Stamp | None = None
        self._members: tuple[DiscoveredReplica, ...] | None = None

    def request_reload(self) -> None:
        """Reload at once even if the file looks unchanged. Call from the event loop thread
        (``loop.add_signal_handler(signal.SIGHUP, watch.request_reload)`` is)."""
        self._reload_requested.set()

    async def run(self, sink: MembershipSink) -> None:
        self._stamp = await self._stat()
        self._members = await self._load_members()
        sink.set_members(self.source, self._members)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_requested.wait(), self._poll_interval_s)
            forced = self._reload_requested.is_set()
            self._reload_requested.clear()
            stamp = await self._stat()
            if stamp == self._stamp and not forced:
                continue
            self._stamp = stamp
            await self._reload(sink)

    async def _reload(self, sink: MembershipSink) -> None:
        try:
            members = await self._load_members()
        except self._load_errors as exc:
            self.errors.failure("load", f"{self._path}: {exc}")
            return
        self.errors.success()
        if members != self._members:
            logger.info("discovery %s: %d replicas from %s", self.source, len(members), self._path)
            self._members = members
            sink.set_members(self.source, members)

    async def _load_members(self) -> tuple[DiscoveredReplica, ...]:
        urls = await asyncio.to_thread(self._load)
        return replicas_from_urls(urls)

    async def _stat(self) -> _Stamp | None:
        try:
            st = await asyncio.to_thread(os.stat, self._path)
        except OSError:
            return None  # missing right now; the reload attempt reports it
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
