"""Config loading: defaults, validation with paths, env overrides, the CLI's exit codes."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import msgspec
import pytest

from gateway.cli import main
from gateway.config import (
    GATEWAY_SIDE_POLICY_FIELDS,
    DnsReplicas,
    GatewayConfig,
    KubernetesReplicas,
    PolicyConfig,
    StaticReplicas,
    dump_config,
    load_config,
    parse_config,
    policy_name,
    policy_params,
)
from gateway.errors import ConfigError
from policies.registry import POLICY_NAMES, make_policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("listen: {port: 70000}", "Expected `int` <= 65535 - at `$.listen.port`"),
        ("listen: {prot: 8080}", "unknown field `prot` - at `$.listen`"),
        ("bogus: 1", "unknown field `bogus` - at `$`"),
        (
            "scraper: {interval_s: 0.1, timeout_s: 0.2}",
            "must be < interval_s (0.1) - at `$.scraper`",
        ),
        ("scraper: {engine: vllm}", "Invalid enum value 'vllm' - at `$.scraper.engine`"),
        ("upstream: {max_attempts: 0}", "Expected `int` >= 1 - at `$.upstream.max_attempts`"),
        (
            "upstream: {connect_timeout_s: -1}",
            "Expected `float` > 0.0 - at `$.upstream.connect_timeout_s`",
        ),
        (
            "policy: {name: p2c, staleness_correction: 1}",
            "Expected `bool`, got `int` - at `$.policy.staleness_correction`",
        ),
        ("policy: {name: fastest}", "Invalid value 'fastest' - at `$.policy.name`"),
        (
            "policy: {name: round_robin, block_chars: 4}",
            "unknown field `block_chars` - at `$.policy`",
        ),
        (
            "policy: {name: prefix_affinity, balance_rel_threshold: 0.5}",
            "Expected `float` >= 1.0 - at `$.policy.balance_rel_threshold`",
        ),
        ("replicas: {urls: [ftp://x:1]}", "must be http(s)://host[:port] - at `$.replicas`"),
        (
            "replicas: {urls: ['http://a:1', 'http://a:1/']}",
            "replica a:1 is listed twice - at `$.replicas`",
        ),
        ("listen: {port: 9090}", "listen.port and admin.port are both 9090 - at `$`"),
        ("logging: {format: xml}", "Invalid enum value 'xml' - at `$.logging.format`"),
        (
            "replicas: {discovery: dns, port: 8000}",
            "missing required field `name` - at `$.replicas`",
        ),
        (
            "replicas: {discovery: dns, name: x, port: 0}",
            "Expected `int` >= 1 - at `$.replicas.port`",
        ),
        ("replicas: {discovery: consul}", "Invalid value 'consul' - at `$.replicas.discovery`"),
        ("replicas: {discovery: kubernetes, urls: []}", "unknown field `urls` - at `$.replicas`"),
        ("listen: [1]", "Expected `object`, got `array` - at `$.listen`"),
        ("listen: {port: 1", "not valid YAML"),
    ],
)
def test_invalid_config_names_the_path(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.encode(), "test.yaml")
    assert str(info.value).startswith("test.yaml: ")
    assert message in str(info.value)


def test_empty_file_is_all_defaults() -> None:
    cfg = parse_config(b"")
    assert cfg == GatewayConfig()
    assert cfg.scraper.interval_s == 0.25
    assert cfg.scraper.timeout_s < cfg.scraper.interval_s
    assert policy_name(cfg.policy) == "p2c"
    assert cfg.admin.port == 9090


def test_discovery_kinds() -> None:
    static = parse_config(b"replicas: {urls: ['http://10.0.0.1:8000']}").replicas
    assert isinstance(static, StaticReplicas)  # the tag defaults to static
    dns = parse_config(b"replicas: {discovery: dns, name: vllm.llm.svc, port: 8000}").replicas
    assert isinstance(dns, DnsReplicas) and dns.interval_s == 5.0
    k8s = parse_config(b"replicas: {discovery: kubernetes, service: vllm, port: http}").replicas
    assert isinstance(k8s, KubernetesReplicas) and k8s.port == "http" and k8s.namespace is None


def test_print_config_round_trips() -> None:
    cfg = parse_config(
        b"replicas: {urls: ['http://127.0.0.1:8001']}\npolicy: {name: prefix_affinity}"
    )
    again = msgspec.yaml.decode(dump_config(cfg), type=GatewayConfig)
    assert again == cfg
    text = dump_config(cfg).decode()
    assert "capacity_blocks: 2048" in text  # defaults are filled in
    assert "discovery: static" in text


def _policy_structs() -> list[type[msgspec.Struct]]:
    return list(PolicyConfig.__args__)


def test_every_configurable_policy_has_a_config_struct() -> None:
    names = {s.__struct_config__.tag for s in _policy_structs()}
    assert names == set(POLICY_NAMES)


@pytest.mark.parametrize("struct", _policy_structs(), ids=lambda s: str(s.__struct_config__.tag))
def test_policy_defaults_equal_the_policy_constructor(struct: type[msgspec.Struct]) -> None:
    cfg = struct()
    params = policy_params(cfg)  # type: ignore[arg-type]
    policy_class = type(make_policy(policy_name(cfg)))  # type: ignore[arg-type]
    signature = inspect.signature(policy_class)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
    assert params == defaults
    assert set(msgspec.structs.asdict(cfg)) - set(params) <= GATEWAY_SIDE_POLICY_FIELDS


def test_env_overrides_log_level(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("logging: {level: INFO}\n")
    assert load_config(path, env={"KVGATE_LOG_LEVEL": "debug"}).logging.level == "DEBUG"
    with pytest.raises(ConfigError, match="KVGATE_LOG_LEVEL"):
        load_config(path, env={"KVGATE_LOG_LEVEL": "loud"})


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    load_config(path, env={})


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  port: high\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "$.listen.port" in err

    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err

    good = tmp_path / "good.yaml"
    good.write_text("replicas: {urls: ['http://127.0.0.1:8001']}\n")
    assert main(["check-config", str(good)]) == 0
    assert "ok (1 static replicas, policy p2c)" in capsys.readouterr().out
    assert main(["print-config", str(good)]) == 0
    assert "max_metrics_age_s: 1.0" in capsys.readouterr().out


def test_serve_without_a_config_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KVGATE_CONFIG", raising=False)
    assert main(["serve"]) == 2
    assert "KVGATE_CONFIG" in capsys.readouterr().err


def test_serve_reads_kvgate_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "env.yaml"
    bad.write_text("upstream: {max_attempts: 99}\n")
    monkeypatch.setenv("KVGATE_CONFIG", str(bad))
    assert main(["serve"]) == 2  # fails validation before anything starts
    assert f"{bad}: Expected `int` <= 10 - at `$.upstream.max_attempts`" in capsys.readouterr().err


def test_kubernetes_discovery_without_credentials_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = tmp_path / "k8s.yaml"
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
        "replicas: {discovery: kubernetes, service: vllm}\n"
    )
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        assert main(["serve", "--config", str(path)]) == 2
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "not running in a Kubernetes pod" in capsys.readouterr().err
