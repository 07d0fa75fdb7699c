"""A site's ledger and audit log are hash chains under signed heads (privacy/trail_chain.py):
editing, deleting or reordering one entry is found by `fedlora privacy STATE_DIR --verify`,
which names the entry; the budget guard refuses to train on a ledger whose chain is broken;
a ledger written across process restarts verifies, signed by the site's node key; a ledger
written before the chain existed stays usable, its entries marked as a legacy prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.client.site_keys import create_site_key
from fedlora.client.peer_keys import load_node_key
from fedlora.privacy.budget_guard import check_budget
from fedlora.privacy.site_audit import AUDIT_FILE, AuditError, append_audit
from fedlora.privacy.site_ledger import LEDGER_FILE, Declined, LedgerError, Mechanism, SiteLedger, open_ledger
from fedlora.privacy.trail_chain import TrailSigner, signing_trail
from tests.helpers.site_messages import site  # noqa: F401 - the fixture
from tests.helpers.site_process import fresh_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def node_key(tmp_path):
    private, public = create_site_key(tmp_path / "keys", "site-a")
    return TrailSigner(load_node_key(private)), public


def verify(state_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["privacy", str(state_dir), "--verify", *extra])
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert len(text.splitlines()) == 1, text  # one line, whatever the verdict
    return code, text


def write_ledger(state_dir: Path, signer: TrailSigner | None) -> None:
    """Eight entries over two runs: training, evaluations and a decline, as sites record them."""
    with open_ledger(state_dir, signer) as ledger:
        for run in ("run-1", "run-2"):
            for r in (1, 2):
                ledger.record(run, "rdp", 1e-5, Mechanism(r, 1.1, 0.05, 4), 20.0)
                ledger.record(run, "rdp", 1e-5, Mechanism(r, 3.0, 1.0, 3, kind="evaluation"), 20.0)
        ledger.record("run-1", "rdp", 1e-5, Declined(3, 3.0, 30.0, 20.0), 20.0)


def entries_by_seq(raw: dict) -> dict[int, tuple[str, str, int]]:
    """seq -> (run index, list name, index in the list) of the ledger file's entries."""
    return {e["seq"]: (i, name, j) for i, r in enumerate(raw["runs"]) for name in ("mechanisms", "declined")
            for j, e in enumerate(r[name])}


def tamper_ledger(path: Path, how: str) -> int:
    """Change the ledger file as someone with write access to it could; the entry named."""
    raw = json.loads(path.read_text())
    where = entries_by_seq(raw)
    run, name, j = where[3]  # run-1, mechanisms: the second round's evaluation
    entries = raw["runs"][run][name]
    if how == "edit":
        entries[j]["noise_multiplier"] = 9.0  # more noise: the round looks cheaper than it was
        named = 3
    elif how == "delete":
        del entries[j]
        named = 3
    elif how == "reorder":
        entries[j - 1], entries[j] = entries[j], entries[j - 1]
        named = 2
    elif how == "delete the last":
        last_run, last_name, last_j = where[max(where)]
        del raw["runs"][last_run][last_name][last_j]
        named = max(where)
    elif how == "move to another run":
        raw["runs"][1]["mechanisms"].insert(0, entries.pop(j))
        named = 3
    path.write_text(json.dumps(raw, indent=1))
    return named


@pytest.mark.parametrize("how", ["edit", "delete", "reorder", "delete the last", "move to another run"])
def test_one_changed_ledger_entry_is_named_by_verify_and_refused_by_the_guard(tmp_path, capsys, node_key, how):
    signer, public = node_key
    write_ledger(tmp_path, signer)
    assert verify(tmp_path, capsys, "--public-key", str(public))[0] == 0
    named = tamper_ledger(tmp_path / LEDGER_FILE, how)

    code, line = verify(tmp_path, capsys)
    assert code == 1
    assert f"{tmp_path / LEDGER_FILE}: entry {named} " in line, line
    ledger = SiteLedger.load(tmp_path)
    with pytest.raises(LedgerError, match=f"{LEDGER_FILE}: entry {named} .*chain is broken"):
        check_budget(ledger, [(1.1, 0.05, 4)], 1e-5, "rdp", 20.0)
    tampered = (tmp_path / LEDGER_FILE).read_text()
    with pytest.raises(LedgerError, match=f"entry {named} "), open_ledger(tmp_path, signer) as again:
        again.record("run-2", "rdp", 1e-5, Declined(5, None, None, 20.0, reason="site policy: round"), 20.0)
    assert (tmp_path / LEDGER_FILE).read_text() == tampered  # no entry, no new signed head over the break


def test_a_ledger_rewritten_whole_without_the_key_fails_against_the_sites_public_key(tmp_path, capsys, node_key):
    """Someone who recomputes every hash can re-sign only with a key of their own, or
    leave the last signed head behind: the site's public key tells both."""
    signer, public = node_key
    write_ledger(tmp_path, signer)
    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    raw["signed_head"]["time"] = "2020-01-01T00:00:00+00:00"  # the signed head no longer says what was signed
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    code, line = verify(tmp_path, capsys)
    assert code == 1 and "signature does not verify" in line

    other = tmp_path / "other"
    forger, _ = create_site_key(tmp_path / "forger", "forger")
    write_ledger(other, TrailSigner(load_node_key(forger)))
    assert verify(other, capsys)[0] == 0  # intact in itself ...
    code, line = verify(other, capsys, "--public-key", str(public))
    assert code == 1 and "not the given key" in line  # ... but not signed by this site


def audit_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("how", ["edit", "delete", "reorder", "delete the last"])
def test_one_changed_audit_entry_is_named_by_verify(tmp_path, capsys, node_key, how):
    signer, public = node_key
    with signing_trail(tmp_path, signer):
        for r in range(6):
            append_audit(tmp_path, "request", "run-1", message="train", round=r, asks={"dp": True, "delta": 1e-5})
    write_ledger(tmp_path, signer)
    assert verify(tmp_path, capsys, "--public-key", str(public))[0] == 0
    path = tmp_path / AUDIT_FILE
    lines = audit_lines(path)
    if how == "edit":
        entry = json.loads(lines[2])
        entry["asks"]["dp"] = False
        lines[2] = json.dumps(entry, sort_keys=True)
        named = "entry 2 (line 3"
    elif how == "delete":
        del lines[2]
        named = "entry 2 is missing"
    elif how == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
        named = "entry 3 (line 3)"
    else:
        del lines[-1]
        named = "entry 5 is missing"
    path.write_text("\n".join(lines) + "\n")
    code, line = verify(tmp_path, capsys)
    assert code == 1 and f"{path}: {named}" in line, line
    if how == "delete the last":  # the next entry would re-sign over the cut: refused
        with pytest.raises(AuditError, match="cut or changed at the end"):
            append_audit(tmp_path, "request", "run-1", message="train", round=9)


def test_an_entry_written_without_the_key_is_chained_and_shown_after_the_last_signed_head(tmp_path, capsys, node_key):
    """The site executor writes app decisions in a process that holds no key: they chain,
    and the next signed write covers them."""
    signer, public = node_key
    with signing_trail(tmp_path, signer):
        append_audit(tmp_path, "request", "run-1", round=1)
    append_audit(tmp_path, "app", "run-2", approved=False)
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 0 and "signed head covers 1 of 2" in line, line
    with signing_trail(tmp_path, signer):
        append_audit(tmp_path, "request", "run-2", round=1)
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 0 and "audit-log.jsonl: 3 entries chained, signed head covers all" in line, line


def test_a_ledger_and_audit_log_from_before_the_chain_stay_usable_as_a_legacy_prefix(tmp_path, capsys):
    legacy = {"format": 1, "max_epsilon": 20.0, "runs": [{"run": "old", "accountant": "rdp", "delta": 1e-5, "mechanisms": [
        {"round": r, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 4, "unit": "example",
         "time": "2025-01-01T00:00:00+00:00", "kind": "train", "l2": None, "l1": None, "trust": None} for r in (1, 2)],
        "declined": []}]}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(legacy))
    (tmp_path / AUDIT_FILE).write_text(json.dumps({"time": "2025-01-01T00:00:00+00:00", "event": "request", "run": "old"}) + "\n")
    code, line = verify(tmp_path, capsys)
    assert code == 0 and "0 entries chained after 2 legacy entries" in line, line
    check_budget(SiteLedger.load(tmp_path), [(1.1, 0.05, 4)], 1e-5, "rdp", 20.0)  # trains on it

    with open_ledger(tmp_path) as ledger:  # the chain starts at the next entry, over the legacy prefix
        ledger.record("new", "rdp", 1e-5, Mechanism(1, 1.1, 0.05, 4), 20.0)
    append_audit(tmp_path, "request", "new", round=1)
    code, line = verify(tmp_path, capsys)
    assert code == 0 and "privacy-ledger.json: 1 entries chained after 2 legacy entries" in line
    assert "audit-log.jsonl: 1 entries chained after 1 legacy entries" in line, line
    assert SiteLedger.load(tmp_path).epsilon(1e-5, "rdp") > 0

    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    raw["runs"][0]["mechanisms"].pop()  # a legacy entry deleted once the chain covers it
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    code, line = verify(tmp_path, capsys)
    assert code == 1 and "the 1 entries written before the chain began were changed: entry 0" in line, line


@pytest.mark.slow
def test_an_intact_ledger_written_across_process_restarts_verifies_signed_by_the_node_key(site, tmp_path, capsys):  # noqa: F811
    """A fresh process per message, through the whole ClientApp (its mods lend the node key)."""
    config, node = site
    config.privacy.accountant = "rdp"
    private, public = create_site_key(tmp_path / "keys", "site-a")
    node = {**node, "node-key": str(private), "max-epsilon": 50.0}
    path = tmp_path / "config.toml"
    from fedlora.config import write_config

    write_config(config, path)
    script = ("import json, sys; from fedlora.config import load_config; from tests.helpers.site_messages import send; "
              "reply = send(load_config(sys.argv[1]), json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[2])); "
              "assert not reply.has_error(), reply.error")
    messages = [(script, [str(path), str(server_round), json.dumps(node), kind])
                for server_round, kind in ((1, "train"), (1, "evaluate"), (2, "train"))]
    for code, output in fresh_processes(messages, ROOT, tmp_path):
        assert code == 0, output[-2000:]
    code, line = verify(Path(node["state-dir"]), capsys, "--public-key", str(public))
    assert code == 0, line
    assert "privacy-ledger.json: 3 entries chained, signed head covers all" in line, line
    assert "audit-log.jsonl" in line and "signed head covers all" in line.split("audit-log.jsonl")[1], line
    ledger = SiteLedger.load(node["state-dir"])
    assert [(m.round, m.kind, m.seq) for m in ledger.runs[0].mechanisms] == [(1, "train", 0), (1, "evaluation", 1),
                                                                             (2, "train", 2)]


@pytest.mark.slow
def test_virtual_sites_of_a_simulation_sign_their_trails_with_their_derived_keys(tmp_path, monkeypatch, capsys):
    """The real coordinator and the simulation's ClientApp in process: every virtual site's
    ledger and audit log verify, signed by the key derived from the run seed and its partition."""
    from fedlora.client.peer_keys import virtual_node_key
    from fedlora.privacy.trail_chain import public_key_line
    from fedlora.simulations.virtual_sites import simulated_site_app
    from tests.helpers.client_apps import run_in_process

    run_in_process(simulated_site_app(), tmp_path / "run", monkeypatch, 2,
                   {"federation.rounds": 1, "federation.min_clients": 2, "privacy.accountant": "rdp"})
    capsys.readouterr()  # the run's own progress lines
    from fedlora.config import load_config

    seed = load_config(tmp_path / "run" / "config.toml").run.seed
    for partition in (0, 1):
        public = tmp_path / f"site-{partition}.pub"
        public.write_text(public_key_line(virtual_node_key(seed, partition).public_key()) + "\n")
        state_dir = tmp_path / "run" / "sites" / str(partition)
        code, line = verify(state_dir, capsys, "--public-key", str(public))
        assert code == 0, line
        assert line.count("signed head covers all") == 2, line  # the ledger and the audit log
