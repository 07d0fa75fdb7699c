"""A real deployment on 127.0.0.1: `fedlora coordinator` (a SuperLink with TLS, node
authentication and a database) and sites as real SuperNode processes, driven
through fedlora's own commands, on a tiny test model.

1. A bundle with one changed line, submitted with `flwr run`, is refused at every
   pinning site before any of its code runs. Then the release: three registered sites
   (one started directly with `flower-supernode`) run 2 rounds and write a complete
   run directory, while a site with an unregistered key is refused and a site holding
   a different base model refuses. The coordinator is killed after round 1 and
   restarted; `fedlora run --resume` finishes round 2 without repeating round 1, and a
   site killed as round 2 begins is counted as failed while the round completes with
   the others. (One deployment for both stories: a coordinator and its sites cost
   about 150 CPU-seconds to start and keep polling, the most of this suite's time.)
2. Distributed DP over three TLS sites, one stopped after its masked input arrived.

Both run on one coordinator with two long-lived sites (`shared`, a module fixture; the
module is one xdist group, so its tests run in this order on one worker): the distributed
run first, whose stopped site is a third one of its own; then the three-site story, which
kills site 1 and the coordinator.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedlora.app_hash import app_dir_hash, installed_app_dir
from fedlora.client.app_pinning import REFUSED_APP
from fedlora.client.coordinator_watch import coordinator_answers
from fedlora.privacy.site_audit import read_audit
from tests.helpers.app_bundles import change_one_line, copy_app, flwr_run_folder
from tests.helpers.dossier_checks import check_deployment_dossier
from tests.helpers.deployment import (FEDLORA, Deployment, fedlora, kill, metrics_rows, start, wait_for, wait_for_site_logs,
                                      wait_for_sites)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment")]

LONG_LIVED = ("site-0", "site-1")  # started once for the module
MASKING = (*LONG_LIVED, "masking-2")  # the distributed run's sites: their keys are each other's peers


def ledger_run(state_dir: Path, run_dir: Path) -> dict:
    """A site's ledger entry for one run (a long-lived site's ledger holds every run it joined)."""
    ledger = json.loads((state_dir / "privacy-ledger.json").read_text())
    (entry,) = [r for r in ledger["runs"] if r["run"] == str(run_dir)]
    return entry


def trained_rounds(state_dir: Path, run_dir: Path) -> list[int]:
    """The rounds of the DP-SGD mechanisms in a site's ledger for one run (its accounted evaluations left out)."""
    return [m["round"] for m in ledger_run(state_dir, run_dir)["mechanisms"] if m.get("kind", "train") == "train"]


def app_folders(state_dir: Path) -> list[str]:
    """The app bundles a site's SuperNode has extracted (a long-lived site keeps every approved one)."""
    return sorted(p.name for p in (state_dir / "flwr-home" / "apps").glob("*"))


@dataclass
class Shared:
    d: Deployment
    keys: dict[str, Path]  # the masking sites' keys, registered
    peer_args: tuple[str, ...]  # what a masking site adds to `fedlora client`
    sites: dict[str, subprocess.Popen]  # the long-lived sites


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_models):
    """A coordinator (TLS, node authentication) and two long-lived sites that also hold the
    distributed run's peer keys; each test adds the sites it stops or kills."""
    d = Deployment(tmp_path_factory.mktemp("deployment"), tiny_models["bert"])
    try:
        keys = {name: d.site_key(name) for name in MASKING}
        consortium = d.root / "consortium.pub"
        consortium.write_text("".join(Path(f"{keys[name]}.pub").read_text() for name in MASKING))
        peer_args = ("--peer-keys", str(consortium), "--allow-distributed-dp")
        sites = {name: d.site(name, key=keys[name], extra_args=peer_args) for name in LONG_LIVED}
        yield Shared(d, keys, peer_args, sites)
    finally:
        d.close()


def other_base_model(tiny_bert: Path, folder: Path) -> Path:
    """The same architecture with other weights: a site holding the wrong checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(str(folder))
    return folder


def test_distributed_dp_over_three_tls_sites_with_one_stopped_after_masking(shared):
    """Secure aggregation and distributed DP deployed: the sites' peer keys and policy,
    five exchanges a round, and a site stopped after its masked noisy sum arrived: the round
    unmasks without it (its self-mask is rebuilt from the others' shares; its noise share
    is in the sum). Local DP under secure aggregation runs the same exchanges (tests/test_secure_rounds.py)."""
    d = shared.d
    stopped = d.site("masking-2", key=shared.keys["masking-2"], extra_args=shared.peer_args)
    wait_for_site_logs([d.root / f"site-{name}.log" for name in MASKING], 120, "the three masking sites to connect")
    run_dir = d.root / "runs" / "secure"
    config = d.config("secure", **{"federation.secure_aggregation": True, "federation.rounds": 1,
                                   "privacy.mode": "distributed", "privacy.distributed_sample_rate": 0.2})
    submit = start([*FEDLORA, "run", "--config", str(config), "--coordinator-dir", str(d.state)], d.root / "secure-run.log")
    d.processes.append(submit)

    # The third site trains round 1 and sends its masked input (its log line comes just before the
    # reply); it is stopped before it can sign the survivor set or reveal anything. SIGTERM, not
    # SIGKILL: its node leaves the coordinator at once, so the round does not wait out Flower's
    # minute-long heartbeat hold (the three-site test covers a crash).
    site_log = d.root / "site-masking-2.log"
    wait_for(lambda: re.search(r"round 1: .* epsilon", site_log.read_text()), 400, "the third site to train round 1")
    time.sleep(3)
    kill(stopped, signal.SIGTERM)
    assert submit.wait(timeout=900) == 0, (d.root / "secure-run.log").read_text()[-3000:]

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    # All three inputs are in the sum; the stopped site failed only a later step.
    assert rows[1]["clients_ok"] == 3
    assert rows[1]["failures"].get("node unavailable", 0) + rows[1]["failures"].get("timeout", 0) == 1, rows[1]
    assert rows[1]["bytes_up"] > 0
    for name in MASKING:
        (step,) = [m for m in ledger_run(d.root / "sites" / name, run_dir)["mechanisms"] if m["kind"] == "distributed"]
        assert step["round"] == 1 and "at most 1 of the 3 masking sites" in step["trust"]
    for name in LONG_LIVED:
        log = (d.root / f"site-{name}.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_changed_bundle_refused_then_three_tls_sites_with_refusals_a_coordinator_restart_and_a_site_killed_mid_run(shared, tmp_path):
    d = shared.d
    sites = [shared.sites[name] for name in LONG_LIVED]
    d.site("other-model", model=other_base_model(d.model, tmp_path / "other-model"))
    home = d.state / "flwr-home"
    wait_for_sites(home, lambda online: len(online) == 3, 120, "three sites to connect")
    apps_before = {name: app_folders(d.root / "sites" / name) for name in ("site-0", "site-1", "other-model")}
    # The sites' coordinator watch asks what they connect to: HTTPS checked against the CA, both names in
    # its certificate; another CA, or plain HTTP to a TLS coordinator, does not answer.
    ca, address = d.root / "certs" / "ca.pem", f"127.0.0.1:{d.port}"
    assert coordinator_answers(address, ca) and coordinator_answers(f"localhost:{d.port}", ca)
    assert fedlora("certs", "--out", str(tmp_path / "another-ca")).returncode == 0
    assert not coordinator_answers(address, tmp_path / "another-ca" / "ca.pem") and not coordinator_answers(address, None)

    # A bundle with one changed line, submitted as a coordinator would: every site refuses it unopened.
    installed, marker = app_dir_hash(installed_app_dir()), tmp_path / "marker"
    modified = copy_app(tmp_path / "modified" / "fedlora")
    change_one_line(modified, marker)
    shipped = app_dir_hash(modified)
    assert shipped != installed
    config = d.config("modified", **{"federation.rounds": 1, "federation.round_retries": 0})
    refused_dir, coordinator_view = flwr_run_folder(modified, config, home, tmp_path / "refused-run.log")
    rows = metrics_rows(refused_dir)
    assert rows and rows[0]["failures"] == {REFUSED_APP: 3}, coordinator_view[-3000:]
    assert all(set(r["failures"]) <= {REFUSED_APP} and r["clients_ok"] == 0 for r in rows)
    assert REFUSED_APP in coordinator_view and "round 0/1: clients 0 ok / 3 failed" in coordinator_view
    # A refusal is final for the run: it ends cleanly, without retries and without a traceback.
    assert "run ended after round 0" in coordinator_view and "Traceback" not in coordinator_view
    assert not marker.exists()  # no line of the bundle ran, at any site
    for name in ("site-0", "site-1", "other-model"):
        log = (d.root / f"site-{name}.log").read_text()
        assert shipped in log and installed in log  # the site logs both hashes
        assert app_folders(d.root / "sites" / name) == apps_before[name]  # never even extracted
        decisions = [e for e in read_audit(d.root / "sites" / name) if e["event"] == "app" and e["run"] == str(refused_dir)]
        assert decisions == [{**decisions[0], "run": str(refused_dir), "app_hash": shipped, "approved": False,
                              "approved_hashes": [installed]}]

    # The release, on the same sites and one started directly with flower-supernode (which pins nothing).
    sites.append(d.site("site-2", direct=True))
    rogue = d.site("rogue", register=False)
    run_dir = d.root / "runs" / "three"
    submit = start([*FEDLORA, "run", "--config", str(d.config("three")), "--coordinator-dir", str(d.state)], d.root / "run.log")
    d.processes.append(submit)

    # The unregistered key never joins: its SuperNode is refused and exits.
    assert wait_for(lambda: rogue.poll() is not None, 120, "the unregistered site to be refused") != 0
    assert "Failed to activate SuperNode" in (d.root / "site-rogue.log").read_text()

    # The coordinator (the SuperLink and the ServerApp it runs) killed once round 1 is checkpointed.
    wait_for(lambda: (run_dir / "checkpoints" / "round-0001" / "state.json").is_file(), 400, "round 1's checkpoint")
    round_1 = metrics_rows(run_dir)[1]
    # Connected all along until now: the sites' coordinator watch said nothing.
    assert "cannot reach the coordinator" not in (d.root / "site-site-0.log").read_text()
    kill(d.coordinator)
    kill(submit)
    assert not (run_dir / "adapter").exists()

    # Restarted on the same database: the sites stay registered and reconnect; `fedlora run --resume`.
    d.coordinator = d.start_coordinator()
    resume_log = d.root / "resume.log"
    resume = start([*FEDLORA, "run", "--resume", str(run_dir), "--coordinator-dir", str(d.state)], resume_log)
    d.processes.append(resume)
    # Kill one site's whole node (SuperNode and its ClientApp) as round 2 begins: when the
    # resumed run's first message reaches it (so that it is among the round's sites).
    resumed_run = wait_for(lambda: re.search(r"logstream for run_id `(\d+)`", resume_log.read_text()), 300,
                           "the resumed run to start").group(1)
    site_1_log = d.root / "site-site-1.log"
    wait_for(lambda: f"[RUN {resumed_run}, ROUND" in site_1_log.read_text(), 300, "the resumed run to reach site 1")
    kill(sites[1])
    assert resume.wait(timeout=600) == 0, resume_log.read_text()[-3000:]

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]  # no duplicate rows
    assert rows[1] == round_1  # round 1 was not redone
    run_log, resumed = (d.root / "run.log").read_text(), resume_log.read_text()
    # `fedlora run` (and --resume) ends with the summary table, as simulate does.
    assert "eval_accuracy  epsilon_max" in resumed and "[fedlora] run finished" in resumed
    assert f"app hash (sites run it only if they approved it): {installed}" in run_log
    assert not marker.exists()
    for name in ("site-0", "site-1"):  # each pinning site approved the release, once, for this run (resumed or not)
        approved = [e["app_hash"] for e in read_audit(d.root / "sites" / name)
                    if e["event"] == "app" and e["approved"] and e["run"] == str(run_dir)]
        assert approved == [installed]
    assert rows[1]["clients_ok"] == 3 and rows[1]["failures"] == {"refused: different base model": 1}
    assert rows[2]["clients_ok"] == 2
    assert rows[2]["clients_failed"] == 2  # the killed site and the refusing one
    assert rows[2]["failures"].get("refused: different base model") == 1
    assert rows[2]["failures"].get("node unavailable", 0) + rows[2]["failures"].get("timeout", 0) == 1
    # The per-site rows name the killed site by its own node id (one that trained round 1), not the SuperLink's.
    lost = [s for s in rows[2]["sites"] if s["train"] in ("node unavailable", "timeout")]
    assert len(lost) == 1 and lost[0]["node"] in {s["node"] for s in rows[1]["sites"] if s["train"] == "ok"}
    assert sorted(s["train"] for s in rows[2]["sites"]) == sorted(["ok", "ok", lost[0]["train"], "refused: different base model"])
    # `fedlora run` names the sites that did not deliver by the operator's names (the keys' comments at registration).
    assert f"site-1 (node {lost[0]['node']}) train: {lost[0]['train']}" in resumed
    assert "other-model (node" in resumed and "train: refused: different base model" in resumed
    # Each site's own log states, per round, its noise multiplier, sampling rate and epsilon (docs/privacy.md).
    site_log = (d.root / "site-site-0.log").read_text()
    for r in (1, 2):
        assert re.search(rf"round {r}: .* noise multiplier [0-9.]+ \(q [0-9.]+ per example, \d+ steps\), "
                         rf"epsilon [0-9.]+, expected [0-9.]+ after round 2, limit 10.000", site_log), site_log[-3000:]

    # A complete run directory, with an adapter PEFT loads.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    assert {p.name for p in run_dir.iterdir()} >= {"config.toml", "metrics.jsonl", "labels.json", "adapter", "checkpoints"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    base = AutoModelForSequenceClassification.from_pretrained(str(d.model), num_labels=3)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()

    # Each site's ledger holds what it trained: round 1 once; round 2 at least once (twice if the site
    # answered the killed coordinator's round 2: that release left the site, so its ledger rightly keeps
    # it). The refusing site trained nothing.
    for name in ("site-0", "site-2"):
        rounds = trained_rounds(d.root / "sites" / name, run_dir)
        assert rounds.count(1) == 1 and rounds.count(2) in (1, 2) and set(rounds) == {1, 2}, rounds
    assert not (d.root / "sites" / "other-model" / "privacy-ledger.json").exists()
    assert "is not the coordinator's" in (d.root / "site-other-model.log").read_text()

    # The dossier verifies against the sites' own public keys: every site that trained signed what it spent.
    dossier = check_deployment_dossier(run_dir, d.root / "keys", ["site-0", "site-1", "site-2"])
    assert dossier["app_hashes"] == sorted([installed, "unpinned"])  # flower-supernode started directly pins nothing
    # The sites that stayed evaluated the final adapter: the model files are bound to their statements.
    evaluated_last = " ".join(str(s["site"]) for s in dossier["sites"] if s["evaluated_final_adapter"])
    assert "site-0" in evaluated_last and "site-2" in evaluated_last, dossier["sites"]

    # Export: the merged model loads with plain transformers and computes what base + adapter do.
    out = fedlora("export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge")
    assert out.returncode == 0, out.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
