"""A real etcd + kube-apiserver on loopback, for the optional real-API-server tests.

Binaries: etcd from Debian's ``etcd-server``; kube-apiserver built from Debian's ``kubernetes``
source package by ``make kube-apiserver`` (mk/kube.mk). Found through $KVGATE_KUBE_APISERVER /
$KVGATE_ETCD, then $PATH, then the mk/kube.mk cache directory.

The API server authenticates one static token with system:masters, generates its own serving
certificate, and has the EndpointSliceTerminatingCondition gate on so ``serving`` and
``terminating`` survive a write (alpha and off by default in 1.20).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import IO, Any

import aiohttp

TOKEN = "kvgate-test-token"
KUBE_GIT_VERSION = "v1.20.2"  # what mk/kube.mk builds (its cache directory name)
SLICES = "/apis/discovery.k8s.io/v1beta1/namespaces/default/endpointslices"


def endpoint(ip: str, pod: str, ready: bool, terminating: bool = False) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
    }


def slice_body(name: str, endpoints: list[dict[str, Any]], service: str = "vllm") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1beta1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": 8000, "protocol": "TCP"},
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
        ],
    }


def find_kube_apiserver() -> str | None:
    if env := os.environ.get("KVGATE_KUBE_APISERVER"):
        return env if os.access(env, os.X_OK) else None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cached = cache / "kvgate" / f"kube-{KUBE_GIT_VERSION}" / "bin" / "kube-apiserver"
    return shutil.which("kube-apiserver") or (str(cached) if os.access(cached, os.X_OK) else None)


def find_etcd() -> str | None:
    if env := os.environ.get("KVGATE_ETCD"):
        return env if os.access(env, os.X_OK) else None
    return shutil.which("etcd")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class KubeCluster:
    """etcd + kube-apiserver processes; the API server can be restarted on the same port."""

    namespace = "default"

    def __init__(self, workdir: Path, apiserver: str, etcd: str) -> None:
        self.workdir = workdir
        self._apiserver_bin = apiserver
        self._etcd_bin = etcd
        self._client_port, self._peer_port, self._secure_port = _free_ports(3)
        self.url = f"https://127.0.0.1:{self._secure_port}"
        self.ca_file = workdir / "certs" / "apiserver.crt"  # self-signed, written at first start
        self._etcd: asyncio.subprocess.Process | None = None
        self._api: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._logs: list[IO[bytes]] = []

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: c, cluster: {{server: '{self.url}',"
            f" certificate-authority: '{self.ca_file}'}}}}]\n"
            f"users: [{{name: u, user: {{token: {TOKEN}}}}}]\n"
            "contexts: [{name: test, context: {cluster: c, user: u,"
            f" namespace: {self.namespace}}}}}]\n"
        )
        return path

    def client(self) -> aiohttp.ClientSession:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return aiohttp.ClientSession(
            base_url=self.url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            connector=aiohttp.TCPConnector(ssl=context, force_close=True),
        )

    async def request(
        self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> Any:
        async with session.request(method, path, json=body) as resp:
            data = await resp.json()
            if resp.status >= 300:
                raise AssertionError(f"{method} {path}: {resp.status} {data}")
            return data

    async def start(self) -> None:
        (self.workdir / "certs").mkdir()
        (self.workdir / "tokens.csv").write_text(f'{TOKEN},kvgate-admin,1,"system:masters"\n')
        keygen = await asyncio.create_subprocess_exec(
            "openssl", "genrsa", "-out", str(self.workdir / "sa.key"), "2048",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert await keygen.wait() == 0, "openssl genrsa failed"
        self._etcd = await asyncio.create_subprocess_exec(
            self._etcd_bin,
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{self._client_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self._client_port}",
            f"--listen-peer-urls=http://127.0.0.1:{self._peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self._peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{self._peer_port}",
            stdout=self._log("etcd.log"),
            stderr=subprocess.STDOUT,
        )
        await self._start_apiserver()

    async def _start_apiserver(self) -> None:
        log = self.workdir / f"apiserver-{self.restarts}.log"
        self._api = await asyncio.create_subprocess_exec(
            self._apiserver_bin,
            f"--etcd-servers=http://127.0.0.1:{self._client_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self._secure_port}",
            "--insecure-port=0",
            f"--cert-dir={self.workdir / 'certs'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.workdir / 'sa.key'}",
            f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--feature-gates=EndpointSliceTerminatingCondition=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            stdout=self._log(log.name),
            stderr=subprocess.STDOUT,
        )
        await self._wait_ready(self._api, log)

    async def restart_apiserver(self) -> None:
        """Stop and start the API server (same port, same certificates, same etcd): open
        watches break, and its fresh watch cache no longer covers older resourceVersions."""
        assert self._api is not None
        await _terminate(self._api)
        self.restarts += 1
        await self._start_apiserver()

    async def stop(self) -> None:
        for proc in (self._api, self._etcd):
            if proc is not None:
                await _terminate(proc)
        for log in self._logs:
            log.close()

    def _log(self, name: str) -> IO[bytes]:
        log = (self.workdir / name).open("wb")
        self._logs.append(log)
        return log

    async def _wait_ready(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        """Until /readyz answers 200 and the default namespace exists (bounded: 60 s)."""
        async with asyncio.timeout(60):
            while True:
                if proc.returncode is not None:
                    tail = (await asyncio.to_thread(log.read_text))[-3000:]
                    raise RuntimeError(f"kube-apiserver exited:\n{tail}")
                if self.ca_file.exists():
                    with suppress(aiohttp.ClientError, ssl.SSLError, OSError):
                        async with self.client() as session:
                            async with session.get("/readyz") as resp:
                                ready = resp.status == 200
                            async with session.get("/api/v1/namespaces/default") as resp:
                                if ready and resp.status == 200:
                                    return
                # An external process's startup has no event to wait on.
                await asyncio.sleep(0.2)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def kube_cluster(workdir: Path, apiserver: str, etcd: str) -> AsyncIterator[KubeCluster]:
    cluster = KubeCluster(workdir, apiserver, etcd)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
