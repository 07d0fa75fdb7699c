"""A request's first steps at a site, before any of its data is read: the run config
with the site's own choices (its model copy, its LoRA rank), the audit entry, the
check against the site's policy and the base model's fingerprint, and the decline
that names the policy key. The one step that reads data, the site's minimum cohort
(`min-records`, client/site_cohort.py), counts the site's own units under its own
policy, so its answer is the same whatever the request. Every handler (client/client_app.py,
client/training_handlers.py) starts here."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict

from fedlora.base_fingerprint import model_fingerprint
from fedlora.client.site_cohort import below_min_records
from fedlora.client.site_policy import SitePolicy, round_outside_plan, site_policy, site_state_dir, violation
from fedlora.config import Config
from fedlora.messages import DECLINED_METRICS, POLICY_METRIC_PREFIX, REFUSED_METRICS, metric_record, read_config_record, sent_fingerprint
from fedlora.model_folder import resolve_model_dir
from fedlora.privacy.site_audit import EVALUATION_READ, append_audit, read_audit
from fedlora.privacy.site_ledger import Declined, SiteLedger, open_ledger

log = logging.getLogger("fedlora.client")


def site_rank(config: Config, node_config: dict) -> int:
    """This site's LoRA rank: node config `lora-rank`, else its entry in
    `simulation.client_ranks` (virtual sites), else the run's `lora.rank`."""
    if "lora-rank" in node_config:
        return int(node_config["lora-rank"])
    ranks = config.simulation.client_ranks
    if ranks and "partition-id" in node_config:
        return ranks[int(node_config["partition-id"]) % len(ranks)]
    return config.lora.rank


def site_config(msg: Message, context: Context) -> tuple[Config, int]:
    """The run config with the site's own choices: its copy of the base model and its
    LoRA rank (alpha scaled with it, so alpha/rank and thus B·A's scale match the run's)."""
    config, server_round = read_config_record(msg.content["config"])
    if "model-path" in context.node_config:
        config.model.path = str(context.node_config["model-path"])
    if "device" in context.node_config:  # the site knows its hardware
        config.train.device = str(context.node_config["device"])
    rank = site_rank(config, context.node_config)
    config.lora.alpha, config.lora.rank = config.lora.alpha * rank / config.lora.rank, rank
    return config, server_round


def requested(config: Config) -> dict:
    """What a run asks of the site, as the audit log records it (settings only, never data)."""
    p, d = config.privacy, config.data
    return {
        "dp": p.enabled, "target_epsilon": p.target_epsilon, "eval_epsilon": p.eval_epsilon, "delta": p.delta,
        "accountant": p.accountant, "unit": p.unit, "user_column": p.user_column, "rounds": config.federation.rounds,
        "columns": [d.text_column, d.label_column, d.prompt_column, d.response_column], "model": config.model.path,
    }


def screen_request(msg: Message, context: Context, config: Config, server_round: int) -> tuple[Message | None, SitePolicy, Path]:
    """(a refusal or decline, or None; the site's policy; its state dir). Runs before any
    of the site's data is read: the request is audited, then checked against the policy,
    then the base model's fingerprint against the coordinator's."""
    policy = site_policy(config, context.node_config)
    state_dir = site_state_dir(config, context.node_config)
    kind = msg.metadata.message_type.split(".")[0]
    run = config.run.output_dir
    append_audit(state_dir, "request", run, message=kind, round=server_round, asks=requested(config))
    key = violation(policy, config)
    if key is None and round_outside_plan(msg.metadata.message_type, server_round, config):
        key = "round"
    if key is None and kind == MessageType.EVALUATE and policy.max_evaluations:
        # Every evaluation that read data counts, completed or not (privacy/site_audit.py).
        done = sum(1 for e in read_audit(state_dir) if e["event"] == EVALUATION_READ and e["run"] == run)
        key = "max-evaluations" if done >= policy.max_evaluations else None
    if key is None and below_min_records(config, context.node_config, policy):
        key = "min-records"  # the key, never the count
    if key is not None:
        return policy_declined(msg, config, server_round, key, policy, state_dir), policy, state_dir
    expected = sent_fingerprint(msg.content["config"])
    if expected:
        local = model_fingerprint(resolve_model_dir(config.model.path), state_dir)  # weight hashes kept between processes
        if local != expected:
            log.error("refusing: this site's base model %s (fingerprint %s) is not the coordinator's (%s)",
                      config.model.path, local, expected)
            metrics = metric_record({"refused-base-model": 1}, REFUSED_METRICS)
            return Message(content=RecordDict({"metrics": metrics}), reply_to=msg), policy, state_dir
    return None, policy, state_dir


def policy_declined(msg: Message, config: Config, server_round: int, key: str, policy: SitePolicy, state_dir: Path,
                    ledger: SiteLedger | None = None) -> Message:
    """A decline naming the policy key the request falls outside of (recorded in the ledger and the audit log).
    `ledger`: the site's ledger where the caller holds it open (a second open would wait for its own lock)."""
    kind, run = msg.metadata.message_type.split(".")[0], config.run.output_dir
    log.warning("round %d %s: declined: the run asks for more than this site's policy allows (%s)", server_round, kind, key)
    append_audit(state_dir, "declined", run, message=kind, round=server_round, reason=f"site policy: {key}")
    decline = Declined(server_round, None, None, policy.max_epsilon, reason=f"site policy: {key}", message=kind)
    if ledger is not None:
        ledger.record(run, config.privacy.accountant, config.privacy.delta, decline, policy.max_epsilon)
    else:
        with open_ledger(state_dir) as ledger:
            ledger.record(run, config.privacy.accountant, config.privacy.delta, decline, policy.max_epsilon)
    metrics = metric_record({"declined": 1, POLICY_METRIC_PREFIX + key: 1}, DECLINED_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
