"""Local text data: JSONL/CSV files, tokenization, the train/validation split, batching.

Classification rows hold a text column and a label column (label names map to
ids through one shared list, so every site agrees). Causal-LM rows hold `text`,
or `prompt` + `response`, in which case only response tokens carry loss.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.config import Config

IGNORE_INDEX = -100  # label value that carries no loss (prompt tokens, padding)


class DataError(ValueError):
    """A data problem, as one line naming the file and what is wrong."""


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a local .jsonl/.json (one object per line) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path}: does not exist")
    suffix = path.suffix.lower()
    rows: list[dict[str, str]] = []
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"data file {path}: line {number} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"data file {path}: line {number} is not a JSON object")
                rows.append(row)
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise DataError(f"data file {path}: unknown format {suffix!r} (use .jsonl or .csv)")
    if not rows:
        raise DataError(f"data file {path}: is empty")
    return rows


def required_columns(config: Config, rows: list[dict]) -> list[str]:
    data = config.data
    # User-level DP needs to know whose record each row is.
    user = [config.privacy.user_column] if config.privacy.enabled and config.privacy.unit == "user" else []
    if config.model.task == "classification":
        return [data.text_column, data.label_column, *user]
    if data.text_column in rows[0]:
        return [data.text_column, *user]
    return [data.prompt_column, data.response_column, *user]


def check_columns(rows: list[dict], config: Config, source: str) -> None:
    for column in required_columns(config, rows):
        for number, row in enumerate(rows, 1):
            if column not in row:
                present = ", ".join(sorted(rows[0]))
                raise DataError(f"data file {source}: column {column!r} not found in row {number} (columns: {present})")


def label_names(rows: list[dict], column: str) -> list[str]:
    return sorted({str(row[column]) for row in rows})


def split_train_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `fraction` (at least one row) is validation."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
    train = [rows[i] for i in order[: len(rows) - n_val]]
    validation = [rows[i] for i in order[len(rows) - n_val :]]
    return train, validation


@dataclass
class Example:
    """One tokenized sequence; `labels` is a class id or per-token targets; `unit` is
    the user it belongs to under user-level DP (None: the example is its own unit)."""

    input_ids: list[int]
    labels: int | list[int]
    unit: str | None = None


def encode(rows: list[dict], tokenizer, config: Config, labels: list[str], source: str) -> list[Example]:
    examples = _encode(rows, tokenizer, config, labels, source)
    if config.privacy.enabled and config.privacy.unit == "user":
        for example, row in zip(examples, rows):
            example.unit = str(row[config.privacy.user_column])
    return examples


def _encode(rows: list[dict], tokenizer, config: Config, labels: list[str], source: str) -> list[Example]:
    data, max_len = config.data, config.model.max_length
    if config.model.task == "classification":
        label_id = {name: i for i, name in enumerate(labels)}
        texts = [str(row[data.text_column]) for row in rows]
        ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        examples = []
        for row, input_ids in zip(rows, ids):
            name = str(row[data.label_column])
            if name not in label_id:
                # Never the value itself: this message may be shown far from the data.
                raise DataError(f"data file {source}: a value of column {data.label_column!r} is not one of data.labels")
            examples.append(Example(input_ids, label_id[name]))
        return examples
    return [_encode_causal(row, tokenizer, config) for row in rows]


def _encode_causal(row: dict, tokenizer, config: Config) -> Example:
    data, max_len = config.data, config.model.max_length
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if data.text_column in row:
        ids = (bos + tokenizer(str(row[data.text_column]), add_special_tokens=False)["input_ids"] + eos)[:max_len]
        return Example(ids, list(ids))
    prompt = bos + tokenizer(str(row[data.prompt_column]), add_special_tokens=False)["input_ids"]
    response = tokenizer(str(row[data.response_column]), add_special_tokens=False)["input_ids"] + eos
    ids = (prompt + response)[:max_len]
    targets = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
    return Example(ids, targets)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(examples[0].labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    # Explicit positions: learned position embeddings need per-example [B, T] ids
    # for correct per-sample gradients (opacus #841).
    batch["position_ids"] = torch.arange(width).unsqueeze(0).expand(len(examples), width).contiguous()
    return batch
