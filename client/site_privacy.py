"""This site's privacy settings and its DP plan for a round.

The site, not the coordinator, owns its ledger (`state-dir`) and its limit
(`max-epsilon`). Virtual sites of a simulation keep their ledgers in the run
directory, `RUN_DIR/sites/<partition-id>/`, and take `privacy.site_max_epsilon`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from client.local_training import DPPlan, privacy_units
from fedlora.config import Config
from fedlora.disk_cache import cached_in_file
from fedlora.text_data import Example
from privacy.accounting import calibrate_noise, sample_rate


def site_state_dir(config: Config, node_config: dict) -> Path:
    """Where this site keeps its ledger and local state."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])).expanduser()
    if "partition-id" in node_config:
        return Path(config.run.output_dir) / "sites" / str(int(node_config["partition-id"]))
    raise ValueError("node config has no 'state-dir': a site needs one for its privacy ledger")


def site_limit(config: Config, node_config: dict) -> float:
    """The site's own epsilon limit (node config `max-epsilon`) wins; a site that set
    none takes `privacy.site_max_epsilon` if the run sets one; else no limit."""
    if "max-epsilon" in node_config:
        limit = float(node_config["max-epsilon"])
        if not limit > 0:
            raise ValueError(f"node config 'max-epsilon' must be > 0, got {node_config['max-epsilon']!r}")
        return limit
    return config.privacy.site_max_epsilon if config.privacy.site_max_epsilon > 0 else math.inf


CALIBRATION_CACHE = "noise-calibrations.json"


def calibrated_plan(config: Config, train: list[Example], state_dir: Path | None = None) -> DPPlan:
    """Noise calibrated from this site's own data size, batch size, local steps and the
    planned rounds, so that training in every round ends at privacy.target_epsilon.
    The search takes about a second and a deployed site runs a fresh process for every
    message, so results are kept in `state_dir` (a cache: recomputed if unreadable)."""
    units = len(privacy_units(train))
    rate = sample_rate(config.train.batch_size, units)
    args = (config.privacy.target_epsilon, config.privacy.delta, rate,
            config.federation.rounds * config.train.local_steps, config.privacy.accountant)
    cache = state_dir / CALIBRATION_CACHE if state_dir else None
    sigma = cached_in_file(cache, json.dumps(args), lambda: calibrate_noise(*args))
    return DPPlan(noise_multiplier=sigma, sample_rate=rate, steps=config.train.local_steps, unit=config.privacy.unit)
