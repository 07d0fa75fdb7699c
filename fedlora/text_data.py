"""Local text data: JSONL/CSV files, tokenization, the train/validation split, batching.

Classification rows hold a text column and a label column (label names map to
ids through one shared list, so every site agrees). Causal-LM rows hold `text`,
or `prompt` + `response`, in which case only response tokens carry loss.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from fedlora.config import Config

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value that carries no loss (prompt tokens, padding)


class DataError(ValueError):
    """A data problem, as one line naming the file and what is wrong."""


class Rows(list):
    """A data file's rows, with the line of the file each one starts on, so that an error
    can name the line (a plain list of rows works everywhere too: errors then say "row N")."""

    def __init__(self, rows: list[dict[str, str]], lines: list[int]):
        super().__init__(rows)
        self.lines = lines


def row_place(rows: list[dict], index: int) -> str:
    """'row N' (1-based), with ' (line L)' where the file's line is known."""
    lines = getattr(rows, "lines", None)
    return f"row {index + 1}" + (f" (line {lines[index]})" if lines and index < len(lines) else "")


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a local .jsonl/.json (one object per line) or .csv file, as `Rows`.
    Errors are one line naming the file and the line, never a value from it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path}: does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"data file {path}: unknown format {suffix!r} (use .jsonl or .csv)")
    text = _utf8_text(path)
    rows = _jsonl_rows(text, path) if suffix in (".jsonl", ".json") else _csv_rows(text, path)
    if not rows:
        raise DataError(f"data file {path}: is empty")
    return rows


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"data file {path}: line {line} is not UTF-8 text (a binary file, or another encoding?)") from None
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL characters
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"data file {path}: line {line} holds a NUL byte (a binary file?)")
    return text.removeprefix("\ufeff")  # a byte-order mark, as some spreadsheet programs write


def _jsonl_rows(text: str, path: Path) -> Rows:
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"data file {path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {path}: line {number} is not a JSON object")
        rows.append(row)
        lines.append(number)
    return Rows(rows, lines)


def _csv_rows(text: str, path: Path) -> Rows:
    # strict: an unterminated quote is an error, not one giant field swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, lines = [], []
    header: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            if header is None:
                header = fields
                if len(set(header)) != len(header) or not all(h.strip() for h in header):
                    raise DataError(f"data file {path}: line 1: the header has an empty or repeated column name")
            elif fields:  # csv gives [] for a blank line
                if len(fields) > len(header):
                    raise DataError(f"data file {path}: line {start} has {len(fields)} fields, the header has {len(header)}")
                # A short row's missing fields are None, as csv.DictReader reads them (an empty value).
                rows.append({**dict.fromkeys(header), **dict(zip(header, fields))})
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        # csv's messages name the problem ("unexpected end of data"), never the field's text.
        raise DataError(f"data file {path}: line {start}: not valid CSV ({exc})") from None
    return Rows(rows, lines)


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
    """Every row has the task's columns, each with a non-empty value (JSON null and
    blank strings are empty). Errors name the row and column, never a value."""
    for column in required_columns(config, rows):
        for index, row in enumerate(rows):
            if column not in row:
                present = ", ".join(sorted(rows[0]))
                raise DataError(f"data file {source}: {row_place(rows, index)}: column {column!r} not found (columns: {present})")
            value = row[column]
            if value is None or not str(value).strip():
                raise DataError(f"data file {source}: {row_place(rows, index)}: column {column!r} is empty")


def label_names(rows: list[dict], column: str) -> list[str]:
    return sorted({str(row[column]) for row in rows})


def classification_labels(rows: list[dict], column: str, source: str) -> list[str]:
    """The label names of a classification dataset, which needs at least two."""
    names = label_names(rows, column)
    if len(names) < 2:
        raise DataError(f"data file {source}: column {column!r} has {len(names)} distinct value(s); classification needs at least 2")
    return names


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
    import torch  # here, not at import: reading and checking a site's rows needs no torch

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
