"""Who may use the gateway: client API keys, per-key priority and concurrency, and the
credential the gateway itself presents to replicas.

Client keys (``auth`` in the config; off when absent) come from one of:

* ``auth.keys_file``: a YAML document ``keys: [{name, key, priority?, max_concurrency?}, ...]``;
* ``auth.keys_dir``: a directory of key files, e.g. a mounted Kubernetes Secret. Each regular
  file whose name does not start with ``.`` is one key; the file name is the key's name. The
  first non-blank line of the file is the key itself; later lines may set ``priority: <class>``
  and ``max_concurrency: <n>``. (Kubernetes' ``..data`` links and timestamped directories are
  skipped by the dot rule.)

Clients send ``Authorization: Bearer <key>``. A key may carry a priority class (one of
``buffer.priority_classes``; it replaces the priority header, which is ignored while auth is
on, so a client cannot promote itself) and a concurrency limit (requests of that key in flight
at once, streams included; beyond it 429 ``rate_limit_exceeded``).

Invariants:

* Keys are never logged, stored in a log record, echoed in an error or kept in plain form after
  loading: the store holds HMAC-SHA256 digests under a random per-process secret. A presented
  key is hashed the same way and looked up in a dict (a keyed-hash lookup). A byte-by-byte
  comparison of the key itself never happens; the dict's hashing and equality run on digests
  an attacker cannot compute without the secret, so their timing leaks nothing about any key,
  and the cost does not depend on how many keys exist.
* Reload without restart: the source's files are stat-ed at most every ``reload_interval_s``,
  on the request path (a few ``stat`` calls, no task to own); a change re-reads them. A source
  that fails to load keeps the previous keys (logged once per failing version); at startup it
  is a ``ConfigError``. An empty source on reload is honoured: it revokes every key.
* A per-key concurrency slot is taken before the handler runs and released in ``finally``,
  whatever ends the request (client disconnect and shutdown cancellation included).
* Upstream: the client's ``Authorization`` is dropped before forwarding unless
  ``upstream.forward_client_auth``; ``upstream.api_key_file`` (re-read when it changes) adds
  the gateway's own ``Authorization: Bearer`` for replicas that require one.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import msgspec.yaml

from gateway.errors import ConfigError, GatewayError

logger = logging.getLogger(__name__)

_MAX_FILE_BYTES = 16 * 1024 * 1024  # a keys file of 100,000 keys is ~10 MB
_MAX_KEYS = 100_000


class InvalidApiKey(GatewayError):
    status, code = 401, "invalid_api_key"


class KeyConcurrencyExceeded(GatewayError):
    """The key already has ``max_concurrency`` requests in flight."""

    status, code, retry_after_s = 429, "rate_limit_exceeded", 1


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What the gateway knows about a client key once it matched (never the key itself)."""

    name: str
    priority: int | None = None  # the value of the key's priority class, if it has one
    max_concurrency: int | None = None


class _FileEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    key: str
    priority: str | None = None
    max_concurrency: int | None = None


class _KeysFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    keys: list[_FileEntry] = []


Signature = tuple[tuple[str, int, int, int], ...]


class KeyStore:
    """The client keys of one source, reloaded when its files change."""

    def __init__(
        self,
        *,
        keys_file: Path | None = None,
        keys_dir: Path | None = None,
        priority_classes: Mapping[str, int],
        reload_interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        if (keys_file is None) == (keys_dir is None):
            raise ValueError("exactly one of keys_file and keys_dir")
        self._file = keys_file
        self._dir = keys_dir
        self._classes = dict(priority_classes)
        self._interval = reload_interval_s
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._keys: dict[bytes, ApiKey] = {}
        self._inflight: dict[str, int] = {}
        self._signature: Signature = ()
        self._failed_signature: Signature | None = None
        self._next_check = 0.0
        self.reloads = 0
        self.reload_errors = 0
        try:
            self._load(self._stat())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth: {exc}") from exc
        if not self._keys:
            raise ConfigError(f"auth: {self._source()} holds no keys")
        self._next_check = clock() + reload_interval_s

    # -- authentication --------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization`` header value presents; ``InvalidApiKey`` otherwise."""
        self.maybe_reload()
        if authorization is None:
            raise InvalidApiKey("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidApiKey("the Authorization header must be 'Bearer <key>'")
        key = self._keys.get(self._digest(token))
        if key is None:
            raise InvalidApiKey("invalid API key")
        return key

    def acquire(self, key: ApiKey) -> None:
        """Take one of the key's concurrency slots (429 when none is free)."""
        n = self._inflight.get(key.name, 0)
        if key.max_concurrency is not None and n >= key.max_concurrency:
            raise KeyConcurrencyExceeded(
                f"API key {key.name!r} already has {n} requests in flight "
                f"(its limit is {key.max_concurrency})"
            )
        self._inflight[key.name] = n + 1

    def release(self, key: ApiKey) -> None:
        n = self._inflight[key.name] - 1
        if n:
            self._inflight[key.name] = n
        else:
            del self._inflight[key.name]

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._secret, token.encode("utf-8", "surrogateescape"), "sha256").digest()

    # -- loading ---------------------------------------------------------------------------

    def maybe_reload(self) -> None:
        """Re-read the source if ``reload_interval_s`` passed and its files changed."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval
        try:
            signature = self._stat()
        except OSError as exc:
            self._reload_failed(None, str(exc))
            return
        if signature == self._signature or signature == self._failed_signature:
            return
        try:
            self._load(signature)
        except (OSError, ValueError) as exc:
            self._reload_failed(signature, str(exc))
            return
        self._failed_signature = None
        self.reloads += 1
        if self._keys:
            logger.info("auth: reloaded %d API keys from %s", len(self._keys), self._source())
        else:
            logger.warning("auth: %s now holds no keys: every request is refused", self._source())

    def _reload_failed(self, signature: Signature | None, why: str) -> None:
        self.reload_errors += 1
        if signature is None or signature != self._failed_signature:
            logger.error(
                "auth: cannot reload %s, keeping the previous keys: %s", self._source(), why
            )
        self._failed_signature = signature

    def _source(self) -> str:
        return str(self._file if self._file is not None else self._dir)

    def _paths(self) -> list[Path]:
        if self._file is not None:
            return [self._file]
        assert self._dir is not None
        return sorted(p for p in self._dir.iterdir() if not p.name.startswith(".") and p.is_file())

    def _stat(self) -> Signature:
        out = []
        for p in self._paths():
            st = p.stat()  # follows the Secret volume's symlinks to the current version
            out.append((p.name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self, signature: Signature) -> None:
        entries = _read_file(self._file) if self._file is not None else _read_dir(self._paths())
        if len(entries) > _MAX_KEYS:
            raise ValueError(f"more than {_MAX_KEYS} keys")
        keys: dict[bytes, ApiKey] = {}
        names: set[str] = set()
        for e in entries:
            if not e.name or e.name != e.name.strip():
                raise ValueError(f"key name {e.name!r} must be non-empty without outer blanks")
            if e.name in names:
                raise ValueError(f"key name {e.name!r} appears twice")
            token = e.key.strip()
            if len(token) < 8 or any(c.isspace() for c in token):
                raise ValueError(f"key {e.name!r}: a key must be >= 8 characters, no whitespace")
            if e.max_concurrency is not None and e.max_concurrency < 1:
                raise ValueError(f"key {e.name!r}: max_concurrency must be >= 1")
            priority = None
            if e.priority is not None:
                priority = self._classes.get(e.priority.strip().lower())
                if priority is None:
                    known = ", ".join(sorted(self._classes))
                    raise ValueError(
                        f"key {e.name!r}: unknown priority class {e.priority!r} (known: {known})"
                    )
            digest = self._digest(token)
            if digest in keys:
                raise ValueError(f"keys {keys[digest].name!r} and {e.name!r} are the same key")
            names.add(e.name)
            keys[digest] = ApiKey(e.name, priority, e.max_concurrency)
        self._keys = keys
        self._signature = signature


def _read_file(path: Path) -> list[_FileEntry]:
    data = _read_bytes(path)
    try:
        doc = msgspec.yaml.decode(data, type=_KeysFile) if data.strip() else _KeysFile()
    except msgspec.DecodeError as exc:
        # msgspec's message names the path of the bad value, never the value itself.
        raise ValueError(f"{path}: {exc}") from None
    return doc.keys


def _read_dir(paths: list[Path]) -> list[_FileEntry]:
    return [_parse_key_file(p.name, _read_bytes(p)) for p in paths]


def _parse_key_file(name: str, data: bytes) -> _FileEntry:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"key file {name!r} is not UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"key file {name!r} is empty")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        field, sep, value = line.partition(":")
        field = field.strip()
        if not sep or field not in ("priority", "max_concurrency") or field in fields:
            raise ValueError(
                f"key file {name!r}: after the key, only 'priority: <class>' and "
                "'max_concurrency: <n>' lines are allowed, once each"
            )
        fields[field] = value.strip()
    limit = fields.get("max_concurrency")
    if limit is not None and not limit.isdigit():
        raise ValueError(f"key file {name!r}: max_concurrency must be an integer")
    return _FileEntry(
        name=name,
        key=lines[0],
        priority=fields.get("priority"),
        max_concurrency=None if limit is None else int(limit),
    )


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_FILE_BYTES} bytes")
    return data


class UpstreamCredentials:
    """``upstream.forward_client_auth`` and the token of ``upstream.api_key_file``, as the proxy
    (``upstream.request_fields``) and the catalog's own calls to replicas read them."""

    def __init__(
        self,
        *,
        forward_client_auth: bool,
        api_key_file: Path | None,
        clock: Callable[[], float],
        reload_interval_s: float = 5.0,
    ) -> None:
        self._forward = forward_client_auth
        self._file = api_key_file
        self._clock = clock
        self._interval = reload_interval_s
        self._token: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        if api_key_file is not None:
            try:
                self._read()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"upstream.api_key_file: {exc}") from exc
            self._next_check = clock() + reload_interval_s

    @property
    def forward_client_auth(self) -> bool:
        return self._forward

    def authorization(self) -> str | None:
        """The ``Authorization`` value the gateway presents to replicas (``Bearer <token>``
        from ``api_key_file``, re-read when due), or None when none is configured."""
        if self._file is None:
            return None
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._interval
            try:
                self._read()
            except (OSError, ValueError) as exc:
                logger.error("upstream.api_key_file: cannot reload, keeping the last: %s", exc)
        return f"Bearer {self._token}"

    def _read(self) -> None:
        assert self._file is not None
        st = os.stat(self._file)
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        token = _read_bytes(self._file).decode("utf-8").strip()
        if not token or any(c.isspace() or ord(c) < 32 for c in token):
            raise ValueError(f"{self._file}: must hold one token, no whitespace")
        self._token, self._stamp = token, stamp
