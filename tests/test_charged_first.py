"""Nothing data-dependent leaves a site uncharged (issue 25, item 3).

- The label list is site policy (`labels`): a run whose data.labels differs (or any
  classification run, at a site that declares none) is declined before any data is read,
  so two sites with the same policy, one holding an extra label, answer every list alike
  (the label oracle); the data check before the charge follows the site's rules, not the
  request's (a task switch).
- The ledger is charged before any data-dependent work: an evaluation or a training round
  that fails after reading data has its entry (a crash over-counts, which is safe).
- `max-evaluations` counts every evaluation that read data, completed or not.
- Distributed DP's record-count check comes before the ledger entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import MessageType

from fedlora.client.site_agent import SiteError, SiteSettings, _check_data
from fedlora.client.site_policy import PolicyError, site_policy
from fedlora.client.site_data import load_site_data
from fedlora.config import Config, load_config
from fedlora.privacy.site_ledger import SiteLedger
from fedlora.text_data import DataError
from tests.helpers.site_messages import send, site  # noqa: F401 - the fixture


def write_rows(path: Path, labels: str, rows: int = 60) -> Path:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"text": f"note {i} about fever", "label": labels[i % len(labels)]}) + "\n")
    return path


def kinds(state_dir) -> list[str]:
    return [m.kind for r in SiteLedger.load(state_dir).runs for m in r.mechanisms]


def in_kind(reply) -> str:
    """What a reply says without its values: an error category, a decline's key, or a release."""
    if reply.has_error():
        return f"error: {reply.error.reason}"
    metrics = dict(reply.content["metrics"])
    return "declined: " + ",".join(sorted(k for k in metrics if k != "declined")) if "declined" in metrics else "released"


# Lists of three: the tiny test model's head has three classes. ["a", "b", "x"] omits "c",
# which only the second site holds: without the policy, it alone would answer "data error".
@pytest.mark.parametrize("asked", [["a", "b", "x"], ["a", "b", "c"], ["c", "b", "a"]])
def test_two_sites_one_holding_an_extra_label_answer_every_label_list_alike(site, tmp_path, asked):  # noqa: F811
    config, node = site
    config.privacy.accountant = "rdp"
    config.data.labels = asked
    replies = {}
    for name, held in (("two labels", "ab"), ("three labels", "abc")):
        own = {**node, "labels": "a,b,c", "state-dir": str(tmp_path / name),
               "data-path": str(write_rows(tmp_path / f"{name}.jsonl", held))}
        replies[name] = {t: in_kind(send(config, own, t, 1)) for t in (MessageType.TRAIN, MessageType.EVALUATE)}
    assert replies["two labels"] == replies["three labels"], replies
    expected = "released" if asked == ["a", "b", "c"] else "declined: policy.labels"
    assert set(replies["two labels"].values()) == {expected}


def test_a_site_that_declares_no_labels_declines_every_label_list_before_reading_data(site, tmp_path):  # noqa: F811
    """Without `labels` the site's own check against the run's list would be the oracle:
    the site declines instead, before it opens its file (here one that does not exist)."""
    config, node = site
    config.privacy.accountant = "rdp"
    undeclared = {k: v for k, v in node.items() if k != "labels"}
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = send(config, {**undeclared, "data-path": str(tmp_path / "absent.jsonl")}, message_type, 1)
        assert in_kind(reply) == "declined: policy.labels"
    assert not any(r.mechanisms for r in SiteLedger.load(node["state-dir"]).runs)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_the_data_check_before_the_charge_follows_the_site_not_the_request(tmp_path, task):
    """A row with a blank label fails the site's check whatever task the request names:
    a coordinator switching model.task learns nothing about the rows (the check that
    followed the request failed only under classification)."""
    path = tmp_path / "site.jsonl"
    path.write_text(json.dumps({"text": "note", "label": "a"}) + "\n" + json.dumps({"text": "note", "label": " "}) + "\n")
    config = load_config(None, {"model.task": task, "data.labels": ["a", "b"]})
    with pytest.raises(DataError) as caught:
        load_site_data(config, ["a", "b"], {"data-path": str(path), "labels": "a,b"}, tokenizer=None)
    assert str(caught.value) == f"data file {path}: row 2 (line 2): column 'label' is empty or missing"
    # A site without labels (a causal LM site) needs none; its text is still checked.
    path.write_text(json.dumps({"text": "note"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="row 2 \\(line 2\\): column 'text' is empty or missing"):
        load_site_data(config, ["a", "b"], {"data-path": str(path)}, tokenizer=None)


def test_labels_policy_parsing_and_the_start_check(tmp_path):
    config = Config()
    assert site_policy(config, {"labels": "a, b,c"}).labels == ("a", "b", "c")
    assert site_policy(config, {}).labels == ()
    for bad in ("a,,b", "a,a"):
        with pytest.raises(PolicyError, match="'labels'"):
            site_policy(config, {"labels": bad})
    path = write_rows(tmp_path / "rows.jsonl", "abc")
    settings = SiteSettings(superlink="x:1", data_path=path, state_dir=tmp_path, labels=["a", "b", "c"])
    _check_data(path, settings)
    settings.labels = ["a", "b"]
    with pytest.raises(SiteError, match="row 3: its 'label' .* not one of --labels") as info:
        _check_data(path, settings)
    assert "'c'" not in str(info.value)  # rows are named by number, never by value
    assert settings.policy()["labels"] == "a,b"


def test_an_evaluation_that_fails_after_reading_data_is_charged_and_counted(site, monkeypatch):  # noqa: F811
    from fedlora.client import training_handlers

    config, node = site
    node = {**node, "max-evaluations": 1}

    def fails(*_args, **_kwargs):
        raise RuntimeError("a crafted adapter made one record fail")

    monkeypatch.setattr(training_handlers, "evaluate_locally", fails)
    reply = send(config, node, MessageType.EVALUATE, 0)
    assert reply.has_error() and reply.error.reason == "internal error"
    assert kinds(node["state-dir"]) == ["evaluation"]  # charged before the data was read
    monkeypatch.undo()
    assert in_kind(send(config, node, MessageType.EVALUATE, 1)) == "declined: policy.max-evaluations"


def test_a_training_round_that_fails_after_reading_data_is_charged(site, monkeypatch):  # noqa: F811
    from fedlora.client import training_handlers

    config, node = site
    config.privacy.accountant = "rdp"

    def fails(*_args, **_kwargs):
        raise RuntimeError("a crafted adapter made one record fail")

    monkeypatch.setattr(training_handlers, "train_locally", fails)
    reply = send(config, node, MessageType.TRAIN, 1)
    assert reply.has_error() and reply.error.reason == "internal error"
    assert kinds(node["state-dir"]) == ["train"]  # charged before training
