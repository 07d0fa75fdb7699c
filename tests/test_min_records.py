"""A minimum cohort (site policy `min-records`): a site whose data holds fewer privacy units
than its floor declines every message, naming the key and never the count; the count is
the site's own (all its rows, as units of its own privacy unit), so no request moves it."""

from __future__ import annotations

import pytest
from flwr.app import MessageType

from fedlora.client.site_policy import PolicyError, site_policy
from fedlora.config import Config
from fedlora.privacy.site_audit import read_audit
from fedlora.privacy.site_ledger import SiteLedger
from tests.helpers.site_data import write_site_data
from tests.helpers.site_messages import send, site  # noqa: F401 - the fixture

QUERY = MessageType.QUERY


def answer(reply) -> str:
    """What a reply says without its values: an error category, a decline's keys, or a release."""
    if reply.has_error():
        return f"error: {reply.error.reason}"
    metrics = dict(reply.content["metrics"])
    return "declined: " + ",".join(sorted(metrics)) if "declined" in metrics else "released"


def test_a_site_below_its_floor_declines_every_message_naming_the_key_not_the_count(site, tmp_path):  # noqa: F811
    config, node = site
    config.privacy.accountant = "rdp"
    small = {**node, "data-path": str(write_site_data(tmp_path / "small.jsonl", rows=60)), "min-records": 61}
    for message_type in (QUERY, MessageType.TRAIN, MessageType.EVALUATE):
        reply = send(config, small, message_type, 1)
        assert answer(reply) == "declined: declined,policy.min-records"  # the key; 60 appears nowhere
        assert set(reply.content["metrics"].values()) == {1}
    ledger = SiteLedger.load(node["state-dir"])
    assert not any(r.mechanisms for r in ledger.runs)  # nothing trained, nothing evaluated, nothing charged
    assert [d.reason for r in ledger.runs for d in r.declined] == ["site policy: min-records"] * 3
    assert [e["reason"] for e in read_audit(node["state-dir"]) if e["event"] == "declined"] == ["site policy: min-records"] * 3


def test_a_site_at_its_floor_trains(site, tmp_path):  # noqa: F811
    config, node = site
    config.privacy.accountant = "rdp"
    at_floor = {**node, "data-path": str(write_site_data(tmp_path / "small.jsonl", rows=60)), "min-records": 60}
    assert answer(send(config, at_floor, MessageType.TRAIN, 1)) == "released"


@pytest.mark.parametrize("floor, expected", [(60, "released"), (61, "declined: declined,policy.min-records")])
def test_no_request_moves_the_count(site, tmp_path, floor, expected):  # noqa: F811
    """The run's validation split and seed change how many units the site trains on (half
    of 60 under a 0.5 split); the floor counts the site's rows, so every request gets the
    same answer, and a coordinator cannot search the count by varying them."""
    config, node = site
    own = {**node, "data-path": str(write_site_data(tmp_path / "sixty.jsonl", rows=60)), "min-records": floor}
    answers = set()
    for fraction, seed in ((0.1, 1), (0.5, 2), (0.9, 3)):
        config.data.validation_fraction, config.run.seed = fraction, seed
        answers.add(answer(send(config, own, QUERY, 1)))
    assert answers == {expected}


def test_under_user_level_dp_the_floor_counts_users_not_rows(site, tmp_path):  # noqa: F811
    config, node = site
    config.privacy.unit = "user"
    data = str(write_site_data(tmp_path / "users.jsonl", rows=120, users=30))
    for floor, expected in ((30, "released"), (31, "declined: declined,policy.min-records")):
        own = {**node, "data-path": data, "privacy-unit": "user", "min-records": floor, "state-dir": str(tmp_path / f"s{floor}")}
        assert answer(send(config, own, QUERY, 1)) == expected


def test_a_negative_floor_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(PolicyError, match="'min-records' must be >= 0"):
        site_policy(Config(), {"min-records": -1})
    from fedlora.client.site_agent import SiteError, SiteSettings, validate_site

    settings = SiteSettings(superlink="x:1", data_path=write_site_data(tmp_path / "d.jsonl"), state_dir=tmp_path / "s",
                            max_epsilon=5.0, insecure=True, min_records=-1)
    with pytest.raises(SiteError, match="--min-records must be >= 0"):
        validate_site(settings)
