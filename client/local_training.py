"""The local training step and local evaluation, as visible loops.

Under DP the privacy unit is one sequence: each example's loss is a per-sequence
mean (never HF's batch-wide token mean, which couples examples), batches are
Poisson-sampled with rate q = B/N, and Opacus clips and noises (privacy/dp_sgd.py).
With `privacy.unit = "user"` the unit is a user: users are sampled with q = B/U and
each sampled user's records are clipped together (privacy/user_level.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora.adapter_state import adapter_keys
from fedlora.client.frozen_prefix import FrozenPrefix, frozen_prefix
from fedlora.client.length_buckets import length_sorted_parts
from fedlora.base_model import ModelError
from fedlora.config import Config
from fedlora.text_data import IGNORE_INDEX, Example, collate
from fedlora.privacy.distributed_dp import rounded_clipped_sum
from fedlora.privacy.dp_sgd import check_per_example, mark_empty_batch, private_optimizer
from fedlora.privacy.per_example_parts import PerExampleParts
from fedlora.privacy.user_level import merge_rows_by_unit, unit_weights


@dataclass
class DPPlan:
    noise_multiplier: float
    sample_rate: float  # per privacy unit (example or user)
    steps: int
    unit: str = "example"
    units: int = 0  # privacy units at the site (examples, or users)


def privacy_units(examples: list[Example]) -> list[list[int]]:
    """The example indices of each privacy unit: one per example, or one per user."""
    if not examples or examples[0].unit is None:
        return [[i] for i in range(len(examples))]
    by_user: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_user.setdefault(example.unit, []).append(i)
    return list(by_user.values())


def poisson_batch(
    units: list[list[int]], rate: float, max_records: int, rng: torch.Generator
) -> tuple[list[int], list[int]]:
    """One Poisson-sampled batch: each unit joins independently with probability `rate`
    (a user with at most `max_records` of its records, drawn at random). Returns the
    example indices and, for each, the number of its unit within the batch."""
    chosen = (torch.rand(len(units), generator=rng) < rate).nonzero().flatten().tolist()
    rows: list[int] = []
    unit_of_row: list[int] = []
    for k, u in enumerate(chosen):
        records = units[u]
        if len(records) > max_records:
            records = [records[j] for j in torch.randperm(len(records), generator=rng)[:max_records].tolist()]
        rows += records
        unit_of_row += [k] * len(records)
    return rows, unit_of_row


class NoOpTrainingError(ModelError):
    """Local training ran its steps but no trainable tensor changed."""


def check_trained(params: list[torch.nn.Parameter], before: list[torch.Tensor], steps: int, lr: float) -> None:
    """The tripwire for silent no-op training: a known failure of some Opacus + PEFT
    combinations (opacus #820) steps tensors that are not the model's, so the loss
    looks fine and epsilon accrues while the adapter never changes. With steps > 0
    and lr > 0 some trainable tensor must differ from where it started (under DP the
    noise alone moves every one of them)."""
    if steps > 0 and lr > 0 and params and all(torch.equal(p.detach(), p0) for p, p0 in zip(params, before)):
        raise NoOpTrainingError(
            f"local training ran {steps} steps at lr {lr:g} but no trainable tensor changed: the optimizer does not "
            "update the model's own parameters (a known Opacus/PEFT version problem, opacus #820)")


@dataclass
class TrainResult:
    loss: float
    steps: int
    seconds: float


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """One loss per example: cross-entropy for classification; for a causal LM the
    mean next-token loss over that sequence's own target tokens."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    targets = labels[:, 1:]
    # Over [tokens, vocabulary] rows, not [B, vocabulary, T]: the softmax over a middle
    # dimension ran as a strided kernel that took a third of a 1.1B model's step on a GPU.
    shifted = logits[:, :-1].float()
    token_loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def on_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def batch_logits(model: torch.nn.Module, prefix: FrozenPrefix | None, examples: list[Example],
                 batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a collated batch of `examples`: through the kept frozen lower layers
    when there are some (client/frozen_prefix.py), else through the whole model."""
    if prefix is None:
        return forward_logits(model, batch)
    return prefix.logits([e.input_ids for e in examples], batch)


def kept_prefix(model: torch.nn.Module, config: Config) -> FrozenPrefix | None:
    return frozen_prefix(model) if config.train.cache_frozen_layers else None


def make_optimizer(params: list[torch.nn.Parameter], config: Config) -> torch.optim.Optimizer:
    if config.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.train.lr)
    return torch.optim.AdamW(params, lr=config.train.lr, weight_decay=0.0)


@contextmanager
def frozen(model: torch.nn.Module, factors: tuple[str, ...]) -> Iterator[None]:
    """Keep parameters whose name contains one of `factors` (e.g. "lora_A" under
    FFA-LoRA) fixed while training; the cached model gets them back afterwards."""
    params = [p for name, p in model.named_parameters() if p.requires_grad and any(f in name for f in factors)]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """DP sampling and noise must be unpredictable to the coordinator (which knows
    the run seed), so torch's generator is seeded with 64 bits drawn from the OS
    (os.urandom), not from the seeded global RNG.
    Noise is drawn on the parameters' device, so its generator lives there."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def train_locally(
    model: torch.nn.Module, examples: list[Example], config: Config, plan: DPPlan | None, pad_id: int, seed: int
) -> TrainResult:
    """`config.train.local_steps` optimizer steps on this site's examples (DP if `plan`)."""
    start = time.perf_counter()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    task, batch_size, n = config.model.task, config.train.batch_size, len(examples)
    losses: list[float] = []
    anchor = [p.detach().clone() for p in params]  # the global adapter: for FedProx and the no-op tripwire
    mu = config.train.prox_mu
    prefix = kept_prefix(model, config)  # layers below the first LoRA layer, computed once per example

    def add_proximal_gradient() -> None:
        """FedProx: the gradient of mu/2 * ||w - w_global||^2. It does not touch the
        data, so under DP it is added after clipping and noise (free post-processing)."""
        if mu > 0:
            for p, p0 in zip(params, anchor):
                p.grad.add_(p.detach() - p0, alpha=mu)

    if plan is None:  # plain LoRA training, for comparison
        order = torch.Generator().manual_seed(seed)
        for _ in range(config.train.local_steps):
            chosen = [examples[i] for i in torch.randperm(n, generator=order)[:batch_size].tolist()]
            batch = on_device(collate(chosen, pad_id), model)
            loss = sequence_losses(batch_logits(model, prefix, chosen, batch), batch["labels"], task).mean()
            loss.backward()
            add_proximal_gradient()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        check_trained(params, anchor, config.train.local_steps, config.train.lr)
        return TrainResult(sum(losses) / len(losses), config.train.local_steps, time.perf_counter() - start)

    rng = secret_generator()  # Poisson sampling, on the CPU
    noise_rng = secret_generator(params[0].device)
    units = privacy_units(examples)
    expected_batch = max(1, round(plan.sample_rate * len(units)))
    with private_optimizer(
        model, optimizer, plan.noise_multiplier, config.privacy.max_grad_norm, expected_batch, generator=noise_rng,
        impl=config.privacy.dp_impl,
    ) as (dp_model, dp_optimizer):
        # Opacus calls step_hook after clipping, noising and scaling, before the step.
        dp_optimizer.step_hook = lambda _: add_proximal_gradient()
        for _ in range(plan.steps):
            rows, unit_of_row = poisson_batch(units, plan.sample_rate, config.privacy.user_max_records, rng)
            if not rows:
                mark_empty_batch(dp_optimizer)  # still a noised, accounted step
            else:
                num_units = unit_of_row[-1] + 1
                # The sampled rows, sorted by length into micro-batches (client/length_buckets.py):
                # the same rows and per-row gradients, less padding.
                parts = length_sorted_parts([len(examples[i].input_ids) for i in rows], config.train.length_buckets)
                order = [j for part in parts for j in part]
                unit_index = torch.tensor([unit_of_row[j] for j in order])
                # Each unit's rows weigh 1/n_u (over the whole batch), so its per-row gradients
                # sum to its mean gradient.
                weights = unit_weights(unit_index, num_units)
                gathered = PerExampleParts(dp_optimizer.params)
                loss_sum, done = 0.0, 0
                for part in parts:
                    chosen = [examples[rows[j]] for j in part]
                    batch = on_device(collate(chosen, pad_id), model)
                    per_example = sequence_losses(batch_logits(dp_model, prefix, chosen, batch), batch["labels"], task)
                    part_weights = weights[done: done + len(part)].to(per_example.device)
                    (per_example * part_weights).mean().backward()
                    gathered.take()
                    loss_sum += per_example.detach().sum().item()
                    done += len(part)
                gathered.put_back()  # one batch of per-row gradients, in `order`
                if num_units < len(rows):
                    merge_rows_by_unit(dp_optimizer.params, unit_index, num_units)
                # step() refuses to clip unless every grad_sample has one row per unit (PerExampleError).
                dp_optimizer.expect_units(num_units)
                losses.append(loss_sum / len(rows))
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
    check_trained(params, anchor, plan.steps, config.train.lr)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean_loss, plan.steps, time.perf_counter() - start)


def distributed_gradient_sum(
    model: torch.nn.Module, examples: list[Example], config: Config, sample_rate: float, levels: int, pad_id: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Distributed DP's part at a site (privacy/distributed_dp.py): one Poisson sample of its
    records at `sample_rate`, each record's gradient clipped, scaled to `levels` per clipping
    norm and rounded at random, summed as integers. Returns (the int64 sum per adapter key
    of the trainable tensors, the batch size). No step is taken: the coordinator takes it."""
    model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    keys = adapter_keys(model, params)
    rows, _ = poisson_batch(privacy_units(examples), sample_rate, 1, secret_generator())
    if not rows:
        return {k: torch.zeros(p.shape, dtype=torch.int64) for k, p in zip(keys, params)}, 0
    unused = torch.optim.SGD(params, lr=0.0)  # private_optimizer wants one; it never steps
    with private_optimizer(model, unused, 0.0, config.privacy.max_grad_norm, len(rows), impl=config.privacy.dp_impl) as (dp_model, _):
        chosen = [examples[i] for i in rows]
        batch = on_device(collate(chosen, pad_id), model)
        logits = batch_logits(dp_model, kept_prefix(model, config), chosen, batch)
        sequence_losses(logits, batch["labels"], config.model.task).mean().backward()
        check_per_example(named, len(rows))  # one gradient row per record, or the clipping bounds nothing
        rounded = rounded_clipped_sum([p.grad_sample for p in params], config.privacy.max_grad_norm, levels,
                                      secret_generator(params[0].device))
    return {k: s.cpu() for k, s in zip(keys, rounded)}, len(rows)
