"""The ClientApp: what a site does with each message from the coordinator.

Everything the coordinator sends is a request. Before any data is read, every
handler checks the request (client/request_screening.py) against the site's own
policy (client/site_policy.py: node config for a deployed site,
`[simulation.site_policy]` for virtual sites) and declines what falls outside it,
naming the policy key. Settings the site owns come
from `context.node_config`: its data, its copy of the base model, its state dir
(ledger, audit log), its privacy limit, its LoRA rank.

Under DP every number that leaves is data-independent or accounted in the site's
ledger: training replies carry the adapter, the epsilon figures, the steps and a
fixed weight; evaluation replies carry Gaussian-noised sums, charged to the ledger.
Any exception leaves only as a fixed category (client/reply_guard.py).
Handlers: `query` (the site's LoRA rank), `train`, `evaluate` (their bodies in
client/training_handlers.py, imported on first use, so that the processes of the
other steps load no torch), and the four `query.secagg_*` steps of secure
aggregation around a masked `train` (client/secure_masking.py).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedlora.client import secure_masking
from fedlora.client.peer_keys import PeerKeyError, SigningKeys, site_signing_keys
from fedlora.client.reply_guard import guarded_replies
from fedlora.client.request_screening import policy_declined, screen_request, site_config
from fedlora.client.trail_signing import signed_trail
from fedlora.config import Config
from fedlora.messages import QUERY_METRICS, metric_record


def train(msg: Message, context: Context) -> Message:
    """Local training (client/training_handlers.py), imported on first use: the rank query
    and the secure-aggregation steps run in processes that never load torch."""
    from fedlora.client.training_handlers import train as handle

    return handle(msg, context)


def evaluate(msg: Message, context: Context) -> Message:
    """Local evaluation (client/training_handlers.py), imported on first use."""
    from fedlora.client.training_handlers import evaluate as handle

    return handle(msg, context)


def query(msg: Message, context: Context) -> Message:
    """The site's declaration before training: its LoRA rank."""
    config, server_round = site_config(msg, context)
    refusal, _, _ = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    metrics = metric_record({"lora-rank": config.lora.rank}, QUERY_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1 (client/secure_masking.py): screened like every request;
    a site without trusted peer keys declines, naming its `peer-keys` setting."""
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    signing = site_signing_keys(config, context.node_config)
    if signing is None:
        return policy_declined(msg, config, server_round, "peer-keys", policy, state_dir)
    return secure_masking.advertise_keys(msg, context, signing, config, server_round, state_dir, policy.min_sites)


def secagg_shares(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
    return secure_masking.share_keys(msg, context, signing_keys(config, context))


def secagg_survivors(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
    return secure_masking.sign_survivors(msg, context, signing_keys(config, context))


def secagg_reveal(msg: Message, context: Context) -> Message:
    return secure_masking.reveal_shares(msg, context)


def signing_keys(config: Config, context: Context) -> SigningKeys:
    signing = site_signing_keys(config, context.node_config)
    if signing is None:
        raise PeerKeyError("this site has no peer keys: it takes no part in secure aggregation")
    return signing


def site_app(*mods: Mod) -> ClientApp:
    """A ClientApp with the handlers above behind the reply guard, the site's key lent to
    its ledger and audit log (client/trail_signing.py), plus `mods` inside them (the
    simulation adds its virtual sites' data source, client/site_data.py)."""
    composed = ClientApp(mods=[guarded_replies, signed_trail, *mods])
    composed.train()(train)
    composed.evaluate()(evaluate)
    composed.query()(query)
    for handler in (secagg_keys, secagg_shares, secagg_survivors, secagg_reveal):
        composed.query(handler.__name__)(handler)
    return composed


app = site_app()  # a deployed site's ClientApp: its data is its own `data-path`
