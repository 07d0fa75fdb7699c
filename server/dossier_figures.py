"""What an export dossier (server/dossier.py) derives from its signed statements, as pure
functions of them, so that `fedlora verify-dossier` (server/dossier_check.py) recomputes each
figure instead of believing it; and the file names and hashes both sides share."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from fedlora.adapter_digest import file_digest
from fedlora.privacy.node_keys import key_fingerprint

FORMAT = "fedlora-dossier/2"
JSON_FILE = "dossier.json"
HTML_FILE = "dossier.html"
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's weights file: the model a dossier is about


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def model_file_hashes(folder: Path, relative_to: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder`, but the dossier's own."""
    return {p.relative_to(relative_to).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (JSON_FILE, HTML_FILE)}


def file_beside(folder: Path, name: str) -> Path | None:
    """The file a dossier names `name` (a POSIX path relative to its folder), or None for a
    name that points outside the folder."""
    path = PurePosixPath(name)
    return None if path.is_absolute() or ".." in path.parts else folder.joinpath(*path.parts)


def model_adapter_digest(folder: Path, files: dict[str, str]) -> str | None:
    """The adapter digest (fedlora/adapter_digest.py) of the adapter weights among `files` (names
    relative to `folder`), or None where the model beside the dossier holds none (a merged export)."""
    paths = [file_beside(folder, name) for name in files if PurePosixPath(name).name == ADAPTER_FILE]
    if len(paths) != 1 or paths[0] is None or not paths[0].is_file():
        return None
    return file_digest(paths[0])


def _largest(statements: list[dict[str, Any]], epsilon: str, delta: str) -> dict[str, Any] | None:
    best = max(statements, key=lambda s: s["fields"][epsilon], default=None)
    if best is None:
        return None
    f = best["fields"]
    return {"epsilon": f[epsilon], "delta": f[delta], "unit": f["unit"], "site": best["site"],
            "signer": key_fingerprint(f["signer"]), "round": f["round"], "message": f["message"]}


def summarize(statements: list[dict[str, Any]], final_adapter: str | None) -> dict[str, Any]:
    """What follows from the statements and the model's adapter digest alone (verify-dossier
    recomputes it): per signer its statements, largest epsilons and whether it evaluated the
    final adapter (its last spend of the run: without that statement its epsilons are lower
    bounds), the app hashes stated, the largest epsilon of this run (at its delta and unit)
    and over every run, and the sites that trained without DP."""
    formed = [s for s in statements if s.get("fields")]
    sites: dict[str, dict[str, Any]] = {}
    for s in formed:
        f = s["fields"]
        site = sites.setdefault(key_fingerprint(f["signer"]), {
            "site": s["site"], "signer": key_fingerprint(f["signer"]), "statements": 0, "trained_rounds": [],
            "run_epsilon": 0.0, "total_epsilon": 0.0, "evaluated_final_adapter": False})
        site["statements"] += 1
        if f["message"] == "evaluate" and final_adapter is not None and f.get("adapter") == final_adapter:
            site["evaluated_final_adapter"] = True
        if f["message"] == "train" and f["round"] not in site["trained_rounds"]:
            site["trained_rounds"].append(f["round"])
        site["run_epsilon"] = max(site["run_epsilon"], f["run-epsilon"])
        site["total_epsilon"] = max(site["total_epsilon"], f["total-epsilon"])
    for site in sites.values():
        site["trained_rounds"].sort()
    return {
        "final_adapter": final_adapter,
        "sites": sorted(sites.values(), key=lambda s: (str(s["site"]), s["signer"])),
        "app_hashes": sorted({s["fields"]["app-hash"] or "unpinned" for s in formed}),
        "largest_epsilon": {"run": _largest(formed, "run-epsilon", "run-delta"),
                            "total": _largest(formed, "total-epsilon", "total-delta")},
        "no_dp_sites": sorted({str(s["site"]) for s in formed if s["fields"]["dp-mode"] == "off"}),
    }
