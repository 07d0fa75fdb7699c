"""The distribution installs one top-level package, `fedlora`, with its floors inside it.

The wheel is built from a copy of the tracked source files (what a fresh clone holds),
so the test sees what `pip install .` would put into site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fedlora

ROOT = Path(__file__).resolve().parent.parent


def tracked_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not in a clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def build_wheel(tmp_path: Path) -> Path:
    source = tracked_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fedlora-*.whl")
    return wheel


def test_the_wheel_puts_only_fedlora_into_site_packages(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    top_level = {name.split("/")[0] for name in names}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - dist_info == {"fedlora"}, top_level
    assert len(dist_info) == 1
    # Every source module is in the wheel, at its place under fedlora/.
    sources = [p.relative_to(ROOT).as_posix() for folder in ("fedlora", *fedlora.FLOORS) for p in (ROOT / folder).rglob("*.py")]
    expected = {s if s.startswith("fedlora/") else f"fedlora/{s}" for s in sources}
    assert expected <= set(names), sorted(expected - set(names))
    assert "fedlora/cli/__main__.py" in names and "fedlora/server/federation.py" in names
    assert not any(name.startswith("fedlora/tests/") for name in names)

    # Installed from the wheel, each floor is imported from inside fedlora/, never
    # from the source tree (this checkout is installed editable in the test's venv).
    site = tmp_path / "site"
    probe = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
             "print('\\n'.join(importlib.util.find_spec(f'fedlora.{f}').origin for f in sys.argv[2:]))")
    out = subprocess.run([sys.executable, "-c", probe, str(site), *fedlora.FLOORS], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.split()
    assert [Path(p).resolve() for p in out] == [(site / "fedlora" / f / "__init__.py").resolve() for f in fedlora.FLOORS]


def test_the_source_tree_imports_the_floors_under_fedlora():
    """In the source tree (and an app bundle, which has the same layout) the floors
    are the folders beside fedlora/, and their old top-level names are not packages."""
    import fedlora.server.run_directory as run_directory

    assert Path(run_directory.__file__).resolve() == ROOT / "server" / "run_directory.py"
    code = "import importlib.util, sys; print(importlib.util.find_spec('server') is None)"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "True"


def test_the_finder_serves_only_the_five_floors(tmp_path):
    """A folder beside fedlora/ that is not a floor is not importable as fedlora.<name>."""
    import importlib.util

    assert importlib.util.find_spec("fedlora.tests") is None
    assert importlib.util.find_spec("fedlora.docs") is None
