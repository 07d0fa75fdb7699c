"""The export dossier: what a governance board needs to approve releasing a model, in one
file a reader can check without trusting the coordinator (`fedlora verify-dossier`,
server/dossier_check.py).

`write_dossier(RUN_DIR)` (the end of every run) writes RUN_DIR/dossier.json and
RUN_DIR/dossier.html; `fedlora export` writes them beside the exported model. The JSON holds:

- `run`, `base_model` (portable name and fingerprint, adapter/base-model.json), `strategy`
  and `config` (config.toml as the run resolved it);
- `model_files`: the SHA-256 of each file of the model beside the dossier (adapter/ in a
  run directory, the exported files in an export), so the dossier names the model it is about;
- `final_adapter`: the adapter digest of those weights (fedlora/adapter_digest.py; null for a
  merged export): every site that evaluated the last round signed a statement naming it, so
  the model files are bound to the sites' own statements, not only to the coordinator's hashes;
- `registered_keys` (RUN_DIR/site-keys.json: the coordinator's registered site keys, or a
  simulation's derived ones) and `statements`: every signed privacy statement the
  coordinator received (RUN_DIR/statements.jsonl), each with its signature;
- `unstated`: the replies that sites answered without a statement (sites without a node key);
- what follows from the statements and the final adapter alone (`summarize`): `sites` (per
  signer, with whether it evaluated the final adapter), `app_hashes`,
  `largest_epsilon` (this run's, at its delta and unit, and the largest total over runs),
  `no_dp_sites`;
- `threat_model` (one paragraph; docs/privacy.md has the whole table) and `held_out`
  (test.json where the run has one) and `final_metrics` (the last evaluated round's row).

Every derived figure is a pure function of the statements, so `verify-dossier` recomputes
it; every statement's signature is checked against the registered keys (and, with
`--trusted-keys`, against keys the reader got from the sites themselves).
"""

from __future__ import annotations

import html
import json
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.atomic_file import write_atomic
from fedlora.portable_adapter import BASE_FILE
from fedlora.server.dossier_check import verify_dossier
from fedlora.server.dossier_figures import (FORMAT, HTML_FILE, JSON_FILE, model_adapter_digest, model_file_hashes,
                                            summarize)
from fedlora.server.registered_keys import read_site_keys
from fedlora.server.statement_book import read_statements

TEST_FILE = "test.json"  # simulations/held_out_test.py

THREAT_MODEL = (
    "Each site trains on its own data under differential privacy and decides by its own policy, before any of its "
    "data is read, whether to answer a request; its ledger and its own epsilon limit bound what it spends over every "
    "run, whatever the coordinator asks. The epsilons in this dossier are the sites' own, each signed with the site's "
    "node key: they bound what a coordinator that reads every update it receives (or, under secure aggregation, only "
    "their sum), another site, or anyone the released model reaches can learn about one privacy unit (an example or a "
    "user) of a site. A signature proves which site stated a figure, not that its accounting is right: that rests on "
    "the app code the site approved (the app hash). Not covered: a site that trained without DP (dp-mode off), the "
    "site's own operator, timing, central DP (which trusts the coordinator), and collusion beyond the thresholds in "
    "docs/privacy.md (Threat model)."
)


def unstated_replies(run_dir: Path, statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The usable replies (metrics.jsonl `sites`: "ok") that came without a statement."""
    stated = {(s["round"], s["message"], s["node"]) for s in statements}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    out = []
    for row in rows:
        for site in row.get("sites", []):
            for message in ("train", "evaluate"):
                if site.get(message) == "ok" and (row["round"], message, site["node"]) not in stated:
                    out.append({"round": row["round"], "message": message, "node": site["node"]})
    return out


def called_as_registered(statements: list[dict[str, Any]], registered: dict[str, Any]) -> list[dict[str, Any]]:
    """Each statement labelled as its signer is registered at the end of the run: a site named
    while the run was under way had its earlier statements recorded under its node id, and
    `verify-dossier` holds each label to its signer's."""
    labels = {k["public_key"]: k["label"] for k in registered.get("keys", [])}
    return [{**s, "site": labels.get((s.get("fields") or {}).get("signer"), s.get("site"))} for s in statements]


def final_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last evaluated round's federated figures (noisy under DP), from metrics.jsonl."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    keys = ("eval_accuracy", "eval_loss", "eval_perplexity")
    evaluated = [r for r in rows if any(r.get(k) is not None for k in keys)]
    if not evaluated:
        return None
    last = evaluated[-1]
    return {"round": last["round"], **{k: last[k] for k in keys if k in last}}


def build_dossier(run_dir: Path, out_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The dossier of the run in `run_dir`, to be written into `out_dir`, about the model in
    `model_dir` (the run's adapter/, or an export's folder); model files are named relative
    to `out_dir`."""
    run_dir, out_dir, model_dir = run_dir.resolve(), out_dir.resolve(), model_dir.resolve()
    config = tomllib.loads((run_dir / "config.toml").read_text())
    base_file = run_dir / "adapter" / BASE_FILE
    base = json.loads(base_file.read_text()) if base_file.is_file() else {"base_model": config["model"]["path"], "fingerprint": None}
    registered = read_site_keys(run_dir)
    statements = called_as_registered(read_statements(run_dir), registered)
    test = run_dir / TEST_FILE
    files = model_file_hashes(model_dir, out_dir)
    return {
        "format": FORMAT,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": config["run"]["output_dir"],
        "base_model": {"name": base["base_model"], "fingerprint": base["fingerprint"]},
        "strategy": config["strategy"]["name"],
        "config": config,
        "model_files": files,
        "registered_keys": registered,
        "statements": statements,
        "unstated": unstated_replies(run_dir, statements),
        **summarize(statements, model_adapter_digest(out_dir, files)),
        "threat_model": THREAT_MODEL,
        "held_out": json.loads(test.read_text()) if test.is_file() else None,
        "final_metrics": final_metrics(run_dir),
    }


def write_dossier(run_dir: Path, out_dir: Path | None = None, model_dir: Path | None = None) -> Path:
    """Write dossier.json and dossier.html into `out_dir` (default: the run directory);
    returns the JSON's path. The HTML shows the result of verifying the JSON as written."""
    run_dir = Path(run_dir).resolve()
    out_dir = (out_dir or run_dir).resolve()
    dossier = build_dossier(run_dir, out_dir, model_dir or run_dir / "adapter")
    write_atomic(out_dir / JSON_FILE, json.dumps(dossier, indent=1) + "\n")
    result = verify_dossier(out_dir)
    write_atomic(out_dir / HTML_FILE, dossier_html(dossier, result.line))
    return out_dir / JSON_FILE


# --- dossier.html: one self-contained page (inline style, no script, no external URL) ---

STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
         "text-align:left;font-size:.9rem;vertical-align:top}th{background:#f3f3f3}code{font-size:.85rem;word-break:break-all}"
         ".ok{color:#176117}.bad{color:#a11}pre{background:#f7f7f7;padding:.5rem;overflow:auto;font-size:.8rem}")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _epsilon_line(largest: dict[str, Any] | None) -> str:
    if largest is None:
        return "no statements"
    return (f"epsilon {largest['epsilon']:.4g} at delta {largest['delta']:.3g} per {largest['unit']} "
            f"({largest['site']}, round {largest['round']} {largest['message']})")


def dossier_html(d: dict[str, Any], verification: str) -> str:
    ok = verification.startswith("valid")
    largest = d["largest_epsilon"]
    no_dp = (f"<p class='bad'>Trained without DP at {_e(', '.join(d['no_dp_sites']))}: no epsilon bounds this model.</p>"
             if d["no_dp_sites"] else "")
    held = d["held_out"]
    held_html = _table(["accuracy", "loss", "notes"], [[held.get("accuracy"), held.get("loss"), held.get("notes")]]) \
        if held else "<p>No held-out test (test.json) in this run.</p>"
    final = d["final_metrics"]
    final_html = _table(list(final), [list(final.values())]) if final else "<p>No evaluated round.</p>"
    sites = _table(["site", "signer", "statements", "trained rounds", "largest run epsilon", "largest total epsilon",
                    "evaluated the final adapter"],
                   [[s["site"], s["signer"], s["statements"], ", ".join(map(str, s["trained_rounds"])),
                     f"{s['run_epsilon']:.4g}", f"{s['total_epsilon']:.4g}",
                     "yes" if s["evaluated_final_adapter"] else "no: its epsilons are lower bounds"] for s in d["sites"]])
    statements = _table(
        ["round", "message", "site", "node", "run epsilon", "run delta", "total epsilon", "total delta", "unit",
         "mechanism", "secure aggregation", "DP mode", "coordinator's check"],
        [[s["round"], s["message"], s["site"], s["node"], *(
            [f["run-epsilon"], f["run-delta"], f["total-epsilon"], f["total-delta"], f["unit"], f["mechanism"],
             f["secure-aggregation"], f["dp-mode"]] if (f := s["fields"]) else ["malformed"] + [""] * 7),
          "verified" if s["verified"] else s["problem"]] for s in d["statements"]])
    keys = d["registered_keys"]
    key_rows = [[k["label"], k["node"], k["fingerprint"]] for k in keys["keys"]]
    unstated = (_table(["round", "message", "node"], [[u["round"], u["message"], u["node"]] for u in d["unstated"]])
                if d["unstated"] else "<p>Every usable reply came with a statement.</p>")
    files = _table(["file", "sha256"], [[name, digest] for name, digest in d["model_files"].items()])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedlora dossier: {_e(d['run'])}</title>
<style>{STYLE}</style></head><body>
<h1>Export dossier</h1>
<p class="{'ok' if ok else 'bad'}"><b>{_e(verification)}</b> (as written; re-check with <code>fedlora verify-dossier DIR</code>)</p>
<table>
<tr><th>run</th><td><code>{_e(d['run'])}</code></td></tr>
<tr><th>base model</th><td>{_e(d['base_model']['name'])}<br><code>{_e(d['base_model']['fingerprint'])}</code></td></tr>
<tr><th>app hash (as the sites stated it)</th><td><code>{_e(', '.join(d['app_hashes']) or 'no statements')}</code></td></tr>
<tr><th>final adapter (as the sites stated it)</th><td><code>{_e(d['final_adapter'] or 'no adapter weights beside the dossier')}</code></td></tr>
<tr><th>strategy</th><td>{_e(d['strategy'])}</td></tr>
<tr><th>largest epsilon, this run</th><td>{_e(_epsilon_line(largest['run']))}</td></tr>
<tr><th>largest epsilon, over every run at a site</th><td>{_e(_epsilon_line(largest['total']))}</td></tr>
</table>{no_dp}
<h2>Threat model</h2><p>{_e(d['threat_model'])}</p>
<h2>Held-out metrics</h2>{held_html}<h3>Last federated evaluation</h3>{final_html}
<h2>Sites</h2>{sites}
<h2>Signed privacy statements</h2>{statements}
<h3>Replies without a statement</h3>{unstated}
<h2>Registered site keys ({_e(keys['source'])})</h2>{_table(['site', 'node', 'fingerprint'], key_rows)}
<h2>Model files</h2>{files}
<h2>Configuration</h2><pre>{_e(json.dumps(d['config'], indent=1))}</pre>
</body></html>
"""
