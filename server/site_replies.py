"""What a site sends back, read defensively, and how much weight it may claim.

The site is sovereign, so the coordinator trusts nothing in a reply: it must neither
crash on it nor be steered by it.

**Malformed replies.** Each reply is parsed in full before anything uses it. A reply
that lacks a record or a key, has a value of the wrong type (a string where a number
belongs, a list, NaN or infinity, a negative epsilon), or arrays that are not plain
fp32 ``.npy`` data (int, fp16 or bf16 tensors; bytes that do not deserialize; a header
that disagrees with the declared dtype or shape) is one failure of the fixed category
``"error: malformed reply: <field>"``, `field` one of `FIELDS`. What exactly was wrong
goes to the coordinator's log only: the categories in metrics.jsonl stay few and fixed,
and no text chosen by a site reaches them. This holds for train, evaluate and
rank-query replies. A train reply's `num-examples` must be a finite number; zero or
less is left to `screen_updates` ("rejected: num-examples", as before). An evaluate
reply's sums may be negative (noise under DP); they must be finite.

Arrays are read from the ``.npy`` header and bytes here, not with `np.load`: the
header's dtype must be native fp32, its shape the declared one, and the data exactly
that many bytes, checked before anything is allocated (a forged header cannot make the
coordinator allocate what the site did not send).

**Bounded weights.** A site's aggregation weight is what it claims (num-examples;
under DP its unit count rounded down to a power of two, client/client_app.py
`size_bucket`), capped at ``strategy.max_weight_factor`` (k) times the *lower* median
of the claims of the round's accepted updates (all attempts of the round together):
``w_i = min(n_i, floor(k * lower_median(n)))``. The lower median can only be raised
by more than half of the sites together, so a minority cannot lift the cap; with one
inflating site among n, its share is at most k / (k + n - 1). k = 0 turns the cap off.

The default k = 3: in the default 5-site federation a single site can never outweigh
the other four together (3/7 < 1/2), even when it claims 1e9 examples; with two sites,
the lower median is the smaller claim, so the larger gets at most 3/4. Honest
heterogeneity is kept: DP weights are powers of two, so a site one bucket above the
median (2x) is untouched and one two buckets above (4x) keeps 3/4 of its weight (the
default demo's Dirichlet(0.5) partitions have honest max/median of 1x to 4x). The
metrics row reports the largest share of the round's aggregation as
`max_weight_share`: 1/n where every update weighs the same (central DP, median,
trimmed-mean).

**Evaluation metrics** are ratios of sums that sites release with noise under DP
(`eval-correct` / `num-examples`). A site's share of them is bounded the same way:
when its reported count exceeds k times the lower median of the counts, both its sums
are scaled by cap / count, which keeps its own ratio and caps its weight. What is not
bounded is a site's own ratio: clamping each site's sums to [0, count] would bias every
honest DP site's noisy sums (a site with high accuracy would be pulled down by about
the noise's half-normal mean each round), so only the final metric is clamped to what a
mean can be. A lying site can thus move the *reported* metrics by at most its bounded
share times its lie, up to that clamp; it cannot move the model, which does not depend
on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora.adapter_state import Adapter
from fedlora.config import Config
from fedlora.flower_internals import SType
from fedlora.strategies.base import ClientUpdate

MALFORMED = "error: malformed reply"
# The fields a malformed-reply category can name (and nothing else: the categories stay fixed).
FIELDS = ("metrics", "arrays", "num-examples", "epsilon", "eval-loss-sum", "eval-correct", "lora-rank")
# The largest LoRA rank a site may declare: the coordinator builds an adapter of that rank
# for it, so an unbounded declaration could make the coordinator allocate without bound.
MAX_LORA_RANK = 1024
# Strategies that ignore the weights (every accepted update counts the same).
UNWEIGHTED_STRATEGIES = ("median", "trimmed-mean")
FP32 = np.dtype("<f4")


class MalformedReply(ValueError):
    """A reply the coordinator cannot use; `category` is what metrics.jsonl counts."""

    def __init__(self, field: str, detail: str):
        assert field in FIELDS, field
        self.field, self.detail = field, detail
        super().__init__(f"{field}: {detail}")

    @property
    def category(self) -> str:
        return f"{MALFORMED}: {self.field}"


def _short(key: Any) -> str:
    """A site-chosen name, safe for one log line."""
    return repr(str(key)[:60])


def metrics_of(reply: Message) -> MetricRecord:
    """The reply's MetricRecord "metrics" (MalformedReply if there is none)."""
    records = reply.content.metric_records
    if "metrics" not in records:
        raise MalformedReply("metrics", "no MetricRecord 'metrics'")
    return records["metrics"]


def metrics_or_empty(reply: Message) -> MetricRecord | dict:
    """The reply's MetricRecord "metrics", or {} (for reports that skip what is missing)."""
    try:
        return reply.content.metric_records.get("metrics", {})
    except Exception:  # noqa: BLE001 - an error reply has no content: nothing to report
        return {}


def number(metrics: MetricRecord | dict, key: str) -> float | None:
    """`metrics[key]` as a finite float; None if missing, not a scalar number, or not finite."""
    value = metrics.get(key) if hasattr(metrics, "get") else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) else None


def required_number(metrics: MetricRecord | dict, key: str, minimum: float | None = None) -> float:
    if key not in metrics:
        raise MalformedReply(key, "missing")
    value = number(metrics, key)
    if value is None:
        raise MalformedReply(key, f"not a finite number ({type(metrics[key]).__name__})")
    if minimum is not None and value < minimum:
        raise MalformedReply(key, f"{value:g} < {minimum:g}")
    return value


def _npy_fp32(data: bytes, declared: tuple[int, ...]) -> np.ndarray:
    """The fp32 array in `data` (one .npy file), or ValueError."""
    fp = BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"npy version {version}")
    if dtype != FP32:
        raise ValueError(f"dtype {dtype.str}, not fp32")
    if tuple(shape) != declared:
        raise ValueError(f"header shape {tuple(shape)} != declared {declared}")
    count = math.prod(shape)
    body = data[fp.tell():]
    if len(body) != count * FP32.itemsize:
        raise ValueError(f"{len(body)} data bytes for {count} fp32 values")
    return np.frombuffer(body, dtype=FP32).reshape(shape, order="F" if fortran else "C")


def adapter_from_record(record: ArrayRecord) -> Adapter:
    """Strictly fp32 tensors from a site's ArrayRecord (MalformedReply on anything else).
    Unlike `from_record`, nothing is converted: an int or fp16 tensor is refused, not cast."""
    adapter: Adapter = {}
    for key in list(record.keys()):
        array = record[key]
        dtype, shape, stype, data = (getattr(array, a, None) for a in ("dtype", "shape", "stype", "data"))
        if stype != SType.NUMPY or dtype != "float32":
            raise MalformedReply("arrays", f"{_short(key)}: {_short(stype)} of {_short(dtype)}, not numpy fp32")
        if not isinstance(data, bytes) or not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise MalformedReply("arrays", f"{_short(key)}: no bytes or no valid shape")
        try:
            values = _npy_fp32(data, tuple(shape))
        except Exception as exc:  # noqa: BLE001 - whatever numpy makes of hostile bytes
            raise MalformedReply("arrays", f"{_short(key)}: not deserializable ({str(exc)[:80]})") from None
        adapter[str(key)] = torch.from_numpy(np.ascontiguousarray(values).copy())
    return adapter


@dataclass
class ClaimedUpdate(ClientUpdate):
    """A ClientUpdate that remembers the weight its site claimed (num_examples may be capped)."""

    claimed: int = 0


def claimed_weight(update: ClientUpdate) -> int:
    return update.claimed if isinstance(update, ClaimedUpdate) else update.num_examples


def train_update(reply: Message) -> ClaimedUpdate:
    """A trained (not declining) train reply as an update weighted by its claim."""
    metrics = metrics_of(reply)
    if "arrays" not in reply.content.array_records:
        raise MalformedReply("arrays", "no ArrayRecord 'arrays'")
    num_examples = int(required_number(metrics, "num-examples"))
    required_number(metrics, "epsilon", minimum=0.0)
    adapter = adapter_from_record(reply.content.array_records["arrays"])
    return ClaimedUpdate(reply.metadata.src_node_id, adapter, num_examples, claimed=num_examples)


@dataclass(frozen=True)
class Evaluation:
    node_id: int
    num_examples: float  # noisy under DP (it may even be negative)
    loss_sum: float
    correct: float | None
    epsilon: float


def evaluation(reply: Message, classification: bool) -> Evaluation:
    """An evaluate reply that did not decline, checked in full."""
    metrics = metrics_of(reply)
    return Evaluation(
        node_id=reply.metadata.src_node_id,
        num_examples=required_number(metrics, "num-examples"),
        loss_sum=required_number(metrics, "eval-loss-sum"),
        correct=required_number(metrics, "eval-correct") if classification else number(metrics, "eval-correct"),
        epsilon=required_number(metrics, "epsilon", minimum=0.0),
    )


def lora_rank(reply: Message) -> int:
    """The LoRA rank a rank-query reply declares: an integer in [1, MAX_LORA_RANK]."""
    rank = required_number(metrics_of(reply), "lora-rank")
    if not rank.is_integer() or not 1 <= rank <= MAX_LORA_RANK:
        raise MalformedReply("lora-rank", f"{rank:g} is not an integer in [1, {MAX_LORA_RANK}]")
    return int(rank)


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def weight_cap(claims: list[float], factor: float) -> float | None:
    """factor x the lower median of the claims; None = no cap (factor 0, no claims,
    or a median <= 0, as noisy evaluation counts of tiny sites can have)."""
    if factor <= 0 or not claims:
        return None
    mid = lower_median(claims)
    return factor * mid if mid > 0 else None


def capped_updates(updates: Iterable[ClientUpdate], factor: float) -> list[ClaimedUpdate]:
    """The updates with num_examples = min(claimed, floor(factor x lower median of the
    claims)) (at least 1), computed from the claims, so capping again changes nothing."""
    updates = list(updates)
    claims = [claimed_weight(u) for u in updates]
    cap = weight_cap(claims, factor)
    limit = None if cap is None else max(1, math.floor(cap))
    out = []
    for u, claim in zip(updates, claims):
        weight = claim if limit is None else min(claim, limit)
        fields = {k: v for k, v in vars(u).items() if k not in ("num_examples", "claimed")}
        out.append(ClaimedUpdate(**fields, num_examples=weight, claimed=claim))
    return out


def max_weight_share(updates: Iterable[ClientUpdate], config: Config) -> float | None:
    """The largest share of one update in the round's aggregation (None without updates)."""
    weights = [u.num_examples for u in updates]
    if not weights:
        return None
    if config.privacy.central or config.strategy.name in UNWEIGHTED_STRATEGIES:
        return 1.0 / len(weights)
    total = sum(weights)
    return max(weights) / total if total > 0 else None


def capped_scales(counts: list[float], factor: float) -> list[float]:
    """Per site, the factor (<= 1) that scales its sums so that its count is at most
    `factor` x the lower median of the counts."""
    cap = weight_cap(counts, factor)
    return [cap / n if cap is not None and n > cap else 1.0 for n in counts]
