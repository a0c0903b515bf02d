"""The proxies the benchmark compares, each started afresh on the proxy core per repetition.

- ``direct``: no proxy; the load goes to the four replica ports (round-robin per connection).
- ``kvgate``: ``python -m gateway serve`` with the real configuration: static replicas, policy
  p2c, scraper at its default 4 Hz, admin port with /metrics, access log on (to a file).
  Ready when its /v1/models lists the model, /readyz answers 200 and /metrics reports every
  replica ready.
- ``nginx``: Debian's nginx with ``benchmarks.proxy.nginx``'s config (one worker).
- ``aiohttp-baseline``: the issue's "straightforward aiohttp + uvloop proxy"
  (``benchmarks.proxy.baseline``), to calibrate this machine against the issue's figures.
- ``python-floor``: ``benchmarks.proxy.floor``, a transport-level relay prototype: the cost of
  the design PROFILE.md recommends, as a number.
- ``sglang-router`` and ``vllm-router`` (a fork of it): the Rust routers from PyPI, each installed
  on first use into its own virtualenv under ``~/.cache/kvgate`` (skipped with a note if that
  fails), policy ``power_of_two``, all their threads pinned to the proxy core.

A target's ``pid`` is the process whose tree is accounted (nginx: the master, with its worker).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from benchmarks.proxy import nginx
from benchmarks.proxy.upstream import MODEL

PROXY_CPU = 0
READY_TIMEOUT_S = 60.0
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvgate"


class Host(Protocol):
    """What a target needs from the running benchmark (``run.Bench``)."""

    workdir: Path
    upstream_ports: list[int]
    notes: list[str]

    def preexec(self, cpu: int) -> Callable[[], None]: ...


@dataclass
class Started:
    name: str
    ports: list[int]
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout_s: float = 1.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body: bytes = resp.read()
            return body if resp.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def _wait_ready(started: Started, check: Callable[[], bool]) -> Started:
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert started.proc is not None
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            break
        if check():
            return started
        time.sleep(0.1)
    started.stop()
    tail = started.log_path.read_text()[-3000:] if started.log_path else ""
    raise RuntimeError(f"{started.name} did not become ready:\n{tail}")


def _spawn(host: Host, name: str, cmd: list[str], ports: list[int]) -> Started:
    log_path = host.workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=host.preexec(PROXY_CPU),
        )
    return Started(name, ports, proc.pid, proc, log_path)


def _replica_urls(host: Host) -> list[str]:
    return [f"http://127.0.0.1:{p}" for p in host.upstream_ports]


def start_direct(host: Host, rep: int) -> Started:
    return Started("direct", list(host.upstream_ports))


def start_kvgate(host: Host, rep: int) -> Started:
    port, admin = free_port(), free_port()
    urls = "".join(f"    - {u}\n" for u in _replica_urls(host))
    config = host.workdir / f"kvgate-{rep}.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"replicas:\n  discovery: static\n  urls:\n{urls}"
        "policy: {name: p2c}\n"
        "scraper: {interval_s: 0.25, timeout_s: 0.2}\n"
        "logging: {level: INFO, access_log: true}\n"
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    started = _spawn(host, "kvgate", cmd, [port])
    ready_line = re.compile(rb'^kvgate_replica_state\{[^}]*state="ready"[^}]*\} 1(\.0)?$', re.M)

    def ready() -> bool:
        models = _get(f"http://127.0.0.1:{port}/v1/models")
        if models is None or MODEL.encode() not in models:
            return False
        if _get(f"http://127.0.0.1:{admin}/readyz") is None:
            return False
        # Every replica routable (when the exporter publishes replica states).
        page = _get(f"http://127.0.0.1:{admin}/metrics") or b""
        if b"kvgate_replica_state{" not in page:
            return True
        return len(ready_line.findall(page)) == len(host.upstream_ports)

    return _wait_ready(started, ready)


def start_nginx(host: Host, rep: int) -> Started:
    binary = nginx.nginx_binary()
    assert binary is not None
    port = free_port()
    prefix = host.workdir / f"nginx-{rep}"
    conf = nginx.write_config(prefix, port=port, replica_ports=host.upstream_ports)
    started = _spawn(host, "nginx", nginx.command(binary, prefix, conf), [port])
    return _wait_ready(started, lambda: _get(f"http://127.0.0.1:{port}/v1/models") is not None)


def start_baseline(host: Host, rep: int) -> Started:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.proxy.baseline", "--port", str(port)]
    for url in _replica_urls(host):
        cmd += ["--replica", url]
    started = _spawn(host, "aiohttp-baseline", cmd, [port])
    return _wait_ready(started, lambda: _get(f"http://127.0.0.1:{port}/v1/models") is not None)


def start_floor(host: Host, rep: int) -> Started:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.proxy.floor", "--port", str(port)]
    for p in host.upstream_ports:
        cmd += ["--replica", f"127.0.0.1:{p}"]
    started = _spawn(host, "python-floor", cmd, [port])
    return _wait_ready(started, lambda: _get(f"http://127.0.0.1:{port}/v1/models") is not None)


@dataclass(frozen=True)
class RustRouter:
    """A router from PyPI, run from its own virtualenv under ``~/.cache/kvgate``."""

    name: str  # the PyPI package, the target and the virtualenv's directory
    module: str  # its launcher, run with ``python -m``

    @property
    def venv(self) -> Path:
        return CACHE / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def install(self, host: Host) -> bool:
        if self.python.exists():
            return True
        try:
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
            pip = [str(self.python), "-m", "pip", "install", "--quiet", self.name]
            subprocess.run(pip, check=True, timeout=900, capture_output=True)
            return True
        except (OSError, subprocess.SubprocessError) as exc:
            host.notes.append(f"{self.name} skipped: pip install failed ({exc})")
            return False

    def start(self, host: Host, rep: int) -> Started:
        # vllm-router is a fork of sglang-router: the same flags.
        port, prom = free_port(), free_port()
        cmd = [str(self.python), "-m", self.module]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--policy", "power_of_two"]
        cmd += ["--worker-urls", *_replica_urls(host), "--log-level", "error"]
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom)]
        started = _spawn(host, self.name, cmd, [port])
        return _wait_ready(started, lambda: _get(f"http://127.0.0.1:{port}/v1/models") is not None)


SGLANG_ROUTER = RustRouter("sglang-router", "sglang_router.launch_router")
VLLM_ROUTER = RustRouter("vllm-router", "vllm_router.launch_router")


@dataclass(frozen=True)
class Target:
    start: Callable[[Host, int], Started]
    available: Callable[[Host], bool]


def _nginx_available(host: Host) -> bool:
    if nginx.nginx_binary() is None:
        host.notes.append("nginx skipped: not installed (make bench-proxy installs it)")
        return False
    return True


TARGETS: dict[str, Target] = {
    "direct": Target(start_direct, lambda host: True),
    "kvgate": Target(start_kvgate, lambda host: True),
    "nginx": Target(start_nginx, _nginx_available),
    "aiohttp-baseline": Target(start_baseline, lambda host: True),
    "python-floor": Target(start_floor, lambda host: True),
    "sglang-router": Target(SGLANG_ROUTER.start, SGLANG_ROUTER.install),
    "vllm-router": Target(VLLM_ROUTER.start, VLLM_ROUTER.install),
}


def start_target(name: str, host: Host, rep: int) -> Started:
    return TARGETS[name].start(host, rep)
