"""The gateway's configuration: one YAML file decoded into frozen, typed structs.

Invariants:

* Every default lives here, in the struct definitions (``kvgate print-config`` shows them).
  Policy parameter defaults mirror the policy constructors; a test keeps the two equal.
* Unknown keys and invalid values are rejected at load time with the path of the offending value
  (``$.listen.port``) — nothing is silently clamped or ignored. ``load_config`` raises
  ``ConfigError``; the CLI turns it into exit status 2.
* Units are in the key names: ``_s`` seconds, ``_bytes`` bytes; ratios are 0..1.
* Environment overrides (for containers) are applied by ``load_config`` and nowhere else:
  ``KVGATE_LOG_LEVEL`` replaces ``logging.level``. (``KVGATE_CONFIG``, the file path, is read
  by the CLI.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.yaml
from yarl import URL

from gateway.errors import ConfigError
from policies.registry import make_policy

Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0 = any free port (tests)
PositiveBytes = Annotated[int, msgspec.Meta(ge=1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EngineName = Literal["auto", "vllm-v0", "vllm-v1", "nim", "sglang", "tgi", "trtllm"]


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ListenConfig(_Base, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 8080
    # A connection must deliver a complete request head within this time of connecting or of
    # its previous response, else it is closed (slow-loris headers; also the idle keep-alive
    # timeout, so keep it above the idle timeout of a load balancer in front).
    header_timeout_s: Seconds = 75.0
    # The whole request body must arrive within this time of the handler starting (408).
    body_timeout_s: Seconds = 60.0
    # Connections accepted by the kernel but not yet by the gateway (listen(2) backlog; the
    # kernel caps it at net.core.somaxconn). The usual 128 overflows under connection storms:
    # the clients then see resets and connect timeouts.
    backlog: PositiveInt = 2048


class AdminConfig(_Base, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 9090
    debug_endpoints: bool = True  # /debug/replicas


def replica_id(url: str) -> str:
    """A replica's stable id and metric label: ``host:port`` of its base URL."""
    u = URL(url)
    return f"{u.host}:{u.port}"


def _check_replica_url(url: str) -> None:
    u = URL(url)
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"replica url {url!r} must be http(s)://host[:port]")
    if u.query_string or u.fragment:
        raise ValueError(f"replica url {url!r} must not have a query or fragment")


class StaticReplicas(_Base, frozen=True, tag="static", tag_field="discovery"):
    """A fixed list of replica base URLs (``http://host:port``; the OpenAI API is under /v1).

    ``discovery`` is the tag that later membership sources (dns, kubernetes) extend.
    """

    urls: list[str] = []

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for url in self.urls:
            _check_replica_url(url)
            rid = replica_id(url)
            if rid in seen:
                raise ValueError(f"replica {rid} is listed twice")
            seen.add(rid)


class DnsReplicas(_Base, frozen=True, tag="dns", tag_field="discovery"):
    """Every A/AAAA record of ``name`` (a headless Service), re-resolved every ``interval_s``."""

    name: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    scheme: Literal["http", "https"] = "http"
    interval_s: Seconds = 5.0
    timeout_s: Seconds = 2.0


class KubernetesReplicas(_Base, frozen=True, tag="kubernetes", tag_field="discovery"):
    """The EndpointSlices of ``service``, watched through the API server.

    Credentials: the pod's service account, or ``kubeconfig`` (and ``context``) for local use.
    """

    service: str
    namespace: str | None = None  # default: the service account's (or context's) namespace
    port: int | str | None = None  # number or port name; None = the Service's only port
    scheme: Literal["http", "https"] = "http"
    kubeconfig: str | None = None
    context: str | None = None
    watch_timeout_s: Annotated[float, msgspec.Meta(ge=1)] = 300.0


ReplicasConfig = StaticReplicas | DnsReplicas | KubernetesReplicas


class ModelsConfig(_Base, frozen=True):
    # Used for a request without "model"; when unset, the single model the replicas serve (if
    # they serve exactly one) is used, otherwise such a request is a 400.
    default_model: str | None = None
    # Models known before any replica lists them (scale from zero): requests for them wait in
    # the buffer while no replica serves them, and their per-model metrics exist from the
    # start, at 0, so an autoscaler reads 0 rather than nothing while no replica runs.
    names: tuple[str, ...] = ()
    refresh_interval_s: Seconds = 5.0  # GET /v1/models on every replica
    refresh_timeout_s: Seconds = 2.0


# Routing policies: a tagged union on ``name``; fields are the policy's parameters with the
# policy constructor's defaults (kept equal by tests/gateway/test_config.py).


class _PolicyBase(_Base, frozen=True):
    def __post_init__(self) -> None:
        # The policy's own checks (cross-parameter rules) run at load time, reported at $.policy.
        make_policy(policy_name(self), policy_params(self))


class RoundRobinPolicy(_PolicyBase, frozen=True, tag="round_robin", tag_field="name"):
    pass


class RandomPolicy(_PolicyBase, frozen=True, tag="random", tag_field="name"):
    pass


class LeastRequestPolicy(_PolicyBase, frozen=True, tag="least_request", tag_field="name"):
    pass


class P2CKvPolicy(_PolicyBase, frozen=True, tag="p2c_kv", tag_field="name"):
    pass


class P2CPolicy(_PolicyBase, frozen=True, tag="p2c", tag_field="name"):
    staleness_correction: bool = True


class PrefixAffinityPolicy(_PolicyBase, frozen=True, tag="prefix_affinity", tag_field="name"):
    # Hashing (gateway side): the prompt is cut into blocks of block_chars characters, at most
    # max_blocks of them, so hashing cost is bounded whatever the prompt length.
    block_chars: PositiveInt = 256
    max_blocks: PositiveInt = 128
    # Policy parameters (policies/prefix_affinity.py documents them).
    capacity_blocks: PositiveInt = 2048
    balance_abs_threshold: NonNegativeInt = 16
    balance_rel_threshold: Annotated[float, msgspec.Meta(ge=1.0)] = 1.5
    min_match_blocks: PositiveInt = 1
    staleness_correction: bool = True


PolicyConfig = (
    RoundRobinPolicy
    | RandomPolicy
    | LeastRequestPolicy
    | P2CKvPolicy
    | P2CPolicy
    | PrefixAffinityPolicy
)
GATEWAY_SIDE_POLICY_FIELDS = frozenset({"block_chars", "max_blocks"})


def policy_name(policy: _PolicyBase) -> str:
    tag = policy.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def policy_params(policy: _PolicyBase) -> dict[str, object]:
    """The keyword arguments for ``policies.registry.make_policy``."""
    fields = msgspec.structs.asdict(policy)
    return {k: v for k, v in fields.items() if k not in GATEWAY_SIDE_POLICY_FIELDS}


class MetricNamesConfig(_Base, frozen=True):
    """Custom engine metric names, for engines whose names kvgate does not know."""

    queue_depth: str | None = None
    running: str | None = None
    kv_usage: str | None = None


class ScraperConfig(_Base, frozen=True):
    interval_s: Seconds = 0.25
    timeout_s: Seconds = 0.2
    # A scrape older than this is stale: routing falls back to the gateway's in-flight counts.
    max_metrics_age_s: Seconds = 1.0
    engine: EngineName = "auto"
    metrics_path: str | None = None  # default: the engine's own (/metrics; /v1/metrics for nim)
    metric_names: MetricNamesConfig | None = None

    def __post_init__(self) -> None:
        if self.timeout_s >= self.interval_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) must be < interval_s ({self.interval_s})"
            )
        if self.metrics_path is not None and not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path {self.metrics_path!r} must start with /")


class UpstreamConfig(_Base, frozen=True):
    connect_timeout_s: Seconds = 5.0
    # From sending the request to the first response byte (covers queueing and prefill); there
    # is deliberately no total timeout, which would kill long generations.
    first_byte_timeout_s: Seconds = 600.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    max_body_bytes: PositiveBytes = 16 * 1024 * 1024
    # A non-streaming response up to this size is held until complete, so an upstream failure
    # becomes a clean 502; a larger one is passed through as it arrives.
    max_buffered_response_bytes: PositiveBytes = 8 * 1024 * 1024
    # The client's Authorization header is dropped unless this is true; api_key_file (re-read
    # when it changes) holds a token sent to replicas as "Authorization: Bearer <token>".
    forward_client_auth: bool = False
    api_key_file: str | None = None
    # Serve the common request (body here, a replica free now with an idle connection) from
    # protocol callbacks instead of a task per request (gateway/exchange.py); false: all tasks.
    fast_path: bool = True


class AuthConfig(_Base, frozen=True):
    """Client API keys (``gateway/auth.py`` documents both formats); off when ``auth`` is null."""

    keys_file: str | None = None  # YAML: keys: [{name, key, priority, max_concurrency}]
    keys_dir: str | None = None  # one file per key, e.g. a mounted Kubernetes Secret
    reload_interval_s: Seconds = 2.0  # how often the files are checked for changes

    def __post_init__(self) -> None:
        if (self.keys_file is None) == (self.keys_dir is None):
            raise ValueError("set exactly one of keys_file and keys_dir")


class ShutdownConfig(_Base, frozen=True):
    # Time after SIGTERM during which /readyz fails but new requests are still served, so load
    # balancers notice before the listener closes (0 = close at once).
    delay_s: NonNegativeSeconds = 0.0
    drain_s: NonNegativeSeconds = 30.0  # how long in-flight requests may take to finish


class HealthConfig(_Base, frozen=True):
    """Readiness probes, passive health (ejection) and slow start (``gateway/health.py``)."""

    # GET on a starting replica; 200 = healthy. None: /health, and /v1/health/ready (NIM) if
    # /health is a 404. The replica is ready once this passes and it lists its models.
    probe_path: str | None = None
    probe_timeout_s: Seconds = 2.0
    probe_interval_s: Seconds = 0.5  # after the first failed probe, doubling up to the max
    probe_max_interval_s: Seconds = 5.0
    # Passive health: this many connection failures or 5xx answers in a row eject a replica
    # (0 = never eject) for base_ejection_s, doubled at each ejection in a row, up to the max.
    consecutive_failures: NonNegativeInt = 5
    base_ejection_s: Seconds = 5.0
    max_ejection_s: Seconds = 120.0
    # Share of the ready + ejected replicas that may be ejected at once; one always may be.
    max_ejection_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] = 50
    # A freshly ready (or readmitted) replica's share of traffic ramps up over this window.
    slow_start_s: NonNegativeSeconds = 0.0

    def __post_init__(self) -> None:
        if self.probe_path is not None and not self.probe_path.startswith("/"):
            raise ValueError(f"probe_path {self.probe_path!r} must start with /")
        if self.probe_interval_s > self.probe_max_interval_s:
            raise ValueError("probe_interval_s must be <= probe_max_interval_s")
        if self.base_ejection_s > self.max_ejection_s:
            raise ValueError("base_ejection_s must be <= max_ejection_s")


class SaturationConfig(_Base, frozen=True):
    """Bounds past which a ready replica takes no more requests; they wait in the buffer.

    Each is off when null. Queue and KV bounds apply while the replica's scrape is fresh.
    """

    max_inflight_per_replica: PositiveInt | None = None  # this gateway's requests in flight
    max_queue_per_replica: PositiveInt | None = None  # scraped waiting + dispatched since
    max_kv_usage: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None


def _default_priority_classes() -> dict[str, int]:
    return {"critical": 1, "standard": 0, "sheddable": -1}


class BufferConfig(_Base, frozen=True):
    """Requests that no replica can take yet wait here (``gateway/buffer.py``)."""

    max_queued_per_model: NonNegativeInt = 1000  # 0 = no buffer: refuse at once
    max_wait_s: NonNegativeSeconds = 120.0  # cover a replica's cold start when scaling from 0
    # Streaming requests that wait get ": keep-alive" SSE comments this often (0 = never); the
    # 200 and SSE headers then go out before a replica is chosen (see gateway/buffer.py).
    keepalive_interval_s: NonNegativeSeconds = 0.0
    # Request header naming a priority class (null = every request is 0). Higher goes first;
    # a class below 0 is sheddable. Only for trusted clients: strip it at the edge otherwise.
    priority_header: str | None = "x-kvgate-priority"
    priority_classes: dict[str, int] = msgspec.field(default_factory=_default_priority_classes)

    def __post_init__(self) -> None:
        if self.priority_header is not None and not self.priority_header.strip():
            raise ValueError("priority_header must be a header name or null")
        for name in self.priority_classes:
            if not name or name != name.strip().lower():
                raise ValueError(f"priority class {name!r} must be a lower-case name")


class LoggingConfig(_Base, frozen=True):
    level: LogLevel = "INFO"
    format: Literal["plain", "json"] = "plain"
    access_log: bool = True


class GatewayConfig(_Base, frozen=True):
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    replicas: ReplicasConfig = StaticReplicas()
    models: ModelsConfig = ModelsConfig()
    policy: PolicyConfig = P2CPolicy()
    scraper: ScraperConfig = ScraperConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    health: HealthConfig = HealthConfig()
    saturation: SaturationConfig = SaturationConfig()
    buffer: BufferConfig = BufferConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    logging: LoggingConfig = LoggingConfig()
    auth: AuthConfig | None = None

    def __post_init__(self) -> None:
        if (
            self.listen.port != 0
            and self.listen.port == self.admin.port
            and self.listen.host == self.admin.host
        ):
            raise ValueError(f"listen.port and admin.port are both {self.listen.port}")


def parse_config(data: bytes, source: str = "<config>") -> GatewayConfig:
    """Decode YAML bytes; ``ConfigError`` names the source and the path of the bad value."""
    try:
        raw = msgspec.yaml.decode(data) if data.strip() else {}
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return config_from_builtins(raw, source)


def config_from_builtins(raw: object, source: str = "<config>") -> GatewayConfig:
    """Validate an already-decoded document (dicts, lists, scalars) into a ``GatewayConfig``."""
    if isinstance(raw, dict) and isinstance(raw.get("replicas"), dict):
        # ``discovery`` is the one union tag with a default: a bare list of urls is static.
        raw = {**raw, "replicas": {"discovery": "static", **raw["replicas"]}}
    try:
        return msgspec.convert(raw, GatewayConfig)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if "- at `$" not in message:
            message += " - at `$`"
        raise ConfigError(f"{source}: {message}") from exc


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the config file, then apply environment overrides."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from exc
    cfg = parse_config(data, str(p))
    return apply_env(cfg, os.environ if env is None else env)


def apply_env(cfg: GatewayConfig, env: Mapping[str, str]) -> GatewayConfig:
    level = env.get("KVGATE_LOG_LEVEL")
    if level:
        try:
            checked = msgspec.convert(level.upper(), LogLevel)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"KVGATE_LOG_LEVEL: {exc}") from exc
        cfg = msgspec.structs.replace(
            cfg, logging=msgspec.structs.replace(cfg.logging, level=checked)
        )
    return cfg


def dump_config(cfg: GatewayConfig) -> bytes:
    """The effective configuration as YAML (defaults filled), for ``kvgate print-config``."""
    return msgspec.yaml.encode(cfg)
