"""Imports go one way: the shared core imports no floor, strategies/ and privacy/ import
neither server/ nor client/, client/ and server/ do not import each other or the
simulation, and only the composition root (fedlora.cli) wires everything together.

Read from the source with `ast`, so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("server", "client", "strategies", "privacy", "simulations")

# What each part may import of the floors (the shared core `fedlora.*` is open to all).
ALLOWED = {
    "core": set(),
    "strategies": {"strategies", "privacy"},
    "privacy": {"privacy"},
    "client": {"client", "strategies", "privacy"},
    "server": {"server", "strategies", "privacy"},
    "simulations": {"simulations", "client", "server", "strategies", "privacy"},
}


def part_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "fedlora":
        return None if rel.parts[1] == "cli" else "core"  # fedlora/cli/ is the composition root
    return rel.parts[0]


def imported_floors(path: Path) -> set[str]:
    floors = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedlora" and len(parts) > 1 and parts[1] in FLOORS:
                floors.add(parts[1])
            if parts[0] in FLOORS:
                floors.add(f"top-level {parts[0]}")  # the old names: never importable now
    return floors


SOURCES = sorted(p for folder in ("fedlora", *FLOORS) for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    part = part_of(path)
    floors = imported_floors(path)
    if part is None:
        assert not any(f.startswith("top-level") for f in floors)
        return
    assert floors <= ALLOWED[part], f"{path.relative_to(ROOT)} ({part}) imports {sorted(floors - ALLOWED[part])}"


def test_the_check_sees_a_lazy_import_of_an_upper_floor(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedlora.simulations.virtual_sites import partition_rows\n    import fedlora.server.federation\n")
    assert imported_floors(module) == {"simulations", "server"}


def test_a_site_process_loads_no_torch_until_it_trains():
    """Every ClientApp message may run in a fresh process that imports the app's component
    module: the rank query and the secure-aggregation steps must not pay for torch,
    transformers, PEFT or Opacus (seconds each); train and evaluate import them on first use."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "opacus")
    probe = ("import sys, fedlora.cli.flower_app as m; m.client_app; import fedlora.client.client_app; "
             f"print(sorted(k for k in {heavy!r} if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
