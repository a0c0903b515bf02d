"""Static discovery: URL validation, the fixed list, and the file watch (poll + SIGHUP)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.discovery import (
    DiscoveredReplica,
    FileWatch,
    StaticDiscovery,
    read_url_file,
    replicas_from_urls,
)
from tests.gateway.discovery.recording_sink import RecordingSink, eventually, names


@pytest.mark.parametrize(
    ("url", "name", "base"),
    [
        ("http://10.0.0.5:8000", "10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("http://10.0.0.5:8000/", "10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("https://vllm.example", "vllm.example:443", "https://vllm.example"),
        ("http://vllm.example", "vllm.example:80", "http://vllm.example"),
        ("http://[fd00::5]:8000", "[fd00::5]:8000", "http://[fd00::5]:8000"),
        ("http://10.0.0.5:8000/prefix/", "10.0.0.5:8000", "http://10.0.0.5:8000/prefix"),
    ],
    ids=["ipv4", "trailing-slash", "https-default-port", "http-default-port", "ipv6", "prefix"],
)
def test_replica_names_and_urls(url: str, name: str, base: str) -> None:
    assert replicas_from_urls([url]) == (DiscoveredReplica(name=name, url=base, ready=True),)


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        (["10.0.0.5:8000"], "expected http"),
        (["ftp://10.0.0.5"], "expected http"),
        (["http://10.0.0.5:99999"], "out of range"),
        (["http://10.0.0.5:8000?x=1"], "query"),
        (["http://user:pw@10.0.0.5"], "credentials"),
        (["http://10.0.0.5:80", "http://10.0.0.5"], "same replica"),
    ],
    ids=["no-scheme", "ftp", "bad-port", "query", "credentials", "same-hostport"],
)
def test_invalid_urls_are_rejected(urls: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replicas_from_urls(urls)


def test_exact_duplicates_collapse() -> None:
    assert len(replicas_from_urls(["http://a:1", "http://a:1/"])) == 1


def test_url_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("# replicas\nhttp://a:1\n\n  http://b:2  # second\n")
    assert read_url_file(path) == ["http://a:1", "http://b:2"]


@asynccontextmanager
async def running(
    discovery: StaticDiscovery | FileWatch, sink: RecordingSink
) -> AsyncIterator[None]:
    task = asyncio.create_task(discovery.run(sink))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_static_pushes_one_snapshot_and_idles() -> None:
    sink = RecordingSink()
    discovery = StaticDiscovery(["http://a:1", "http://b:2"])
    async with running(discovery, sink):
        snapshot = await sink.wait_count(1)
        assert names(snapshot) == {"a:1", "b:2"}
        assert all(r.ready and not r.terminating for r in snapshot)
    assert len(sink.snapshots) == 1 and sink.snapshots[0][0] == "static"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_file_change_is_picked_up_by_polling(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("http://a:1\nhttp://b:2\n")
    sink = RecordingSink()
    async with running(FileWatch(path, poll_interval_s=0.01), sink):
        assert names(await sink.wait_count(1)) == {"a:1", "b:2"}
        write_atomically(path, "http://b:2\nhttp://c:3\n")
        assert names(await sink.wait_count(2)) == {"b:2", "c:3"}


async def test_bad_reload_keeps_last_good_members(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("http://a:1\n")
    sink = RecordingSink()
    watch = FileWatch(path, poll_interval_s=0.01)
    async with running(watch, sink):
        await sink.wait_count(1)
        write_atomically(path, "not a url\n")
        await eventually(lambda: watch.errors.failing)
        path.unlink()  # a missing file is a failed reload too, never "zero replicas"
        await eventually(lambda: watch.errors.errors_total["load"] >= 2)
        assert len(sink.snapshots) == 1
        write_atomically(path, "http://a:1\nhttp://d:4\n")
        assert names(await sink.wait_count(2)) == {"a:1", "d:4"}
        assert not watch.errors.failing


async def test_unchanged_content_pushes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("http://a:1\n")
    sink = RecordingSink()
    loads = 0

    def load() -> Sequence[str]:
        nonlocal loads
        loads += 1
        return read_url_file(path)

    async with running(FileWatch(path, load, poll_interval_s=0.01), sink):
        await sink.wait_count(1)
        write_atomically(path, "# same replica, new comment\nhttp://a:1\n")
        await eventually(lambda: loads >= 2)
    assert len(sink.snapshots) == 1


async def test_first_load_error_propagates(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("nonsense\n")
    with pytest.raises(ValueError, match="nonsense"):
        await FileWatch(path).run(RecordingSink())


async def test_sighup_reloads_through_the_config_loader(tmp_path: Path) -> None:
    # The gateway config loader plugs in as `load`; the file itself does not change, so only
    # the signal can trigger the reload (the poll interval is far beyond the test's timeout).
    path = tmp_path / "gateway.yaml"
    path.write_text("replicas: ...\n")
    current = ["http://a:1"]
    load: Callable[[], Sequence[str]] = lambda: list(current)  # noqa: E731
    watch = FileWatch(path, load, poll_interval_s=3600)
    sink = RecordingSink()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, watch.request_reload)
    try:
        async with running(watch, sink):
            await sink.wait_count(1)
            current.append("http://b:2")
            os.kill(os.getpid(), signal.SIGHUP)
            assert names(await sink.wait_count(2)) == {"a:1", "b:2"}
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
