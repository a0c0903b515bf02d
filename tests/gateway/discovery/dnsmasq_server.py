"""A real dnsmasq on 127.0.0.1 for DNS discovery tests: hosts-file records, SIGHUP reloads.

dnsmasq answers names under ``svc.test`` only from the hosts file (``--local``), so an unknown
name there is NXDOMAIN, a name with only A records is no-data for AAAA, and any other name is
REFUSED (no upstream servers): the three answers discovery must tell apart.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

DOMAIN = "svc.test"


def find_dnsmasq() -> str | None:
    return shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    # dnsmasq needs the port free for both UDP and TCP; a free UDP port may be busy on TCP.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


class Dnsmasq:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.hosts_file = workdir / "hosts"
        self.port = 0
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    def write_hosts(self, records: Mapping[str, Sequence[str]]) -> None:
        """name -> addresses (IPv4 and IPv6), replacing the whole file atomically."""
        lines = [f"{addr} {name}" for name, addrs in records.items() for addr in addrs]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.hosts_file)

    def reload(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)  # dnsmasq re-reads --addn-hosts files on SIGHUP

    async def start(self, port: int | None = None) -> None:
        """Start on ``port`` (a fresh free port if None); returns once it serves queries."""
        for _ in range(3):  # the free port can be taken between probing and binding
            self.port = port or _free_port()
            if await self._spawn():
                return
            if port is not None:
                break
        raise RuntimeError("dnsmasq did not start:\n" + "\n".join(self.log[-20:]))

    async def _spawn(self) -> bool:
        args = [
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts_file}",
            f"--local=/{DOMAIN}/",
            "--pid-file=",
        ]
        if os.geteuid() == 0:
            # Otherwise dnsmasq drops to "nobody", who cannot read pytest's 0700 tmp dirs.
            user = pwd.getpwuid(0).pw_name
            args += [f"--user={user}", "--group=root"]
        self._proc = await asyncio.create_subprocess_exec(
            self.binary, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        started = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_log(started))
        try:
            async with asyncio.timeout(5):
                ok: bool = await started
        except TimeoutError:
            ok = False
        if not ok:
            await self.stop()
        return ok

    async def _read_log(self, started: asyncio.Future[bool]) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        # Draining stderr for the whole run also keeps dnsmasq from blocking on a full pipe.
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            # dnsmasq logs "started" after its sockets are bound.
            if "started, version" in line and not started.done():
                started.set_result(True)
        if not started.done():
            started.set_result(False)

    async def stop(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as a crashed DNS server does."""
        if self._proc is not None:
            if self._proc.returncode is None:
                self._proc.kill()
            await self._proc.wait()
            self._proc = None
        if self._drain is not None:
            await self._drain
            self._drain = None
