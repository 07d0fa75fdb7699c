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
