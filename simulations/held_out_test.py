"""The study's exact test accuracy: the final adapter on fresh notes that no site holds.

Under DP the federated validation figure is itself a noisy release (each site adds
Gaussian noise to its counts), which at study scale is worth about ±0.05-0.1 per
figure: enough to hide the differences a study looks for. In simulation the default
dataset is a generator, so the coordinator's machine can draw `simulation.test_notes`
new notes from a seed no site's data came from and score the final adapter on them
exactly. The notes belong to no site, so this spends no site's budget; it exists
only in `fedlora simulate` on the default dataset.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fedlora.client.local_evaluation import evaluate_locally
from fedlora.config import Config
from fedlora.simulations.triage_notes import generate_notes
from fedlora.text_data import Example, collate, encode

# Added to run.seed: the sites' notes come from run.seed itself, so the test notes are
# a different draw from the same distribution.
TEST_SEED_OFFSET = 1_000_003
RESULT_FILE = "test.json"


def held_out_accuracy(run_dir: Path, config: Config) -> dict[str, float]:
    """Accuracy and mean loss of the run's final adapter on `simulation.test_notes`
    fresh notes, with its confusion matrix (rows: true label, columns: predicted, in
    data.labels order) and each label's accuracy; written to RUN_DIR/test.json and returned."""
    from peft import PeftModel

    from fedlora.base_model import load_base_model, load_tokenizer, resolve_model_dir

    labels = config.data.labels
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
    base = load_base_model(config.model, len(labels), config.run.seed)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    notes = generate_notes(config.simulation.test_notes, config.run.seed + TEST_SEED_OFFSET)
    per_note = replace(config, privacy=replace(config.privacy, enabled=False))  # each note is its own unit
    examples = encode(notes, tokenizer, per_note, labels, "test notes")
    sums = evaluate_locally(model, examples, config, tokenizer.pad_token_id)
    matrix = confusion_matrix(model, examples, config, tokenizer.pad_token_id, len(labels))
    result = {"notes": len(examples), "accuracy": sums.correct / sums.units, "loss": sums.loss / sums.units,
              "labels": list(labels), "confusion": matrix, "per_class_accuracy": per_class_accuracy(matrix)}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def confusion_matrix(model, examples: list[Example], config: Config, pad_id: int, classes: int) -> list[list[int]]:
    """counts[true][predicted] of the model's predictions on `examples`."""
    import torch

    from fedlora.client.local_training import batch_logits, kept_prefix, on_device

    model.eval()
    counts = torch.zeros(classes, classes, dtype=torch.long)
    prefix = kept_prefix(model, config)
    with torch.no_grad():
        for start in range(0, len(examples), 128):
            chosen = examples[start : start + 128]
            batch = on_device(collate(chosen, pad_id), model)
            predicted = batch_logits(model, prefix, chosen, batch).argmax(dim=-1).cpu()
            truth = batch["labels"].cpu()
            counts.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    return counts.tolist()


def per_class_accuracy(matrix: list[list[int]]) -> list[float | None]:
    """Each true label's share predicted right (None for a label with no test notes)."""
    return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(matrix)]
