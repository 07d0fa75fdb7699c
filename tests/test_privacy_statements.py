"""Signed privacy statements and the export dossier (issue 27, items 1 and 3): every site
signs what each reply spent, the coordinator keeps the statements, and `fedlora
verify-dossier` re-checks every signature and every number from the dossier alone.

One real federation in process (the real site ClientApp behind its reply guard, the real
coordinator, three virtual sites of equal size) serves the tests that read its run."""

from __future__ import annotations

import base64
import re
import json
import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.cli import main
from fedlora.privacy.node_keys import public_key_line, virtual_node_key
from fedlora.privacy.privacy_statement import RECORD, sign_statement
from tests.helpers.client_apps import run_in_process
from tests.helpers.site_messages import send, site  # noqa: F401 - the fixture

SITES = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """RUN_DIR and metrics rows of one round at three IID sites of equal size."""
    from fedlora.simulations.virtual_sites import simulated_site_app

    run_dir = tmp_path_factory.mktemp("statements") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        rows = run_in_process(simulated_site_app(), run_dir, monkeypatch, SITES,
                              {"federation.rounds": 1, "simulation.partition": "iid"})
    return run_dir, rows


def statements(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "statements.jsonl").read_text().splitlines()]


def copy_dossier(run_dir: Path, to: Path) -> Path:
    """The dossier and the model files it names, as a reader would receive them."""
    to.mkdir()
    shutil.copy2(run_dir / "dossier.json", to / "dossier.json")
    shutil.copytree(run_dir / "adapter", to / "adapter")
    return to


def rewrite(folder: Path, change) -> None:
    """Apply `change` to the dossier, then recompute every derived figure from its statements,
    as a forger would, so that only what `change` broke can fail."""
    from fedlora.server.dossier_figures import summarize

    path = folder / "dossier.json"
    dossier = json.loads(path.read_text())
    change(dossier)
    dossier.update(summarize(dossier["statements"], dossier["final_adapter"]))
    path.write_text(json.dumps(dossier))


def verify(folder: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["verify-dossier", str(folder), *extra])
    return code, capsys.readouterr().out.strip()


def test_each_site_signs_what_each_reply_spent_and_the_run_s_dossier_verifies(run, capsys, tmp_path):
    run_dir, rows = run
    entries = statements(run_dir)
    # Round 0's evaluation, round 1's training and evaluation, at each site: 9 statements, each verified on arrival.
    assert sorted((e["round"], e["message"]) for e in entries) == sorted([(0, "evaluate"), (1, "train"), (1, "evaluate")] * SITES)
    assert all(e["verified"] and e["problem"] is None for e in entries)
    # Each states the epsilons the reply's metrics carried: the coordinator's figures are the signed ones.
    reported = {s["node"]: s for s in rows[1]["site_privacy"]}
    for e in (e for e in entries if e["message"] == "train"):
        assert e["fields"]["total-epsilon"] == pytest.approx(reported[e["node"]]["epsilon"], rel=1e-12)
        assert e["fields"]["run-epsilon"] == pytest.approx(reported[e["node"]]["run_epsilon"], rel=1e-12)
    dossier = json.loads((run_dir / "dossier.json").read_text())
    assert dossier["largest_epsilon"]["total"]["epsilon"] == pytest.approx(rows[-1]["epsilon_max"], rel=1e-12)
    assert dossier["largest_epsilon"]["run"]["unit"] == "example" and dossier["unstated"] == []
    assert "epsilon" in (run_dir / "dossier.html").read_text()

    code, line = verify(run_dir, capsys)
    assert code == 0 and line.startswith("valid: 9 signed statements from 3 site(s)"), line
    # A reader's own list of the sites' keys: the statements verify against it, and not against others'.
    keys = tmp_path / "sites.pub"
    keys.write_text("".join(public_key_line(virtual_node_key(0, p).public_key()) + f" site-{p}\n" for p in range(SITES)))
    assert verify(run_dir, capsys, "--trusted-keys", str(keys))[0] == 0
    keys.write_text(public_key_line(virtual_node_key(0, 7).public_key()) + "\n")
    code, line = verify(run_dir, capsys, "--trusted-keys", str(keys))
    assert code == 1 and "not among --trusted-keys" in line


def test_a_statement_with_a_changed_epsilon_fails_verification(run, capsys, tmp_path):
    run_dir, _ = run

    def lower_the_largest(dossier: dict) -> None:
        top = max(dossier["statements"], key=lambda s: s["fields"]["run-epsilon"])
        top["fields"]["run-epsilon"] -= 1.0

    folder = copy_dossier(run_dir, tmp_path / "edited")
    rewrite(folder, lower_the_largest)
    code, line = verify(folder, capsys)
    assert code == 1 and "the signature is not the signer's over these fields" in line, line

    # The derived figure alone changed (the statements intact): the numbers do not add up.
    folder = copy_dossier(run_dir, tmp_path / "summary")
    dossier = json.loads((folder / "dossier.json").read_text())
    dossier["largest_epsilon"]["run"]["epsilon"] = 0.5
    (folder / "dossier.json").write_text(json.dumps(dossier))
    code, line = verify(folder, capsys)
    assert code == 1 and line.startswith("invalid: largest_epsilon: the dossier says"), line


def test_a_statement_signed_by_an_unregistered_key_fails_verification(run, capsys, tmp_path):
    run_dir, _ = run
    outsider = virtual_node_key(12345, 0)

    def add_outsider(dossier: dict) -> None:
        first = dossier["statements"][0]
        fields = {k: v for k, v in first["fields"].items() if k not in ("signer", "format")}
        signed = sign_statement({**fields, "run-epsilon": 0.01}, outsider)
        dossier["statements"].append({**first, "fields": {k: v for k, v in signed.items() if k != "signature"},
                                      "signature": base64.b64encode(signed["signature"]).decode(), "site": "outsider"})

    folder = copy_dossier(run_dir, tmp_path / "outsider")
    rewrite(folder, add_outsider)
    code, line = verify(folder, capsys)
    assert code == 1 and "signed by a key that is not registered" in line, line

    # A registered key's statement presented as another node's.
    def move_to_another_node(dossier: dict) -> None:
        dossier["statements"][0]["node"] = 999

    folder = copy_dossier(run_dir, tmp_path / "moved")
    rewrite(folder, move_to_another_node)
    code, line = verify(folder, capsys)
    assert code == 1 and "sent by node 999" in line, line


def test_nothing_in_a_statement_comes_from_a_site_s_data(run):
    """The three sites hold different notes of the same size: their statements of one reply
    agree in every field but the signer. Each field is the run's config, the base model's
    fingerprint, a fixed choice, or an epsilon the reply's metrics already carry."""
    run_dir, rows = run
    config = json.loads(json.dumps(__import__("tomllib").loads((run_dir / "config.toml").read_text())))
    base = json.loads((run_dir / "adapter" / "base-model.json").read_text())["fingerprint"]
    by_reply: dict[tuple, list[dict]] = {}
    for e in statements(run_dir):
        by_reply.setdefault((e["round"], e["message"]), []).append(e["fields"])
    for (server_round, message), fields in by_reply.items():
        without_signer = [{k: v for k, v in f.items() if k != "signer"} for f in fields]
        assert len(fields) == SITES and all(f == without_signer[0] for f in without_signer), (server_round, message)
        assert len({f["signer"] for f in fields}) == SITES
        f = fields[0]
        assert (f["run"], f["round"], f["message"], f["base-model"], f["app-hash"]) == (
            config["run"]["output_dir"], server_round, message, base, "")
        assert (f["unit"], f["accountant"], f["run-delta"], f["dp-mode"], f["mechanism"], f["secure-aggregation"]) == (
            config["privacy"]["unit"], config["privacy"]["accountant"], config["privacy"]["delta"], "local", "gaussian", False)


def test_the_reply_guard_lets_out_only_the_fixed_statement(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client.reply_guard import OutgoingContentError, check_outgoing

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    fields = {"run": "/runs/a", "round": 1, "message": "train", "base-model": "sha256:" + "0" * 64, "app-hash": "",
              "adapter": "sha256:" + "1" * 64,
              "run-epsilon": 1.0, "run-delta": 1e-5, "total-epsilon": 1.0, "total-delta": 1e-5, "unit": "example",
              "mechanism": "gaussian", "accountant": "prv", "secure-aggregation": False, "dp-mode": "local"}
    signed = sign_statement(fields, virtual_node_key(0, 0))
    request = Message(RecordDict(), dst_node_id=1, message_type="train")

    def reply(statement: dict) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 64}), RECORD: ConfigRecord(statement)}),
                       reply_to=request)

    check_outgoing(reply(signed), "train")
    check_outgoing(reply(signed), "evaluate")
    with pytest.raises(OutgoingContentError, match="extra train-loss"):
        check_outgoing(reply({**signed, "train-loss": 0.25}), "train")  # a data-dependent value riding along
    with pytest.raises(OutgoingContentError, match="'unit' is not one of"):
        check_outgoing(reply({**signed, "unit": "Jane Doe"}), "train")  # a free string
    with pytest.raises(OutgoingContentError, match="outside the whitelist"):
        check_outgoing(reply(signed), "query")  # a rank query spends nothing and states nothing


def test_a_deployed_site_signs_with_its_node_key_and_without_one_sends_no_statement(site, tmp_path):
    from fedlora.client.peer_keys import load_node_key
    from fedlora.client.site_keys import create_site_key
    from fedlora.privacy.privacy_statement import check_statement, signature_valid

    config, node = site
    without = send(config, node)
    assert not without.has_error() and "arrays" in without.content and RECORD not in without.content
    private, _ = create_site_key(tmp_path / "keys", "north")
    signed = send(config, {**node, "node-key": str(private)}, server_round=2)
    raw = dict(signed.content[RECORD])
    fields = check_statement(raw)
    assert fields["signer"] == public_key_line(load_node_key(private).public_key()) and signature_valid(fields, raw["signature"])
    assert (fields["round"], fields["message"], fields["total-epsilon"]) == (2, "train", signed.content["metrics"]["epsilon"])


def test_the_dossier_lists_replies_without_a_statement(run, tmp_path, capsys):
    from fedlora.server.dossier import write_dossier

    run_dir, _ = run
    unsigned = tmp_path / "unsigned"
    shutil.copytree(run_dir, unsigned)
    (unsigned / "statements.jsonl").unlink()
    write_dossier(unsigned)
    dossier = json.loads((unsigned / "dossier.json").read_text())
    assert len(dossier["unstated"]) == 3 * SITES and dossier["largest_epsilon"] == {"run": None, "total": None}
    code, line = verify(unsigned, capsys)
    assert code == 1 and "no signed privacy statement" in line


def test_export_writes_a_dossier_beside_the_model_naming_its_files(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    dossier = json.loads((out / "dossier.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "base-model.json"} <= set(dossier["model_files"])
    assert verify(out, capsys)[0] == 0
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    code, line = verify(out, capsys)
    assert code == 1 and "model file adapter_model.safetensors: its SHA-256" in line, line


def test_verify_dossier_says_bad_input_in_one_line(tmp_path, capsys):
    assert main(["verify-dossier", str(tmp_path)]) == 2
    assert "dossier.json: not found" in capsys.readouterr().err
    (tmp_path / "dossier.json").write_text("{not json")
    assert main(["verify-dossier", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "dossier.json").write_text(json.dumps({"format": "something else"}))
    assert main(["verify-dossier", str(tmp_path)]) == 2
    keys = tmp_path / "keys.pub"
    keys.write_text("ssh-ed25519 AAAA\n")
    assert main(["verify-dossier", str(tmp_path), "--trusted-keys", str(keys)]) == 2
    assert "--trusted-keys" in capsys.readouterr().err


def test_a_statement_presented_under_another_site_s_name_fails_verification(run, capsys, tmp_path):
    """The coordinator writes each statement's site label; the signer fixes whose it is. Two
    sites' labels swapped (say, to move 'trained without DP' onto another site) must fail,
    though every signature and every derived figure still holds."""
    run_dir, _ = run

    def swap_labels(dossier: dict) -> None:
        for s in dossier["statements"]:
            s["site"] = {"site 0": "site 1", "site 1": "site 0"}.get(s["site"], s["site"])

    folder = copy_dossier(run_dir, tmp_path / "relabelled")
    rewrite(folder, swap_labels)
    code, line = verify(folder, capsys)
    # Whichever of the two sites' statements arrived first is named.
    assert code == 1 and re.search(r"is registered as 'site ([01])', not 'site (?!\1)[01]'", line), line


def test_statements_about_another_base_model_fail_verification_even_when_the_dossier_names_none(run, capsys, tmp_path):
    """A registered site's genuine statement from a run on another base model (same run name),
    mixed in under a dossier whose own fingerprint was blanked: the base models disagree."""
    run_dir, _ = run
    keys = {public_key_line(virtual_node_key(0, p).public_key()): virtual_node_key(0, p) for p in range(SITES)}

    def mix_in_another_base_model(dossier: dict) -> None:
        dossier["base_model"]["fingerprint"] = None
        first = dossier["statements"][0]
        fields = {k: v for k, v in first["fields"].items() if k not in ("signer", "format")}
        signed = sign_statement({**fields, "base-model": "sha256:" + "1" * 64}, keys[first["fields"]["signer"]])
        dossier["statements"].append({**first, "fields": {k: v for k, v in signed.items() if k != "signature"},
                                      "signature": base64.b64encode(signed["signature"]).decode()})

    folder = copy_dossier(run_dir, tmp_path / "mixed")
    rewrite(folder, mix_in_another_base_model)
    code, line = verify(folder, capsys)
    assert code == 1 and "base model" in line, line


def test_a_site_named_during_the_run_is_called_by_its_final_name_throughout_the_dossier(run, capsys, tmp_path):
    """An operator may name a site while a run is under way: its earlier statements were
    recorded under its node id. The dossier calls every statement by the name its signer is
    registered under at the end, and verifies."""
    from fedlora.server.dossier import write_dossier

    run_dir, _ = run
    renamed = tmp_path / "renamed"
    shutil.copytree(run_dir, renamed)
    keys = json.loads((renamed / "site-keys.json").read_text())
    keys["keys"][0]["label"] = "north-clinic (node 1)"
    (renamed / "site-keys.json").write_text(json.dumps(keys))
    write_dossier(renamed)
    code, line = verify(renamed, capsys)
    assert code == 0, line
    dossier = json.loads((renamed / "dossier.json").read_text())
    signer = keys["keys"][0]["public_key"]
    assert {s["site"] for s in dossier["statements"] if s["fields"]["signer"] == signer} == {"north-clinic (node 1)"}


def test_the_model_files_are_bound_to_the_adapter_the_sites_evaluated_last(run, capsys, tmp_path):
    """Every site's last-round evaluation names the global adapter it loaded; the dossier's
    adapter weights must be that adapter. A coordinator that swaps in other weights (and
    rehashes every file) fails; one that leaves a site's last statements out has that site
    named, its epsilons lower bounds."""
    from safetensors.torch import load_file, save_file

    from fedlora.adapter_state import adapter_digest
    from fedlora.server.dossier_figures import file_sha256

    run_dir, _ = run
    dossier = json.loads((run_dir / "dossier.json").read_text())
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    final = adapter_digest(weights)
    assert dossier["final_adapter"] == final
    last = [s for s in statements(run_dir) if (s["round"], s["message"]) == (1, "evaluate")]
    assert len(last) == SITES and {s["fields"]["adapter"] for s in last} == {final}
    # Training in round 1 started from round 0's adapter, another one.
    assert {s["fields"]["adapter"] for s in statements(run_dir) if s["message"] == "train"} != {final}

    # Other weights, every hash recomputed as a forger would: no site evaluated them.
    folder = copy_dossier(run_dir, tmp_path / "swapped")
    swapped = folder / "adapter" / "adapter_model.safetensors"
    save_file({k: v + 0.01 if k.endswith("lora_B.weight") else v for k, v in weights.items()}, str(swapped))

    def rehash(d: dict) -> None:
        d["model_files"]["adapter/adapter_model.safetensors"] = file_sha256(swapped)
        d["final_adapter"] = adapter_digest(load_file(str(swapped)))

    rewrite(folder, rehash)
    code, line = verify(folder, capsys)
    assert code == 1 and "no statement names the model's adapter" in line, line

    # One site's final evaluation left out: the dossier still verifies, and says whose figures are lower bounds.
    folder = copy_dossier(run_dir, tmp_path / "dropped")
    target = last[0]["fields"]["signer"]

    def drop_last(d: dict) -> None:
        d["statements"] = [s for s in d["statements"]
                           if not (s["fields"]["signer"] == target and s["round"] == 1 and s["message"] == "evaluate")]

    rewrite(folder, drop_last)
    site = next(s["site"] for s in dossier["statements"] if s["fields"]["signer"] == target)
    code, line = verify(folder, capsys)
    assert code == 0 and f"the model is the adapter {SITES - 1} site(s) evaluated last (no statement on it from {site}" in line, line
    code, line = verify(run_dir, capsys)
    assert code == 0 and f"the model is the adapter {SITES} site(s) evaluated last;" not in line and "lower bounds" not in line, line


def test_verify_dossier_reads_the_weights_without_torch_to_the_same_digest(run, tmp_path):
    """A governance reader's check answers without torch, transformers or PEFT (seconds of
    imports): the weights file is read with numpy, to the digest the sites computed from
    tensors; a file of bfloat16 tensors (numpy has none) gives the digest of their values too."""
    import torch
    from safetensors.torch import load_file, save_file

    from fedlora.adapter_digest import file_digest
    from fedlora.adapter_state import adapter_digest
    from tests.helpers.fresh_process import fedlora_in_fresh_process

    run_dir, _ = run
    folder = copy_dossier(run_dir, tmp_path / "received")
    checked = fedlora_in_fresh_process("verify-dossier", str(folder))
    assert (checked.code, checked.heavy) == (0, []), checked

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert file_digest(run_dir / "adapter" / "adapter_model.safetensors") == adapter_digest(weights)
    halved = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    save_file(halved, str(tmp_path / "bf16.safetensors"))
    assert file_digest(tmp_path / "bf16.safetensors") == adapter_digest(halved) != adapter_digest(weights)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        file_digest(tmp_path / "garbage.safetensors")


def test_a_dossier_whose_weights_are_not_safetensors_fails_in_one_line(run, capsys, tmp_path):
    run_dir, _ = run
    folder = copy_dossier(run_dir, tmp_path / "garbled")
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    from fedlora.server.dossier_check import verify_dossier

    result = verify_dossier(folder)  # a problem to report, not an exception
    assert not result.valid and any("not readable adapter weights (not a safetensors file" in p for p in result.problems)
    code, out = verify(folder, capsys)
    assert code == 1 and out.startswith("invalid: ") and "\n" not in out, out
