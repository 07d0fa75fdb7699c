"""The docs name only what exists: every repository path, config key, command-line flag
and test named in README.md and docs/*.md (in `code spans`), and every test file a
source comment cites. A rename that forgets the docs fails here, naming the doc."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from fedlora.cli import build_parser
from fedlora.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLOORS = ("client", "server", "strategies", "privacy", "simulations")
TOP = ("fedlora", *FLOORS, "tests", "docs", ".ci")
SOURCES = sorted(p for folder in ("fedlora", *FLOORS, "tests") for p in (ROOT / folder).rglob("*.py"))

# Commands of other tools that the docs show with their own flags.
OTHER_TOOLS = ("pip ", "flwr ", "ray ", "flower-superlink", "flower-supernode", "pytest", "python -m pytest", "unshare ")
# Flower's own flags, named on their own where the docs explain what fedlora passes it.
FLOWER_FLAGS = {"--node-config", "--isolation", "--run-config"}
FILE_SUFFIXES = ("py", "json", "jsonl", "md", "toml", "html", "txt", "pub", "pem", "csv", "safetensors", "log")

PATH = re.compile(r"(?<![\w/.$-])((?:%s)/[\w./-]*\w)" % "|".join(re.escape(t) for t in TOP))
KEY = re.compile(r"(?<![\w.])([a-z_]+\.[a-z_]+(?:\.[a-z_]+)?)(?![\w(])")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
TEST = re.compile(r"(?<![\w./])(test_\w+)")


def config_keys(section: object, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        keys |= config_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return keys


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


def script_flags() -> set[str]:
    """The flags of fedlora's own scripts (python -m fedlora.simulations.X, tests/bench_*)."""
    flags = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


KEYS = config_keys(Config())
SECTIONS = {k.split(".")[0] for k in KEYS}
FLAGS = parser_flags(build_parser()) | script_flags() | FLOWER_FLAGS
TESTS = {name for p in (ROOT / "tests").glob("*.py") for name in re.findall(r"def (test_\w+)", p.read_text())}


def exists(path: str) -> bool:
    """A repository path, or an installed one (`fedlora/server/x.py` is server/x.py here)."""
    parts = path.split("/")
    return (ROOT / path).exists() or (parts[0] == "fedlora" and len(parts) > 1 and (ROOT / "/".join(parts[1:])).exists())


def problems(text: str) -> list[str]:
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        found += [f"path {p}" for p in PATH.findall(span) if not exists(p)]
        for key in KEY.findall(span):
            head, _, last = key.rpartition(".")
            if key.split(".")[0] in SECTIONS and last not in FILE_SUFFIXES and key not in KEYS \
                    and not any(k.startswith(key + ".") for k in KEYS):
                found.append(f"config key {key}")
        if not span.lstrip().startswith(OTHER_TOOLS):
            found += [f"flag {f} (in `{span}`)" for f in FLAG.findall(span) if f not in FLAGS]
        found += [f"test {t}" for t in TEST.findall(span) if t not in TESTS and not (ROOT / "tests" / f"{t}.py").exists()]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_key_flag_and_test_a_doc_names_exists(doc):
    assert problems(doc.read_text()) == []


def test_every_test_file_a_source_comment_cites_exists():
    cited = {(path.relative_to(ROOT), t) for path in SOURCES for t in re.findall(r"tests/test_\w+\.py", path.read_text())}
    assert sorted((str(p), t) for p, t in cited if not (ROOT / t).exists()) == []


def test_the_check_finds_each_kind_of_drift():
    text = ("`server/gone.py` `train.local_stepz` `fedlora simulate --no-such-flag` `test_never_written` "
            "`fedlora/server/federation.py` `simulation.test_notes` `privacy.max_grad_norm` `pip install --no-index`")
    assert problems(text) == ["path server/gone.py", "config key train.local_stepz",
                              "flag --no-such-flag (in `fedlora simulate --no-such-flag`)", "test test_never_written"]
