"""The Dockerfile, checked without a Docker engine.

What can be checked here is: the file's structure (multi-stage, slim base, non-root user, ports,
healthcheck); that ENTRYPOINT + CMD name the real console script with a real subcommand and the
path where the Kubernetes ConfigMap is mounted; that the HEALTHCHECK command works against a live
HTTP endpoint; and (slow) that stage 1's wheel build and stage 2's install produce a working
`kvgate` in a fresh virtualenv.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONFIG_PATH = "/etc/kvgate/gateway.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        parsed = json.loads(self.args)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), self
        return parsed


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    (ins,) = [i for i in instructions if i.keyword == keyword]
    return ins


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_multi_stage_build_on_python_slim(dockerfile: list[Instruction]) -> None:
    args = {
        i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in dockerfile if i.keyword == "ARG"
    }
    build, runtime = stages(dockerfile)
    base = {"${PYTHON_IMAGE}": args.get("PYTHON_IMAGE")}
    build_from = build[0].args.split()
    assert build_from[1:] == ["AS", "build"]
    for stage in (build, runtime):
        image = stage[0].args.split()[0]
        assert base.get(image, image) == "python:3.11-slim"
    assert any("pip wheel" in i.args for i in build if i.keyword == "RUN")
    # The runtime stage takes only the wheels from the build stage.
    installs = [i.args for i in runtime if i.keyword == "RUN" and "pip install" in i.args]
    assert installs and all("from=build" in a and "--no-index" in a for a in installs)


def test_runtime_runs_as_uid_10001(dockerfile: list[Instruction]) -> None:
    _, runtime = stages(dockerfile)
    user = only(runtime, "USER").args
    assert user.split(":")[0] == "10001"  # numeric: runAsNonRoot can verify it
    deployment = yaml.safe_load((REPO / "config/kubernetes/gateway/deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_both_ports_exposed(dockerfile: list[Instruction]) -> None:
    ports = {p for i in dockerfile if i.keyword == "EXPOSE" for p in i.args.split()}
    assert ports == {"8080", "9090"}


def test_entrypoint_is_the_console_script(dockerfile: list[Instruction]) -> None:
    _, runtime = stages(dockerfile)
    entrypoint = only(runtime, "ENTRYPOINT").exec_form()
    cmd = only(runtime, "CMD").exec_form()
    assert entrypoint == ["kvgate"]
    assert cmd == ["serve", "--config", CONFIG_PATH]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kvgate"] == "gateway.cli:main"
    # The Deployment passes the same arguments explicitly.
    deployment = yaml.safe_load((REPO / "config/kubernetes/gateway/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == cmd


def test_cmd_is_a_command_line_the_cli_accepts(
    dockerfile: list[Instruction], capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    _, runtime = stages(dockerfile)
    assert not Path(CONFIG_PATH).exists()
    # The command line parses, and serve goes looking for the file the ConfigMap provides.
    assert main(only(runtime, "CMD").exec_form()) == 2
    assert f"{CONFIG_PATH}: cannot read config file" in capsys.readouterr().err


def test_build_context_holds_what_the_build_copies(dockerfile: list[Instruction]) -> None:
    build, _ = stages(dockerfile)
    sources = [
        src.rstrip("/")
        for i in build
        if i.keyword == "COPY" and "--from" not in i.args
        for src in i.args.split()[:-1]
    ]
    assert set(sources) == {"pyproject.toml", "README.md", "gateway", "policies"}
    for src in sources:
        assert (REPO / src).exists(), f"the build copies {src}, which is missing"
    lines = [
        line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines[0] == "*"  # allow-list: nothing else (.venv, results, secrets) is sent
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert set(sources) <= allowed


def healthcheck_command(dockerfile: list[Instruction]) -> list[str]:
    _, runtime = stages(dockerfile)
    check = only(runtime, "HEALTHCHECK").args
    match = re.fullmatch(r"(?P<options>(--\S+\s+)*)CMD\s+(?P<cmd>\[.*\])", check)
    assert match, check
    options = dict(o.split("=", 1) for o in match["options"].split())
    assert {"--interval", "--timeout", "--retries"} <= set(options)
    command: list[str] = json.loads(match["cmd"])
    return command


async def run_healthcheck(command: list[str], port: int) -> int:
    assert command[:2] == ["python", "-c"]
    script = command[2]
    assert "urllib.request" in script and "127.0.0.1:9090/healthz" in script
    script = script.replace("127.0.0.1:9090", f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 10)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
async def test_healthcheck_follows_healthz(
    dockerfile: list[Instruction], aiohttp_server: Any, status: int, healthy: bool
) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=status, text="ok" if healthy else "down")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = await aiohttp_server(app)
    code = await run_healthcheck(healthcheck_command(dockerfile), server.port)
    assert (code == 0) is healthy


async def test_healthcheck_fails_when_nothing_listens(
    dockerfile: list[Instruction], unused_tcp_port: int
) -> None:
    assert await run_healthcheck(healthcheck_command(dockerfile), unused_tcp_port) != 0


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_virtualenv_and_runs(tmp_path: Path) -> None:
    """Stage 1 and 2 without Docker: build the wheel, install it with its dependencies into an
    empty virtualenv, run the entry point. About 20-40 s (dependency downloads are cached by pip).
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("gateway", "policies"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        check=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("kvgate-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    # uvloop arrives as a dependency of the package, as in the image.
    subprocess.run([str(bin_dir / "python"), "-c", "import uvloop"], check=True, timeout=30)
    out = subprocess.run(
        [str(bin_dir / "kvgate"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout
    config = REPO / "config/kubernetes/gateway/gateway.yaml"
    out = subprocess.run(
        [str(bin_dir / "kvgate"), "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
