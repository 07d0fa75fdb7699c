"""The app hash: what a site approves, computed the same way from a Flower App Bundle
(FAB) that a run ships and from an app folder on disk (the fedlora release a site
installed, or any folder with a pyproject.toml holding [tool.flwr.app]).

Definition (format "fedlora-app-code/1"). Take every file the bundle holds except
`pyproject.toml` and Flower's `.info/` manifest, each as its path relative to the app
root (POSIX separators) and the SHA-256 of its bytes; and the ClientApp reference
(`[tool.flwr.app.components] clientapp`, e.g. "fedlora.cli.flower_app:client_app") of the
bundle's pyproject.toml. The app hash is

    "sha256:" + hex(SHA-256( "fedlora-app-code/1\\n"
                             + "clientapp " + REF + "\\n"
                             + for each file, sorted by path: HEX_DIGEST + "  " + PATH + "\\n" ))

(the file lines are `sha256sum`'s output format). pyproject.toml is left out because
`flwr build` rewrites it and its other tables are data, not code (run-config
defaults, which the coordinator overrides anyway); the ClientApp reference is kept
because it chooses which approved code Flower runs. A path holding a control
character has no hash (nothing is approved with it), so no file name can forge a
line. For an app folder on disk the files are the ones `flwr build` / `flwr run`
would put in the bundle (Flower's own selection: `fab-include` / `fab-exclude`,
.gitignore and Flower's built-in rules), read from the folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

HASH_FORMAT = "fedlora-app-code/1"
HASH_PREFIX = "sha256:"
FAB_CONFIG_FILE = "pyproject.toml"
# Set by a pinning site's task process (client/pinned_clientapp.py) to the approved hash of
# the bundle it checked and runs, for that one task: what the site's privacy statement names.
RUNNING_APP_HASH_ENV = "FEDLORA_RUNNING_APP_HASH"


class AppHashError(ValueError):
    """A bundle or folder whose app hash cannot be computed, as one line."""


def installed_app_dir() -> Path:
    """The Flower App of the fedlora installed here: the folder holding fedlora's
    pyproject.toml with [tool.flwr.app] (`pip install -e .` keeps it next to the code)."""
    import fedlora

    root = Path(fedlora.__file__).resolve().parent.parent
    pyproject = root / FAB_CONFIG_FILE
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise AppHashError(f"{root}: the fedlora Flower App (pyproject.toml with [tool.flwr.app]) is not here; "
                           "install fedlora from its source folder (pip install -e .)")
    return root


def running_app_hash() -> str:
    """The app hash this process checked before running the app's code; "" where nothing
    was checked (a simulation, `flwr run`, a ClientApp run directly)."""
    return os.environ.get(RUNNING_APP_HASH_ENV, "")


def _checked_path(path: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise AppHashError("the app bundle holds a file name with a control character")
    return path


def clientapp_reference(pyproject: bytes) -> str:
    """`[tool.flwr.app.components] clientapp` of a pyproject.toml."""
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
        ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        raise AppHashError("the app's pyproject.toml has no [tool.flwr.app.components] clientapp") from None
    if not isinstance(ref, str):
        raise AppHashError("the app's pyproject.toml: [tool.flwr.app.components] clientapp is not a string")
    return _checked_path(ref)


def code_hash(clientapp: str, files: Iterable[tuple[str, str]]) -> str:
    """The app hash of a ClientApp reference and (path, hex SHA-256) pairs."""
    h = hashlib.sha256(f"{HASH_FORMAT}\nclientapp {_checked_path(clientapp)}\n".encode())
    for path, digest in sorted(files):
        h.update(f"{digest}  {_checked_path(path)}\n".encode())
    return HASH_PREFIX + h.hexdigest()


def fab_code_hash(fab: bytes) -> str:
    """The app hash of a FAB (a zip), from its bytes: nothing in it is extracted or run.
    Every zip entry counts, duplicates and directories included, so a bundle with
    anything beyond the approved files never matches an approved hash."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            # Entries are skipped by name below, so no name may point elsewhere: ".info/../x.py"
            # would otherwise go unhashed and land beside the code (zipfile's extraction strips
            # "..", which made this harmless, but the hash must not rest on it).
            if any(_outside(info.filename) for info in zf.infolist()):
                raise AppHashError("the app bundle holds an entry named outside the app folder")
            entries = [info for info in zf.infolist() if info.filename != FAB_CONFIG_FILE
                       and not info.filename.startswith(".info/")]
            pyproject = zf.read(FAB_CONFIG_FILE)
            files = [(info.filename, hashlib.sha256(zf.read(info)).hexdigest()) for info in entries]
    except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, AppHashError):
            raise
        raise AppHashError("the app bundle is not a readable FAB (zip with pyproject.toml)") from None
    return code_hash(clientapp_reference(pyproject), files)


def _outside(name: str) -> bool:
    """A zip entry name that is absolute, holds a backslash or a ".." or "." segment."""
    return name.startswith("/") or "\\" in name or any(part in ("..", ".") for part in name.split("/"))


def installed_files_hash(app_path: Path) -> str:
    """The app hash of an installed (extracted) bundle: every file under `app_path`
    except pyproject.toml and Python's own __pycache__ folders. A symlink makes the
    hash unmatchable (an extracted FAB never holds one). Skipping __pycache__ here lets in
    no bytecode the site did not approve: the bundle's own hash (fab_code_hash) counts every
    entry, __pycache__ ones included, and is checked before anything is extracted; what this
    skips is the bytecode Python writes itself when it imports the approved sources."""
    app_path = Path(app_path)
    files = []
    for dirpath, dirnames, filenames in os.walk(app_path, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(app_path).as_posix()
            if path.is_symlink():
                files.append((rel, "symlink"))
            elif name in filenames and rel != FAB_CONFIG_FILE:
                files.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
    return code_hash(clientapp_reference((app_path / FAB_CONFIG_FILE).read_bytes()), files)


def _app_files(root: Path) -> dict[str, Path]:
    """What Flower's `collect_files` returns for `root`, without walking folders that
    .gitignore ignores as a whole (a virtual environment inside the app folder holds
    tens of thousands of files): Flower drops every file under them anyway. With a
    negated (`!`) .gitignore pattern nothing is skipped, to stay exact."""
    from fedlora.flower_internals import build_pathspec, load_gitignore_patterns

    root = root.resolve()
    gitignore = root / ".gitignore"
    patterns = load_gitignore_patterns(gitignore.read_bytes()) if gitignore.is_file() else []
    ignored = build_pathspec(patterns) if patterns and not any(p.lstrip().startswith("!") for p in patterns) else None
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if ignored is not None:
            dirnames[:] = [d for d in dirnames
                           if not ignored.match_file(f"{d}/" if rel_dir == "." else f"{rel_dir}/{d}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue  # as Flower's collect_files
            files[path.relative_to(root).as_posix()] = path
    return files


def build_app_fab(app_dir: Path) -> bytes:
    """The FAB `flwr build` / `flwr run` make of `app_dir` (Flower's own builder)."""
    from fedlora.flower_internals import build_fab_from_files

    app_dir = Path(app_dir).expanduser()
    if not (app_dir / FAB_CONFIG_FILE).is_file():
        raise AppHashError(f"{app_dir}: no pyproject.toml (not a Flower App folder)")
    try:
        return build_fab_from_files(_app_files(app_dir))[0]
    except ValueError as exc:  # Flower's one-paragraph build errors
        raise AppHashError(f"{app_dir}: not a buildable Flower App ({str(exc).splitlines()[0]})") from None


def app_dir_hash(app_dir: Path) -> str:
    """The app hash of the bundle `flwr run` would submit from `app_dir`."""
    return fab_code_hash(build_app_fab(app_dir))


def stage_app(app_dir: Path, dest: Path) -> str:
    """Write into `dest` the files `flwr run` bundles from `app_dir`, with its
    pyproject.toml, and return their app hash. `flwr run FOLDER` reads every file under
    FOLDER before it applies its rules (a checkout holding its virtual environment: about
    51,000 files, 6.5-7 CPU-seconds a submission); run on the staged copy it bundles the
    same files, so the same app hash. The files are written from the bundle that was
    hashed, so a file edited meanwhile cannot slip in unhashed."""
    app_dir = Path(app_dir).expanduser()
    fab = build_app_fab(app_dir)
    app_hash = fab_code_hash(fab)  # also refuses entry names outside the folder
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        for name in zf.namelist():
            if name == FAB_CONFIG_FILE or name.startswith(".info/"):
                continue
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(zf.read(name))
    # The folder's own pyproject.toml, not the bundle's rewritten one: `flwr run` reads its
    # app table and run-config defaults as it would from the folder.
    (dest / FAB_CONFIG_FILE).write_bytes((app_dir / FAB_CONFIG_FILE).read_bytes())
    return app_hash
