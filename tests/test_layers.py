"""The package's layers, read from its own imports (lazy ones inside functions included).

Each arrow the architecture forbids is a test failure naming the file, the line and the
import, so a shortcut across layers cannot land unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "slimserve"

#: Top-level parts of the package; a module outside them (slimserve/__init__.py) is "root".
PARTS = (
    "v1", "registry", "compression", "engine", "server", "clients", "fraud", "bench", "scale",
    "cli",
)  # fmt: skip

#: part -> imports it must never make (slimserve parts, or third-party top-level modules).
FORBIDDEN: dict[str, set[str]] = {
    # A client install stays small: grpc + protobuf and the generated API, nothing else here.
    "clients": {p for p in PARTS if p not in ("clients", "v1")} | {"torch", "transformers"},
    # Protobuf and gRPC stop at the server and client edges; the engine runs without a door.
    "engine": {
        "v1",
        "server",
        "clients",
        "fraud",
        "cli",
        "bench",
        "scale",
        "grpc",
        "google.protobuf",
        "ray",
    },
    "compression": {"server", "clients", "fraud", "cli", "bench", "scale", "ray"},
    # The registry is a leaf.
    "registry": {"engine", "compression", "server", "clients", "fraud", "cli", "bench", "scale"},
    # The example app scores through the public client.
    "fraud": {"engine", "server", "cli", "bench", "scale", "ray"},
    "server": {"clients", "fraud", "cli", "bench", "compression", "scale", "ray"},
    # Scale-out on Ray joins the server, engine, clients and fraud parts (which may not import
    # one another); only the CLI imports it, and only ray-less parts are below it.
    "scale": {"cli", "bench", "compression"},
    "bench": {"scale"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else "root"


def _targets(node: ast.AST, module: str) -> list[str]:
    """The modules an import statement names, as dotted paths (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")[: -node.level]
            name = ".".join([*base, node.module] if node.module else base)
        else:
            name = node.module or ""
        # `from slimserve import engine` names the part through an attribute.
        return [name] + [f"{name}.{a.name}" for a in node.names if name == "slimserve"]
    return []


def _imported_part(target: str) -> str:
    bits = target.split(".")
    if bits[0] == "slimserve":
        return bits[1] if len(bits) > 1 and bits[1] in PARTS else "root"
    if target.startswith("google.protobuf"):
        return "google.protobuf"
    return bits[0]


def arrows() -> list[tuple[str, str, str, int, str]]:
    """(from part, to part, file, line, import) for every import in the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path)
        if part == "v1":
            continue
        module = ".".join(("slimserve", *path.relative_to(ROOT).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, module):
                to = _imported_part(target)
                if to != part:
                    out.append((part, to, str(path.relative_to(ROOT.parent)), node.lineno, target))
    return out


def test_no_forbidden_arrow() -> None:
    bad = [
        f"{file}:{line}: {src} -> {dst} ({target})"
        for src, dst, file, line, target in arrows()
        if dst in FORBIDDEN.get(src, set())
    ]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from slimserve.server import app\n", "server"),
        ("def f():\n    import slimserve.engine.scheduler\n", "engine"),
        ("from slimserve import compression\n", "compression"),
        ("import grpc\n", "grpc"),
    ],
)
def test_the_walker_sees_every_kind_of_import(source: str, expected: str) -> None:
    # The check above is only as good as this reader: lazy and attribute imports count.
    found = {
        _imported_part(t)
        for node in ast.walk(ast.parse(source))
        for t in _targets(node, "slimserve.clients.x")
    }
    assert expected in found


def test_every_part_exists() -> None:
    for part in PARTS:
        assert (ROOT / part / "__init__.py").is_file(), part
