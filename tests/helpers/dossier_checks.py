"""What a governance reader checks of a deployed run's dossier (issue 27, item 3), for the
real deployment tests: `fedlora verify-dossier` on the run directory, against the sites'
own public keys (their `fedlora site-key` .pub files, not the coordinator's registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers.deployment import fedlora


def check_deployment_dossier(run_dir: Path, keys_dir: Path, sites: list[str], app_hash: str | None = None) -> dict[str, Any]:
    """Assert that RUN_DIR's dossier verifies against the .pub files of `sites` (in `keys_dir`),
    that its keys came from the coordinator's registry, that every one of `sites` signed a
    statement and only they did, and (given `app_hash`) that every statement names that app
    hash. Returns the dossier."""
    trusted = run_dir.parent / f"{run_dir.name}-trusted-sites.pub"
    trusted.write_text("".join((keys_dir / f"{name}.pub").read_text() for name in sites))
    out = fedlora("verify-dossier", str(run_dir), "--trusted-keys", str(trusted))
    assert out.returncode == 0 and out.stdout.startswith("valid: "), out.stdout + out.stderr
    dossier = json.loads((run_dir / "dossier.json").read_text())
    assert dossier["registered_keys"]["source"] == "coordinator registry"
    signers = {s["fields"]["signer"] for s in dossier["statements"]}
    own = {" ".join((keys_dir / f"{name}.pub").read_text().split()[:2]) for name in sites}
    assert signers == own, "every site signed, and no one else"
    if app_hash is not None:
        assert dossier["app_hashes"] == [app_hash]
    return dossier
