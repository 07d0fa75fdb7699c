"""Properties of the synthetic triage-notes dataset that the demo relies on."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import pytest

from fedlora.simulations.triage_notes import DEPARTMENTS, _generate, generate_notes

N = 3000


@pytest.fixture(scope="module")
def notes() -> list[dict[str, str]]:
    return generate_notes(N, seed=0)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9/]+", text.lower())


def test_deterministic_and_seed_dependent(notes: list[dict[str, str]]) -> None:
    assert generate_notes(N, seed=0) == notes
    other = generate_notes(N, seed=1)
    assert other != notes
    # Not just a reshuffle: most texts differ.
    assert len({n["text"] for n in notes} & {n["text"] for n in other}) < N * 0.01


def test_size_and_schema(notes: list[dict[str, str]]) -> None:
    assert len(notes) == N
    assert generate_notes(0) == []
    assert len(generate_notes(7, seed=3)) == 7
    for n in notes:
        assert set(n) == {"text", "label"}
        assert isinstance(n["text"], str) and n["label"] in DEPARTMENTS


def test_departments_present_and_balanced(notes: list[dict[str, str]]) -> None:
    assert len(DEPARTMENTS) >= 6 and len(set(DEPARTMENTS)) == len(DEPARTMENTS)
    assert all(d == d.lower() for d in DEPARTMENTS)
    counts = Counter(n["label"] for n in notes)
    assert set(counts) == set(DEPARTMENTS)
    expected = N / len(DEPARTMENTS)
    for d in DEPARTMENTS:
        assert 0.5 * expected <= counts[d] <= 1.5 * expected, (d, counts[d])


def test_texts_mostly_distinct(notes: list[dict[str, str]]) -> None:
    assert len({n["text"] for n in notes}) > 0.95 * N


def test_word_length_bounds(notes: list[dict[str, str]]) -> None:
    lengths = [len(n["text"].split()) for n in notes]
    assert min(lengths) >= 12 and max(lengths) <= 40
    assert 18 <= sum(lengths) / N <= 35  # not all pinned to one bound


def test_negations_present(notes: list[dict[str, str]]) -> None:
    neg = re.compile(r"\b(denies|no|neg for)\s", re.IGNORECASE)
    share = sum(bool(neg.search(n["text"])) for n in notes) / N
    assert 0.4 < share < 0.95  # common, but not in every note


_VITAL = re.compile(r"\b(BP \d{2,3}/\d{2,3}|HR \d+|RR \d+|(SpO2|sat) \d+%|(T|temp) \d\d\.\d)",
                    re.IGNORECASE)
_AGE_SEX = re.compile(r"\b\d{1,2}\s?(yo|y/o|y\.o\.|-year-old)?\s?(m|f|male|female|man|woman)\b"
                      r"|\b(m|f) \d{1,2}\b", re.IGNORECASE)


def test_vitals_and_demographics_present(notes: list[dict[str, str]]) -> None:
    # A typo can hit "temp" or "female", so exact counts are checked on typo-free text.
    clean = [n["text"] for n in _generate(N, 0, typo_rate=0.0)]
    assert all(len(_VITAL.findall(t)) >= 2 for t in clean)
    assert all(_AGE_SEX.search(t) for t in clean)
    assert all(_VITAL.search(n["text"]) for n in notes)
    assert sum(bool(_AGE_SEX.search(n["text"])) for n in notes) > 0.9 * N


def test_typos_generated() -> None:
    # Typos come from a separate RNG stream, so the typo-free text aligns word by word.
    noisy = [n["text"] for n in generate_notes(1000, seed=5)]
    clean = [n["text"] for n in _generate(1000, 5, typo_rate=0.0)]
    changed = total = 0
    for a, b in zip(noisy, clean):
        wa, wb = a.split(" "), b.split(" ")
        assert len(wa) == len(wb)
        for x, y in zip(wa, wb):
            total += 1
            if x != y:
                changed += 1
                assert abs(len(x) - len(y)) <= 1 and x[0] == y[0]  # one small edit
    assert 0.03 < changed / total < 0.10


def test_no_label_noise_on_specific_complaints() -> None:
    # Unambiguous complaint phrases appear only under their own department.
    markers = {"palpitations": "cardiology", "facial droop": "neurology", "foosh": "orthopedics",
               "melena": "gastroenterology", "hemoptysis": "pulmonology", "hives": "dermatology"}
    for n in generate_notes(2000, seed=2):
        text = n["text"].lower()
        for m, dept in markers.items():
            lead = r"(c/o|presents w/|cc:|biba for|here for|reports|complains of|walk-in w/)"
            if re.search(rf"{lead} {m}", text):
                assert n["label"] == dept, n


def _naive_bayes_accuracy(train: list[dict[str, str]], test: list[dict[str, str]]) -> float:
    word_counts: dict[str, Counter[str]] = defaultdict(Counter)
    label_counts = Counter(n["label"] for n in train)
    for n in train:
        word_counts[n["label"]].update(_tokens(n["text"]))
    vocab = {w for c in word_counts.values() for w in c}
    totals = {d: sum(c.values()) for d, c in word_counts.items()}
    correct = 0
    for n in test:
        def score(d: str) -> float:
            s = math.log(label_counts[d] / len(train))
            for w in _tokens(n["text"]):
                s += math.log((word_counts[d][w] + 1) / (totals[d] + len(vocab)))
            return s
        correct += max(label_counts, key=score) == n["label"]
    return correct / len(test)


def _keyword_accuracy(test: list[dict[str, str]]) -> float:
    keywords = {"cardiology": ["chest", "palpitations", "heart", "cp"],
                "neurology": ["headache", "weakness", "seizure", "numbness", "vertigo", "speech"],
                "orthopedics": ["knee", "ankle", "wrist", "hip", "shoulder", "fall", "fx"],
                "gastroenterology": ["abd", "abdominal", "vomiting", "diarrhea", "melena", "n/v"],
                "pulmonology": ["cough", "wheezing", "sob", "dyspnea", "sputum"],
                "dermatology": ["rash", "hives", "skin", "lesion", "itchy"]}
    lookup = {w: d for d, ws in keywords.items() for w in ws}
    correct = 0
    for n in test:
        first = next((lookup[t] for t in _tokens(n["text"]) if t in lookup), None)
        correct += first == n["label"]
    return correct / len(test)


def test_learnable_but_not_keyword_trivial() -> None:
    data = generate_notes(2500, seed=11)
    train, test = data[:2000], data[2000:]
    nb = _naive_bayes_accuracy(train, test)
    kw = _keyword_accuracy(test)
    assert nb > 0.8, nb  # the text carries the label
    assert nb < 0.995, nb  # shared symptoms keep it from being perfectly separable
    assert kw < 0.85, kw  # negations/shared symptoms fool a first-keyword rule
    assert kw > 1.5 / len(DEPARTMENTS)  # yet keywords are still informative
