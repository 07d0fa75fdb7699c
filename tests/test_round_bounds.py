"""Rounds outside the run's plan are declined before any data is read, and calibration
never loops (issue 25, item 5).

A train request for round federation.rounds + 1 at a site whose limit makes it calibrate
to its limit used to calibrate for 0 remaining steps, which looped forever while holding
the ledger lock; a SuperNode handles one message at a time, so the site was down until
restarted. Each test runs under an alarm, so a regression fails instead of hanging.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from flwr.app import MessageType

from fedlora.privacy.accounting import calibrate_noise
from fedlora.privacy.site_ledger import SiteLedger
from tests.helpers.site_messages import send, site  # noqa: F401 - the fixture


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    def hung(_signum, _frame):
        raise TimeoutError("the site did not answer within 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_calibration_refuses_nothing_to_calibrate():
    for steps, rate in ((0, 0.1), (-3, 0.1), (10, 0.0)):
        with pytest.raises(ValueError, match="nothing to calibrate"):
            calibrate_noise(4.0, 1e-5, rate, steps, "rdp")


@pytest.mark.parametrize("message_type, server_round", [
    (MessageType.TRAIN, 5), (MessageType.TRAIN, 0), (MessageType.TRAIN, 10**9), (MessageType.EVALUATE, 5),
    (MessageType.EVALUATE, -1), (MessageType.QUERY, 6),
])
def test_a_round_outside_the_plan_is_declined_and_the_site_answers_the_next_message(site, tmp_path, message_type, server_round):  # noqa: F811
    config, node = site  # federation.rounds = 4
    config.privacy.accountant = "rdp"
    # A limit below the run's plan: the site calibrates to it (where 0 steps left looped).
    strict = {**node, "max-epsilon": 2.5, "data-path": node["data-path"]}
    reply = send(config, {**strict, "data-path": str(tmp_path / "absent.jsonl")}, message_type, server_round)
    assert not reply.has_error()
    assert dict(reply.content["metrics"]) == {"declined": 1, "policy.round": 1}
    assert not any(r.mechanisms for r in SiteLedger.load(node["state-dir"]).runs)
    # The same site answers the next message, a round inside the plan.
    reply = send(config, strict, message_type if message_type != MessageType.QUERY else MessageType.TRAIN, 1)
    assert not reply.has_error() and "declined" not in reply.content["metrics"]
