"""A site encodes its rows once per process (client/site_data.encoded_splits): the same rows,
settings and tokenizer give the examples encoded before, and anything they are a function of
(a row's text or label, the split's seed, the maximum length, the labels) encodes afresh."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedlora.base_model import load_tokenizer, resolve_model_dir
from fedlora.client import site_data
from fedlora.client.site_data import encoded_splits
from fedlora.config import Config
from fedlora.text_data import encode, split_train_validation

LABELS = ["a", "b"]


class CountingTokenizer:
    """The real default tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts) if isinstance(texts, list) else 1
        return self.tokenizer(texts, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("default"))


def rows(count: int = 40) -> list[dict]:
    return [{"text": f"note {i}: chest pain and shortness of breath for {i} days", "label": LABELS[i % 2]} for i in range(count)]


def fresh_encoding(data: list[dict], config: Config, tokenizer, site_number: int = 0):
    train, validation = split_train_validation(data, config.data.validation_fraction, seed=config.run.seed + site_number)
    return encode(train, tokenizer, config, LABELS, "site.jsonl"), encode(validation, tokenizer, config, LABELS, "site.jsonl")


def as_pairs(examples) -> list[tuple]:
    return [(e.input_ids, e.labels, e.unit) for e in examples]


def test_the_same_rows_are_encoded_once_and_give_what_a_fresh_encoding_gives(tokenizer):
    site_data._encodings.clear()
    config, counting, data = Config(), CountingTokenizer(tokenizer), rows()
    first = encoded_splits(data, config, LABELS, "site.jsonl", 0, counting)
    assert counting.texts == len(data)
    again = encoded_splits([dict(r) for r in data], config, LABELS, "site.jsonl", 0, counting)  # equal rows, new objects
    assert counting.texts == len(data)  # not tokenized again
    expected = fresh_encoding(data, config, tokenizer)
    for got in (first, again):
        assert [as_pairs(split) for split in got] == [as_pairs(split) for split in expected]
    # Fresh lists each time: a caller that drops an example does not change the next message's.
    again[0].pop()
    assert len(encoded_splits(data, config, LABELS, "site.jsonl", 0, counting)[0]) == len(first[0])


@pytest.mark.parametrize("change", ["text", "label", "site number", "seed", "max length", "labels"])
def test_anything_the_examples_depend_on_encodes_afresh(tokenizer, change):
    site_data._encodings.clear()
    config, counting, data = Config(), CountingTokenizer(tokenizer), rows()
    before = encoded_splits(data, config, LABELS, "site.jsonl", 0, counting)
    labels, site_number = list(LABELS), 0
    if change == "text":
        data = [dict(r) for r in data]
        data[3]["text"] = "a different note about a rash"
    elif change == "label":
        data = [dict(r) for r in data]
        data[3]["label"] = "b" if data[3]["label"] == "a" else "a"
    elif change == "site number":
        site_number = 1
    elif change == "seed":
        config = replace(config, run=replace(config.run, seed=7))
    elif change == "max length":
        config = replace(config, model=replace(config.model, max_length=8))
    elif change == "labels":
        labels = ["b", "a"]
    after = encoded_splits(data, config, labels, "site.jsonl", site_number, counting)
    assert counting.texts == 2 * len(data)  # encoded again
    assert [as_pairs(split) for split in after] != [as_pairs(split) for split in before]


def test_a_bounded_number_of_encodings_is_kept(tokenizer):
    site_data._encodings.clear()
    config = Config()
    for number in range(site_data.KEPT_ENCODINGS + 5):
        encoded_splits(rows(6), config, LABELS, "site.jsonl", number, tokenizer)
    assert len(site_data._encodings) == site_data.KEPT_ENCODINGS


def test_every_round_of_a_run_reads_the_encoding_of_its_first(tokenizer):
    """The key is the whole config a message carries; it is the same in every round (the
    round travels apart from it), so a run's site tokenizes its rows once."""
    from fedlora.messages import config_record, read_config_record

    site_data._encodings.clear()
    counting, data = CountingTokenizer(tokenizer), rows()
    for server_round in (1, 2, 57):
        config, got_round = read_config_record(config_record(Config(), server_round, "fingerprint"))
        assert got_round == server_round
        encoded_splits(data, config, LABELS, "site.jsonl", 0, counting)
    assert counting.texts == len(data)
