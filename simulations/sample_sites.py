"""`fedlora sample-data`: one JSONL file per site from the synthetic triage-note
generator, for trying a deployment without real data (each site's notes are its own;
every note carries a synthetic `patient_id`, so user-level DP can be tried too)."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.simulations.triage_notes import DEPARTMENTS, generate_notes


def write_site_files(out: Path, sites: int, notes_per_site: int, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"site-{k}.jsonl" for k in range(sites)]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists; sample data never overwrites")
    notes = generate_notes(sites * notes_per_site, seed)
    for k, path in enumerate(paths):
        with path.open("w") as fh:
            for i, note in enumerate(notes[k * notes_per_site:(k + 1) * notes_per_site]):
                fh.write(json.dumps({**note, "patient_id": f"site{k}-p{i // 3:05d}"}) + "\n")
    return paths


LABELS = list(DEPARTMENTS)
