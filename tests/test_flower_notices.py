"""Only the Flower notices fedlora names are dropped from Flower's log (fedlora/flower_env.py)."""

from __future__ import annotations

import logging

from flwr.common.logger import log, warn_deprecated_feature

from fedlora.flower_env import quiet_flower_notices


def test_exactly_the_named_notices_are_dropped(caplog):
    quiet_flower_notices()
    quiet_flower_notices()  # once is enough; twice changes nothing
    logger = logging.getLogger("flwr")
    assert sum(type(f).__name__ == "QuietFlowerNotices" for f in logger.filters) == 1
    propagate, logger.propagate = logger.propagate, True  # caplog listens at the root
    try:
        with caplog.at_level(logging.DEBUG):
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            log(logging.WARNING, "Manually terminating %s", "ClientAppActor")
            warn_deprecated_feature("Another feature is deprecated")
            log(logging.WARNING, "Something else happened to %s", "ClientAppActor")
    finally:
        logger.propagate = propagate
    shown = [r.getMessage() for r in caplog.records]
    assert not any("run_simulation" in m or "Manually terminating" in m for m in shown)
    assert any("Another feature is deprecated" in m for m in shown)
    assert any("Something else happened to ClientAppActor" in m for m in shown)


def test_the_deployed_serverapp_prints_flowers_lines_once_and_no_debug_line():
    """`fedlora run` streams the ServerApp process's output. There Opacus is imported, whose
    `logging.basicConfig` would print every `flwr` record (the logger is at DEBUG) a second
    time through the root logger, DEBUG lines included."""
    import subprocess
    import sys
    from pathlib import Path

    probe = """
import logging, sys, types
import opacus.utils.module_utils  # calls logging.basicConfig, as it does in the ServerApp process
from flwr.app import Context, RecordDict
from flwr.common.logger import log
import fedlora.server.server_app as server_app

def run_federation(grid, config):
    log(logging.DEBUG, "a debug line")
    log(logging.INFO, "an info line")

sys.modules["fedlora.server.federation"] = types.SimpleNamespace(run_federation=run_federation)
server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
log(logging.DEBUG, "ServerApp finished running.")  # as Flower logs after the ServerApp returns
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("an info line") == 1, output
    assert "DEBUG" not in output and "a debug line" not in output and "finished running" not in output, output
