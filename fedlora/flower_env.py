"""The environment fedlora starts Flower processes in: offline, no telemetry, no update
check, no runtime dependency installation (air-gapped sites), and this Python's own
Flower executables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def flower_executable(name: str) -> str:
    """`flwr`, `flower-superlink`, `flower-supernode` of the environment fedlora runs in."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: Flower's {name} is not installed next to this Python (pip install -e .)")
    return str(path)


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment plus the offline settings; Flower processes find each
    other's executables on PATH, so this Python's bin folder goes first."""
    env = {**os.environ, **FLOWER_OFFLINE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


# Flower notices that are routine for fedlora, not something for its user to act on:
# `fedlora simulate` keeps Flower's `run_simulation` (the Python API of the simulation
# engine) on purpose, because the `flwr run` path would need a SuperLink and an app
# bundle for every local run; and each simulation worker logs its ordinary shutdown as
# a warning. Only these exact messages are dropped: every other Flower line still shows.
QUIET_FLOWER_MESSAGES = (
    "The `run_simulation` function is deprecated",
    "Manually terminating %s",
)


class QuietFlowerNotices:
    """A filter for the `flwr` logger that drops QUIET_FLOWER_MESSAGES."""

    def filter(self, record) -> bool:  # noqa: ANN001 (logging's protocol)
        text = str(record.msg) + " " + " ".join(str(a) for a in (record.args or ()) if isinstance(a, str))
        return not any(message in text for message in QUIET_FLOWER_MESSAGES)


def quiet_flower_notices() -> None:
    """Install the filter in this process (once), and keep Flower's lines to Flower's own
    console handler (INFO and up). Opacus calls `logging.basicConfig` when imported, which
    gives the root logger a handler of every level; the `flwr` logger itself is at DEBUG, so
    through the root every Flower line, DEBUG included, would print a second time."""
    import logging

    logger = logging.getLogger("flwr")
    logger.propagate = False
    if not any(isinstance(f, QuietFlowerNotices) for f in logger.filters):
        logger.addFilter(QuietFlowerNotices())
