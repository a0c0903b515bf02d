"""How to reach and authenticate to a Kubernetes API server: in-cluster or from a kubeconfig.

In-cluster: the pod's service account (token, CA bundle and namespace under
/var/run/secrets/kubernetes.io/serviceaccount) and KUBERNETES_SERVICE_HOST/PORT.

Kubeconfig (local use): the selected context's cluster (server, CA file or data, or
insecure-skip-tls-verify, tls-server-name) and user (token, tokenFile, or client certificate
and key, as files or data). Relative paths are relative to the kubeconfig file, as kubectl
resolves them. Exec plugins, auth-providers and basic auth are rejected with a clear error
rather than half-supported: kvgate runs no external programs to get credentials.

Invariants:
- Token files are re-read for every request: projected service-account tokens rotate (the
  kubelet rewrites the file), and a cached token would start failing with 401 after an hour.
- Secrets never reach a log line or an exception message.
- Everything here is startup-time, blocking file I/O except ``auth_headers()``, which reads the
  token file off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec
import yaml

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "KubeConfigError",
    "KubeCredentials",
    "in_cluster_credentials",
    "kubeconfig_credentials",
]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(ValueError):
    """Credentials cannot be built; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class KubeCredentials:
    server: str
    """Base URL of the API server, no trailing slash."""
    ssl_context: ssl.SSLContext | None
    """None only for plain-http servers (kubectl proxy, tests)."""
    token: str | None = None
    token_file: Path | None = None
    namespace: str | None = None
    """The service account's or the context's namespace, if known."""
    server_hostname: str | None = None
    """TLS name to verify instead of the URL host (kubeconfig tls-server-name)."""

    async def auth_headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            try:
                token = (await asyncio.to_thread(self.token_file.read_text)).strip()
            except OSError as exc:
                raise KubeConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        return {"Authorization": f"Bearer {token}"} if token else {}


def in_cluster_credentials(
    sa_dir: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ
) -> KubeCredentials:
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "not running in a Kubernetes pod: KUBERNETES_SERVICE_HOST/PORT are unset"
        )
    if ":" in host:
        host = f"[{host}]"
    token_file = sa_dir / "token"
    if not token_file.is_file():
        raise KubeConfigError(f"service account token {token_file} is missing")
    try:
        context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"service account CA {sa_dir / 'ca.crt'}: {exc}") from exc
    namespace_file = sa_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else None
    return KubeCredentials(
        server=f"https://{host}:{port}",
        ssl_context=context,
        token_file=token_file,
        namespace=namespace or None,
    )


class _Kebab(msgspec.Struct, rename="kebab"):
    pass


class _Cluster(_Kebab):
    server: str
    certificate_authority: str | None = None
    certificate_authority_data: str | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None


class _User(_Kebab):
    token: str | None = None
    token_file: str | None = msgspec.field(name="tokenFile", default=None)
    client_certificate: str | None = None
    client_certificate_data: str | None = None
    client_key: str | None = None
    client_key_data: str | None = None
    exec: dict[str, object] | None = None
    auth_provider: dict[str, object] | None = None
    username: str | None = None


class _Context(_Kebab):
    cluster: str
    user: str = ""
    namespace: str | None = None


class _NamedCluster(_Kebab):
    name: str
    cluster: _Cluster


class _NamedUser(_Kebab):
    name: str
    user: _User = msgspec.field(default_factory=_User)


class _NamedContext(_Kebab):
    name: str
    context: _Context


class _KubeConfig(_Kebab):
    clusters: list[_NamedCluster] | None = None
    users: list[_NamedUser] | None = None
    contexts: list[_NamedContext] | None = None
    current_context: str = ""


def kubeconfig_credentials(path: Path, context: str | None = None) -> KubeCredentials:
    """Credentials of ``context`` (default: current-context) in the kubeconfig at ``path``."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = msgspec.convert(raw, type=_KubeConfig)
    except (OSError, yaml.YAMLError, msgspec.ValidationError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc}") from exc
    name = context or config.current_context
    ctx = _find(config.contexts, name, path, "context")
    cluster = _find(config.clusters, ctx.context.cluster, path, "cluster").cluster
    user = _find(config.users, ctx.context.user, path, "user").user if ctx.context.user else _User()
    if user.exec is not None or user.auth_provider is not None or user.username is not None:
        raise KubeConfigError(
            f"kubeconfig {path}: user {ctx.context.user!r} uses exec, auth-provider or basic"
            " auth, which kvgate does not support; use a token, tokenFile or client certificate"
        )
    base = path.parent
    server = cluster.server.rstrip("/")
    context_ssl = _ssl_context(cluster, user, base, path) if server.startswith("https:") else None
    return KubeCredentials(
        server=server,
        ssl_context=context_ssl,
        token=user.token,
        token_file=base / user.token_file if user.token_file else None,
        namespace=ctx.context.namespace,
        server_hostname=cluster.tls_server_name,
    )


_Named = TypeVar("_Named", _NamedCluster, _NamedUser, _NamedContext)


def _find(items: list[_Named] | None, name: str, path: Path, kind: str) -> _Named:
    for item in items or ():
        if item.name == name:
            return item
    raise KubeConfigError(f"kubeconfig {path}: no {kind} named {name!r}")


def _ssl_context(cluster: _Cluster, user: _User, base: Path, path: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context()
        if cluster.insecure_skip_tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif cluster.certificate_authority_data:
            context.load_verify_locations(cadata=_b64(cluster.certificate_authority_data, path))
        elif cluster.certificate_authority:
            context.load_verify_locations(cafile=str(base / cluster.certificate_authority))
        cert = _pem(user.client_certificate_data, user.client_certificate, base, path)
        key = _pem(user.client_key_data, user.client_key, base, path)
        if cert is not None:
            _load_client_cert(context, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: TLS setup failed: {exc}") from exc
    return context


def _pem(data: str | None, file: str | None, base: Path, path: Path) -> str | None:
    if data:
        return _b64(data, path)
    if file:
        return (base / file).read_text(encoding="ascii")
    return None


def _b64(data: str, path: Path) -> str:
    try:
        return base64.b64decode(data, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: a *-data field is not base64 PEM") from exc


def _load_client_cert(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    # load_cert_chain only reads files; stage the PEMs in a private directory just long enough.
    with tempfile.TemporaryDirectory(prefix="kvgate-kube-") as tmp:
        cert_file = Path(tmp, "client.crt")
        cert_file.write_text(cert, encoding="ascii")
        key_file = None
        if key is not None:
            key_file = Path(tmp, "client.key")
            key_file.touch(mode=0o600)
            key_file.write_text(key, encoding="ascii")
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
