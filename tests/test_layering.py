"""Imports go one way: the shared core imports no floor, strategies/ and privacy/ import
neither server/ nor client/, client/ and server/ do not import each other or the
simulation, and only the composition root (fedlora.cli) wires everything together:
nothing imports it. No module imports itself through others, lazily or not. No test
module imports another: shared test code lives in tests/helpers/.

Read from the source with `ast`, so lazy imports inside functions and relative imports
count too."""

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


def module_name(path: Path) -> str:
    """The name a source file is imported as: fedlora/x.py -> fedlora.x, server/y.py -> fedlora.server.y."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts) if rel.parts[0] == "fedlora" else ["fedlora", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[str]:
    """Every module name the file imports, relative imports resolved (`from .x import y`
    in fedlora/server/z.py is fedlora.server.x), lazy imports in functions included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".") if path.is_relative_to(ROOT) else []
    if path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from fedlora.client import secure_masking` imports the module fedlora.client.secure_masking
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    return names


def imported_floors(path: Path) -> set[str]:
    floors = set()
    for name in imported_names(path):
        parts = name.split(".")
        if parts[0] == "fedlora" and len(parts) > 1 and parts[1] in (*FLOORS, "cli"):
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
    # fedlora.cli is the composition root: it imports the floors, nothing imports it.
    assert floors <= ALLOWED[part], f"{path.relative_to(ROOT)} ({part}) imports {sorted(floors - ALLOWED[part])}"


def import_cycles() -> list[list[str]]:
    """Cycles among fedlora's modules, lazy imports included: a module that a module it
    imports imports back has no place in the floors (client_app and training_handlers did)."""
    modules = {module_name(p): p for p in SOURCES}
    graph = {m: sorted({n for n in imported_names(p) if n in modules and n != m})
             for m, p in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_module_imports_itself_through_others():
    assert import_cycles() == []


def test_the_check_resolves_relative_imports_and_sees_the_composition_root(tmp_path, monkeypatch):
    folder = tmp_path / "server"
    folder.mkdir()
    module = folder / "m.py"
    module.write_text("from ..client import site_data\nfrom . import federation\nfrom fedlora.cli import main\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert module_name(module) == "fedlora.server.m"
    assert "fedlora.client.site_data" in imported_names(module) and "fedlora.server.federation" in imported_names(module)
    assert imported_floors(module) == {"client", "server", "cli"}


def test_the_check_sees_a_lazy_import_of_an_upper_floor(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedlora.simulations.virtual_sites import partition_rows\n    import fedlora.server.federation\n")
    assert imported_floors(module) == {"simulations", "server"}


def imported_test_modules(path: Path) -> set[str]:
    """The `tests.test_*` modules a file under tests/ imports, other than itself: relative
    and lazy imports included (`from tests import test_x` imports tests.test_x)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package, itself = list(rel.parts[:-1]), ".".join(rel.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - (node.level - 1)], *([base] if base else [])])
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    found = {".".join(n.split(".")[:2]) for n in names if n.startswith("tests.")}
    return {n for n in found if n.startswith("tests.test_") and n != itself}


def test_no_test_module_imports_another_shared_test_code_lives_in_helpers():
    """A test module imports no other test module (what two share lives in tests/helpers/),
    and tests/helpers/ imports none at all: running or moving one test file never drags
    in, or breaks, another."""
    offenders = {str(p.relative_to(ROOT)): sorted(imported_test_modules(p)) for p in sorted((ROOT / "tests").rglob("*.py"))}
    assert {p: names for p, names in offenders.items() if names} == {}
    assert (ROOT / "tests" / "helpers" / "__init__.py").is_file()


def test_the_test_module_check_sees_absolute_relative_and_lazy_imports(tmp_path, monkeypatch):
    helpers = tmp_path / "tests" / "helpers"
    helpers.mkdir(parents=True)
    module = helpers / "m.py"
    module.write_text("import tests.test_a\nfrom ..test_b import x\nfrom .. import test_c, helpers\n"
                      "def f():\n    from tests.test_d import y\n    from tests.helpers.site_data import write_site_data\n")
    itself = tmp_path / "tests" / "test_e.py"
    itself.write_text("from tests.test_e import z\nfrom tests.helpers import deployment\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert imported_test_modules(module) == {"tests.test_a", "tests.test_b", "tests.test_c", "tests.test_d"}
    assert imported_test_modules(itself) == set()


def test_a_site_process_loads_no_torch_until_it_trains():
    """Every ClientApp message may run in a fresh process that imports the app's component
    module: the rank query and the secure-aggregation steps must not pay for torch,
    transformers, PEFT or Opacus (seconds each); train and evaluate import them on first use."""
    from tests.helpers.fresh_process import in_fresh_process

    probe = "import fedlora.cli.flower_app as m; m.client_app; import fedlora.client.client_app; code = 0"
    result = in_fresh_process(probe, cwd=ROOT)
    assert result.heavy == [], result
