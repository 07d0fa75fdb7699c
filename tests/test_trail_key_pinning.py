"""A governance reader who pins the site's public key (`fedlora privacy STATE_DIR --verify
--public-key FILE`) learns whether the trail is the site's: a file stripped of its chain
(every entry turned "legacy", the heads dropped) or cut at its end with its signed head
dropped no longer reads as intact. The hashes alone anyone can recompute; only the
signature binds a trail to the site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.client.peer_keys import load_node_key
from fedlora.client.site_keys import create_site_key
from fedlora.privacy.site_audit import AUDIT_FILE, HEAD_FILE, append_audit
from fedlora.privacy.site_ledger import LEDGER_FILE, Mechanism, open_ledger
from fedlora.privacy.trail_chain import TrailSigner, digest, signing_trail


@pytest.fixture
def node_key(tmp_path):
    private, public = create_site_key(tmp_path / "keys", "site-a")
    return TrailSigner(load_node_key(private)), public


def verify(state_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["privacy", str(state_dir), "--verify", *extra])
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def signed_trail(state_dir: Path, signer: TrailSigner) -> None:
    """Four ledger entries and four audit entries, every head signed by the site's key."""
    with open_ledger(state_dir, signer) as ledger:
        for r in range(1, 5):
            ledger.record("run-1", "rdp", 1e-5, Mechanism(r, 1.1, 0.05, 4), 20.0)
    with signing_trail(state_dir, signer):
        for r in range(1, 5):
            append_audit(state_dir, "request", "run-1", message="train", round=r)


def test_a_ledger_stripped_to_legacy_fails_against_the_sites_public_key(tmp_path, capsys, node_key):
    """Dropping seq, prev and both heads makes every entry look written before the chain:
    then any entry could be deleted unseen. A pinned check must not call it intact."""
    signer, public = node_key
    signed_trail(tmp_path, signer)
    assert verify(tmp_path, capsys, "--public-key", str(public))[0] == 0
    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    for mechanism in raw["runs"][0]["mechanisms"]:
        mechanism.pop("seq"), mechanism.pop("prev")
    raw["runs"][0]["mechanisms"].pop()  # the last round's spend, gone
    raw.pop("head"), raw.pop("signed_head")
    raw["format"] = 1
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 1, line
    assert f"{tmp_path / LEDGER_FILE}: no head signed by the given key" in line, line


def test_an_audit_log_stripped_to_legacy_fails_against_the_sites_public_key(tmp_path, capsys, node_key):
    signer, public = node_key
    signed_trail(tmp_path, signer)
    path = tmp_path / AUDIT_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()][:-1]  # the last cut
    path.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in ("seq", "prev")}) + "\n" for e in lines))
    (tmp_path / HEAD_FILE).unlink()
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 1, line
    assert f"{path}: no head signed by the given key" in line, line


def test_a_ledger_cut_at_its_end_with_its_signed_head_dropped_fails_against_the_sites_public_key(
        tmp_path, capsys, node_key):
    """The classic gap of a hash chain: cut the tail, recompute the (unsigned) head, drop the
    signed one."""
    signer, public = node_key
    signed_trail(tmp_path, signer)
    raw = json.loads((tmp_path / LEDGER_FILE).read_text())
    run = raw["runs"][0]
    run["mechanisms"].pop()
    last = run["mechanisms"][-1]
    raw["head"]["entries"] = last["seq"] + 1
    raw["head"]["last"] = digest({"run": run["run"], "accountant": run["accountant"], "delta": run["delta"],
                                  "list": "mechanisms", "entry": last})
    raw.pop("signed_head")
    (tmp_path / LEDGER_FILE).write_text(json.dumps(raw))
    assert verify(tmp_path, capsys)[0] == 0  # consistent in itself: the hashes prove nothing on their own
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 1 and "no head signed by the given key" in line, line


def test_a_never_rewritten_legacy_ledger_says_under_a_pinned_check_that_nothing_signs_it(tmp_path, capsys, node_key):
    """A ledger from before the chain that no signed write has touched since is not the site's
    word either: the pinned check says so, and the unpinned one still reads it as legacy."""
    _, public = node_key
    legacy = {"format": 1, "max_epsilon": 20.0, "runs": [{"run": "old", "accountant": "rdp", "delta": 1e-5, "mechanisms": [
        {"round": 1, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 4, "unit": "example",
         "time": "2025-01-01T00:00:00+00:00", "kind": "train", "l2": None, "l1": None, "trust": None}], "declined": []}]}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(legacy))
    code, line = verify(tmp_path, capsys)
    assert code == 0 and "0 entries chained after 1 legacy entries" in line, line
    code, line = verify(tmp_path, capsys, "--public-key", str(public))
    assert code == 1 and "no head signed by the given key" in line and "1 legacy entries" in line, line


def test_the_budget_guard_refuses_a_ledger_rewritten_and_signed_by_another_key(tmp_path):
    """The chain's hashes anyone can recompute: a ledger whose spends were cut out and whose
    head was re-signed with some other key is intact by its own lights. The guard of a site
    that holds its node key (pinned) refuses it, naming both keys; with the site's own key
    it trains on; a virtual site's per-run key (not pinned) is not held to it."""
    from fedlora.privacy.budget_guard import check_budget
    from fedlora.privacy.site_ledger import LedgerError, SiteLedger
    from fedlora.privacy.trail_chain import fingerprint

    own = TrailSigner(load_node_key(create_site_key(tmp_path / "keys", "site-a")[0]), pinned=True)
    other = TrailSigner(load_node_key(create_site_key(tmp_path / "keys", "intruder")[0]))
    state = tmp_path / "state"
    with open_ledger(state, own) as ledger:
        ledger.record("run-1", "rdp", 1e-5, Mechanism(1, 1.1, 0.05, 4), 20.0)
    planned = [(1.1, 0.05, 4)]
    with open_ledger(state, own) as ledger:
        assert check_budget(ledger, planned, 1e-5, "rdp", 20.0).allowed
    spent = SiteLedger.load(state).epsilon(1e-5, "rdp")
    # The intruder rewrites the history from nothing and signs it: a fresh, intact chain.
    (state / LEDGER_FILE).unlink()
    with open_ledger(state, other) as ledger:
        ledger.record("run-0", "rdp", 1e-5, Mechanism(1, 50.0, 0.01, 1), 20.0)
    assert SiteLedger.load(state).check_trail().problem is None
    assert SiteLedger.load(state).epsilon(1e-5, "rdp") < spent
    with open_ledger(state, own) as ledger, pytest.raises(LedgerError) as refused:
        check_budget(ledger, planned, 1e-5, "rdp", 20.0)
    assert f"signed head is by key {fingerprint(other.public_line())}, not this site's node key " \
           f"{fingerprint(own.public_line())}" in str(refused.value)
    from fedlora.client.reply_guard import error_category

    # The refusal comes from the ledger file alone, before any data is read; the coordinator
    # gets only the fixed category, never the line with the keys.
    assert error_category(refused.value) == "policy"
    with signing_trail(state, own), open_ledger(state) as ledger, pytest.raises(LedgerError):
        check_budget(ledger, planned, 1e-5, "rdp", 20.0)  # the key lent for the message pins too
    virtual = TrailSigner(own.key)  # the same key, lent unpinned (as a virtual site's is)
    with open_ledger(state, virtual) as ledger:
        assert check_budget(ledger, planned, 1e-5, "rdp", 20.0).allowed


def test_fedlora_client_refuses_at_start_a_state_dir_whose_ledger_another_key_signed(tmp_path):
    """The site's start check (before it joins) holds the ledger to the site's --key."""
    from fedlora.client.site_agent import SiteError, _check_state_dir

    private, _ = create_site_key(tmp_path / "keys", "site-a")
    intruder = TrailSigner(load_node_key(create_site_key(tmp_path / "keys", "intruder")[0]))
    state = tmp_path / "state"
    with open_ledger(state, TrailSigner(load_node_key(private))) as ledger:
        ledger.record("run-1", "rdp", 1e-5, Mechanism(1, 1.1, 0.05, 4), 20.0)
    _check_state_dir(state, private)  # its own key: fine
    with open_ledger(state, intruder) as ledger:
        ledger.record("run-1", "rdp", 1e-5, Mechanism(2, 1.1, 0.05, 4), 20.0)
    with pytest.raises(SiteError, match=r"^--state-dir: privacy ledger .*: its signed head is by key SHA256:"):
        _check_state_dir(state, private)
    _check_state_dir(state, None)  # no key given: nothing to pin (the chain itself holds)
