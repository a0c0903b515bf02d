"""The architecture as a test: policies/ imports only the standard library and itself, and
never reads time or global randomness (both are injected)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

POLICIES = Path(__file__).resolve().parents[2] / "policies"
FILES = sorted(POLICIES.rglob("*.py"))
ALLOWED = set(sys.stdlib_module_names) | {"policies", "__future__"}
# Reading a clock or the process-global RNG inside a policy would make decisions irreproducible
# in tests and wrong in the simulator's virtual time.
FORBIDDEN_MODULES = {"time", "datetime", "secrets", "asyncio", "threading", "logging"}
FORBIDDEN_CALLS = {
    ("random", name)
    for name in (
        "random",
        "randrange",
        "randint",
        "choice",
        "shuffle",
        "sample",
        "uniform",
        "choices",
    )
}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: use absolute imports in policies/"
            found.append((node.lineno, node.module or ""))
    return found


def test_policies_package_is_found() -> None:
    assert len(FILES) >= 10
    assert POLICIES / "p2c.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_imports_only_stdlib_and_policies(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for line, module in imported_modules(tree):
        top = module.split(".")[0]
        assert top in ALLOWED, f"{path.name}:{line} imports {module} (stdlib and policies only)"
        assert top not in FORBIDDEN_MODULES, f"{path.name}:{line} imports {module}: inject it"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_module_level_random_or_clock_calls(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name):
                call = (owner.id, node.func.attr)
                assert call not in FORBIDDEN_CALLS, (
                    f"{path.name}:{node.lineno} calls {owner.id}.{node.func.attr}: "
                    "use the injected rng"
                )
                assert owner.id != "time", f"{path.name}:{node.lineno} reads time: use view.now"
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            pytest.fail(f"{path.name}:{node.lineno} imports names from random: use the rng")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "hash", (
                f"{path.name}:{node.lineno}: hash() is salted per process"
            )


def test_the_checker_catches_a_violation() -> None:
    bad = ast.parse("import aiohttp\nfrom gateway.pool import ReplicaPool\nimport os.path\n")
    tops = [m.split(".")[0] for _, m in imported_modules(bad)]
    assert [t in ALLOWED for t in tops] == [False, False, True]
