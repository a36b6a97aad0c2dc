"""The sans-IO modules import no IO: no asyncio, socket, ssl or prometheus_client (DESIGN.md section 4)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import brokerproxy

PKG_DIR = Path(brokerproxy.__file__).resolve().parent
#: session.py and the modules of its parts (its mixins, its slots and replies, its events).
SESSION_PARTS = [
    "session_events",
    "session_replies",
    "session_auth",
    "session_multi_pubsub",
    "session_fast",
    "session_recovery",
]
SANS_IO = ["resp", "commands", "session", *SESSION_PARTS]
FORBIDDEN = {"asyncio", "socket", "ssl", "prometheus_client", "selectors", "uvloop"}
# Imports point one way: resp <- commands <- acl <- session's parts <- session; errors (and config) are leaves. The
# parts are in the order they may import each other: events and replies first, then the mixins, none of which
# imports another.
ORDER = ["resp", "commands", "acl", *SESSION_PARTS, "session"]
NOT_FROM_SANS_IO = {"proxy", "server", "cli", "upstream", "tls", "metrics", "audit", "__main__"}


def imported_modules(module: str) -> set[str]:
    """Absolute names of everything ``brokerproxy.<module>`` imports, at any level of its source."""
    tree = ast.parse((PKG_DIR / f"{module}.py").read_text(), filename=f"{module}.py")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                names.add(node.module)
            else:
                base = "brokerproxy" if node.level == 1 else ""
                assert node.level == 1, "no imports from above the package"
                if node.module:
                    names.add(f"{base}.{node.module}")
                else:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", SANS_IO)
def test_source_imports_no_io(module: str) -> None:
    names = imported_modules(module)
    assert names, "the AST walk found no imports at all: the check itself is broken"
    assert {n for n in names if n.split(".")[0] in FORBIDDEN} == set()
    internal = {n.split(".")[1] for n in names if n.startswith("brokerproxy.")}
    assert internal & NOT_FROM_SANS_IO == set()
    # One-way: a module imports nothing that comes after it in the order.
    if module in ORDER:
        later = set(ORDER[ORDER.index(module) :])
        assert internal & later == set()


def test_importing_sans_io_modules_loads_no_io_modules() -> None:
    # Load the modules in a fresh interpreter with a bare package object in place of brokerproxy/__init__.py (which
    # imports the server for its public names), so only what the sans-IO modules themselves pull in is loaded.
    code = f"""
import json, sys, types
before = set(sys.modules)
pkg = types.ModuleType("brokerproxy")
pkg.__path__ = [{str(PKG_DIR)!r}]
sys.modules["brokerproxy"] = pkg
import brokerproxy.resp, brokerproxy.commands, brokerproxy.session
loaded = sorted(set(sys.modules) - before)
print(json.dumps(loaded))
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "brokerproxy.session" in loaded and "brokerproxy.resp" in loaded
    assert {f"brokerproxy.{m}" for m in SESSION_PARTS} <= set(loaded)
    assert [m for m in loaded if m.split(".")[0] in FORBIDDEN] == []
    assert [m for m in loaded if m.startswith("brokerproxy.") and m.split(".")[1] in NOT_FROM_SANS_IO] == []
