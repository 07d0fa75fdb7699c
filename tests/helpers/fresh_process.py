"""fedlora code run in a fresh interpreter, to see which heavy libraries it imported: a
command that needs no model must not pay seconds of torch, transformers, PEFT or Opacus."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "opacus")

FEDLORA_COMMAND = """
import sys
from fedlora.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse's --help
    code = exc.code
"""


@dataclass
class FreshRun:
    code: int | None  # what the snippet set `code` to
    heavy: list[str]  # the HEAVY modules it imported
    output: str  # what it printed before the result line


def in_fresh_process(snippet: str, *argv: str, cwd: Path | None = None) -> FreshRun:
    """Run `snippet` (which sets `code`) with `argv` in a fresh interpreter."""
    script = snippet + ("\nimport json, sys\n"
                        f"print(json.dumps({{'code': code, 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n")
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"the probe printed no result:\n{(proc.stdout + proc.stderr)[-3000:]}") from None
    return FreshRun(result["code"], result["heavy"], "\n".join(lines[:-1]))


def fedlora_in_fresh_process(*args: str, cwd: Path | None = None) -> FreshRun:
    """`fedlora ARGS` in a fresh interpreter: its exit code and the heavy modules it imported."""
    return in_fresh_process(FEDLORA_COMMAND, *args, cwd=cwd)
