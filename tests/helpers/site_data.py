"""A site's data file as the tests write it: labelled notes, one JSON object a line."""

from __future__ import annotations

import json
from pathlib import Path


def write_site_data(path: Path, rows: int = 240, users: int = 0) -> Path:
    with path.open("w") as fh:
        for i in range(rows):
            row = {"text": f"note {i} about {['cough', 'fracture', 'rash'][i % 3]} and fever", "label": "abc"[i % 3]}
            if users:
                row["user_id"] = f"patient-{i % users}"
            fh.write(json.dumps(row) + "\n")
    return path
