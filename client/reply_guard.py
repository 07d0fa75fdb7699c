"""The last thing every reply passes before it leaves the site (a Flower ClientApp mod).

- Any exception in a handler becomes an error reply whose reason is one fixed
  category ("data error", "model error", "policy", "secure aggregation", "internal error"), never the
  exception's text, which could hold a value from the site's data (a label, a row).
  The details, with the traceback, go to the site's own log only.
- A reply's content is checked against the whitelist: at most the ArrayRecord
  "arrays" of adapter tensors (or, never beside it, a train reply's "masked" input
  under secure aggregation), the MetricRecord "metrics" with whitelisted keys of the message type,
  and for the secure-aggregation steps the ConfigRecord "secagg" with that step's keys;
  a train or evaluate reply may add the ConfigRecord "statement", the site's signed
  privacy statement, with exactly its fixed fields (privacy/privacy_statement.py).
  Anything else is an internal error, and nothing is sent.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedlora.client.peer_keys import PeerKeyError
from fedlora.client.site_policy import PolicyError
from fedlora.flower_internals import ErrorCode
from fedlora.privacy import privacy_statement, secure_aggregation_records as secagg
from fedlora.privacy.secure_aggregation import SecureAggregationError
from fedlora.model_folder import ModelError
from fedlora.config import ConfigError
from fedlora.messages import (
    DECLINED_METRICS, EVALUATE_METRICS, QUERY_METRICS, REFUSED_METRICS, SITE_ERROR_CATEGORIES, TRAIN_METRICS,
)
from fedlora.text_data import DataError
from fedlora.privacy.finite import NonFiniteRelease
from fedlora.privacy.site_audit import AuditError
from fedlora.privacy.site_ledger import LedgerError

log = logging.getLogger("fedlora.client")

ALLOWED_METRICS = {
    MessageType.TRAIN: set(TRAIN_METRICS) | set(DECLINED_METRICS) | set(REFUSED_METRICS),
    MessageType.EVALUATE: set(EVALUATE_METRICS) | set(DECLINED_METRICS) | set(REFUSED_METRICS),
    MessageType.QUERY: set(QUERY_METRICS) | set(DECLINED_METRICS) | set(REFUSED_METRICS),
}


class OutgoingContentError(RuntimeError):
    """A reply held something outside the whitelist; it was not sent."""


def error_category(exc: BaseException) -> str:
    """The fixed category an exception is reported to the coordinator as."""
    if isinstance(exc, DataError):
        return "data error"
    if isinstance(exc, (ModelError, NonFiniteRelease)):
        return "model error"
    if isinstance(exc, (PolicyError, LedgerError, AuditError, ConfigError, PeerKeyError)):
        return "policy"
    if isinstance(exc, SecureAggregationError):
        return "secure aggregation"
    return "internal error"


def check_outgoing(reply: Message, message_type: str) -> None:
    """Raise OutgoingContentError unless `reply` holds only whitelisted content."""
    content = reply.content
    category, _, action = message_type.partition(".")
    arrays = {"arrays", secagg.MASKED} if category == MessageType.TRAIN else {"arrays"}
    configs = {secagg.RECORD} if action in secagg.REPLY_KEYS else set()
    if not action and category in (MessageType.TRAIN, MessageType.EVALUATE):
        configs.add(privacy_statement.RECORD)
    extra_records = set(content) - arrays - configs - {"metrics"}
    if extra_records or set(content.config_records) - configs or set(content.array_records) - arrays \
            or set(content.metric_records) - {"metrics"}:
        raise OutgoingContentError(f"reply records outside the whitelist: {sorted(content)}")
    if {"arrays", secagg.MASKED} <= set(content.array_records):
        # A masked train reply with the tensors in the clear beside it would undo the masking.
        raise OutgoingContentError("a train reply holds both the adapter and a masked input")
    if secagg.RECORD in content.config_records:
        extra = set(content[secagg.RECORD]) - set(secagg.REPLY_KEYS[action])
        if extra:
            raise OutgoingContentError(f"secure aggregation reply keys outside the whitelist: {sorted(extra)}")
    if privacy_statement.RECORD in content.config_records:
        try:
            privacy_statement.check_statement(dict(content[privacy_statement.RECORD]))
        except privacy_statement.StatementError as exc:
            raise OutgoingContentError(str(exc)) from None
    if "metrics" in content.metric_records:
        extra = set(content["metrics"]) - ALLOWED_METRICS.get(message_type.split(".")[0], set())
        if extra:
            raise OutgoingContentError(f"reply metrics outside the whitelist: {sorted(extra)}")


def guarded_replies(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; let out only a whitelisted reply or a fixed error category."""
    try:
        reply = call_next(msg, context)
        if not reply.has_error():
            check_outgoing(reply, msg.metadata.message_type)
        elif reply.error.reason not in SITE_ERROR_CATEGORIES:
            raise OutgoingContentError("an error reply with a free-text reason")
        return reply
    except Exception as exc:  # noqa: BLE001 - every failure must leave as a category only
        category = error_category(exc)
        assert category in SITE_ERROR_CATEGORIES
        log.exception("%s while handling a %s message (this detail stays at the site)", category, msg.metadata.message_type)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=category), reply_to=msg)
