"""The coordinator operator's site names: kept in the coordinator's state dir at
registration (default: the key's comment), used to name sites that did not deliver."""

from __future__ import annotations

from fedlora.client.site_keys import create_site_key
from fedlora.server import site_names


def test_names_are_recorded_forgotten_and_label_the_sites_that_did_not_deliver(tmp_path):
    _, public = create_site_key(tmp_path / "keys", "st-mary-radiology")
    assert site_names.key_comment(public) == "st-mary-radiology"
    (tmp_path / "bare.pub").write_text("ecdsa-sha2-nistp384 AAAAE2VjZHNh\n")
    assert site_names.key_comment(tmp_path / "bare.pub") is None

    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    assert site_names.load(coordinator) == {}
    site_names.record(coordinator, 12231148781181418480, "st-mary-radiology")
    site_names.record(coordinator, 2396574274762215067, "north-clinic")
    site_names.forget(coordinator, 2396574274762215067)
    site_names.forget(coordinator, 5)  # unknown: nothing to do
    assert site_names.load(coordinator) == {12231148781181418480: "st-mary-radiology"}

    rows = [
        {"round": 1, "sites": [{"node": 12231148781181418480, "train": "ok", "evaluate": "ok"}]},
        {"round": 2, "sites": [{"node": 12231148781181418480, "train": "node unavailable", "evaluate": None},
                               {"node": 7, "train": "ok", "evaluate": "error: data error"}]},
        {"round": 3},  # a row written before per-site rows existed
    ]
    assert site_names.problem_lines(rows, site_names.load(coordinator)) == [
        "round 2: st-mary-radiology (node 12231148781181418480) train: node unavailable; node 7 evaluate: error: data error"]
