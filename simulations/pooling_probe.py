"""Which sequence features should a classifier read? A measurement on the default task.

`python -m fedlora.simulations.pooling_probe` encodes the default dataset once with the frozen
embedded all-MiniLM-L6-v2 and compares three features for a linear head:
- "pooler": tanh(pooler.dense([CLS])), what AutoModelForSequenceClassification reads;
- "cls": the last hidden state of [CLS];
- "mean": the masked mean of the last hidden states (what the model was trained for).
For each it prints (1) a linear probe's validation accuracy (L-BFGS, no DP: the ceiling
of a head on frozen features) and (2) federated head-only DP-SGD: 5 sites, FedAvg,
Poisson sampling, per-example clipping and Gaussian noise calibrated with fedlora's
accountant to `--epsilon` over the run's steps, on the sites of `fedlora simulate`
(same partition and validation split). The backbone is frozen here, so this isolates
the head's input; it is a probe, not a substitute for a real run.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.base_model import default_model_dir, load_tokenizer
from fedlora.config import Config
from fedlora.mean_pooling import masked_mean
from fedlora.text_data import split_train_validation
from fedlora.privacy.accounting import calibrate_noise, sample_rate
from fedlora.simulations.virtual_sites import _partition, dataset_labels, dataset_rows

FEATURES = ("pooler", "cls", "mean")


@torch.no_grad()
def encode_features(config: Config, rows: list[dict]) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    folder = default_model_dir()
    tokenizer = load_tokenizer(folder)
    model = AutoModel.from_pretrained(str(folder)).eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    texts = [str(r[config.data.text_column]) for r in rows]
    for start in range(0, len(texts), 128):
        batch = tokenizer(texts[start:start + 128], truncation=True, max_length=config.model.max_length, padding=True,
                          return_tensors="pt")
        result = model(**batch)
        out["pooler"].append(result.pooler_output)
        out["cls"].append(result.last_hidden_state[:, 0])
        out["mean"].append(masked_mean(result.last_hidden_state, batch["attention_mask"]))
        print(f"\rencoding {min(start + 128, len(texts))}/{len(texts)}", end="", flush=True)
    print()
    return {name: torch.cat(parts) for name, parts in out.items()}


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, val: torch.Tensor, classes: int) -> float:
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x[train]), y[train]) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return float((head(x[val]).argmax(1) == y[val]).float().mean())


def federated_dp_head(x: torch.Tensor, y: torch.Tensor, sites: list[tuple[torch.Tensor, torch.Tensor]], classes: int,
                      rounds: int, steps: int, batch: int, lr: float, clip: float, epsilon: float, seed: int) -> float:
    """FedAvg of DP-SGD on a linear head; per-example gradients in closed form."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    init = torch.nn.Linear(x.shape[1], classes)
    w, b = init.weight.detach().T.clone(), init.bias.detach().clone()
    for _ in range(rounds):
        updates = []
        for train, _ in sites:
            n = len(train)
            q = sample_rate(batch, n)
            sigma = calibrate_noise(epsilon, 1e-5, q, rounds * steps, "prv")
            lw, lb = w.clone(), b.clone()
            for _ in range(steps):
                idx = train[torch.rand(n, generator=g) < q]
                p = torch.softmax(x[idx] @ lw + lb, 1)
                p[torch.arange(len(idx)), y[idx]] -= 1  # d loss / d logits, per example
                gw, gb = x[idx][:, :, None] * p[:, None, :], p
                norms = (gw.flatten(1).square().sum(1) + gb.square().sum(1)).sqrt()
                scale = (clip / (norms + 1e-6)).clamp(max=1.0)
                expected = max(1, round(q * n))
                lw -= lr * ((gw * scale[:, None, None]).sum(0) + torch.randn(lw.shape, generator=g) * sigma * clip) / expected
                lb -= lr * ((gb * scale[:, None]).sum(0) + torch.randn(lb.shape, generator=g) * sigma * clip) / expected
            updates.append((lw, lb, n))
        total = sum(n for *_, n in updates)
        w = sum(lw * (n / total) for lw, _, n in updates)
        b = sum(lb * (n / total) for _, lb, n in updates)
    val = torch.cat([v for _, v in sites])
    return float(((x[val] @ w + b).argmax(1) == y[val]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--partition", choices=("dirichlet", "iid"), default="dirichlet")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = Config()
    rows, labels = dataset_rows(config), dataset_labels(config)
    y = torch.tensor([labels.index(str(r[config.data.label_column])) for r in rows])
    start = time.perf_counter()
    features = encode_features(config, rows)
    print(f"encoded {len(rows)} notes in {time.perf_counter() - start:.0f} s")
    sim = config.simulation
    parts = _partition(sim.dataset, sim.dataset_size, config.run.seed, args.partition, sim.alpha, sim.clients, config.data.label_column)
    sites = []
    for i, part in enumerate(parts):
        train, val = split_train_validation(list(part), config.data.validation_fraction, seed=config.run.seed + i)
        sites.append((torch.tensor(train), torch.tensor(val)))
    train_all, val_all = torch.cat([t for t, _ in sites]), torch.cat([v for _, v in sites])
    print(f"| features | linear probe, no DP | federated head-only DP-SGD, epsilon {args.epsilon:g}, {args.partition} "
          f"(5 rounds x 4 steps, batch 64, lr 4; mean ± sd of {args.seeds} seeds) |")
    print("| --- | --- | --- |")
    for name in FEATURES:
        x = features[name]
        probe = linear_probe(x, y, train_all, val_all, len(labels))
        accs = torch.tensor([federated_dp_head(x, y, sites, len(labels), 5, 4, 64, 4.0, 1.0, args.epsilon, s)
                             for s in range(args.seeds)])
        spread = f" ± {accs.std().item():.3f}" if len(accs) > 1 else ""
        print(f"| {name} | {probe:.3f} | {accs.mean().item():.3f}{spread} |", flush=True)


if __name__ == "__main__":
    main()
