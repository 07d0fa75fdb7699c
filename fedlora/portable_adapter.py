"""A run's adapter, loadable wherever its run directory is copied.

PEFT records the base model in `adapter_config.json` as `base_model_name_or_path`. For
the embedded default model, that path would lie inside one installation's
site-packages, so a run directory copied to another machine (or another clone) would
name a folder that is not there. The adapter therefore records its base by a portable
name, the embedded model's Hub id, in `adapter_config.json` and, with the base's
fingerprint (fedlora/base_fingerprint.py), in `adapter/base-model.json`. A user's own
model folder keeps its absolute path: it has no other name fedlora could resolve.

`load_adapter(run_dir)` (also `fedlora.load_adapter`) resolves that record on this
machine, refuses a base whose fingerprint differs (another checkpoint, a corrupted copy),
and returns the model with its tokenizer and label names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.base_fingerprint import model_fingerprint
from fedlora.model_folder import DEFAULT_MODEL_NAME, ModelError, resolve_model_dir

BASE_FILE = "base-model.json"


def portable_name(model_path: str) -> str:
    """What an adapter records as its base: the embedded model's Hub id for "default",
    else the local folder's absolute path."""
    return DEFAULT_MODEL_NAME if model_path == "default" else str(resolve_model_dir(model_path))


def write_base_record(adapter_dir: Path, model_path: str) -> str:
    """Write `adapter_dir/base-model.json` for the base at `model_path` (model.path);
    returns the portable name, for adapter_config.json."""
    name = portable_name(model_path)
    record = {"base_model": name, "fingerprint": model_fingerprint(resolve_model_dir(model_path))}
    (adapter_dir / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return name


def verified_base(adapter_dir: Path, model_path: str | None = None) -> Path:
    """The folder of the base model the adapter in `adapter_dir` was trained on, on this
    machine: the recorded name resolved (or `model_path`, a local folder or "default"),
    and its fingerprint checked against the recorded one. Raises ModelError (one line)."""
    record_file = adapter_dir / BASE_FILE
    try:
        record = json.loads(record_file.read_text())
        recorded, fingerprint = str(record["base_model"]), str(record["fingerprint"])
    except FileNotFoundError:
        raise ModelError(f"{record_file}: missing (a run from before fedlora recorded its base model); load the adapter "
                         "with peft.PeftModel.from_pretrained on the base folder the run used") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{record_file}: not a base-model record (keys base_model, fingerprint)") from None
    path = model_path or ("default" if recorded == DEFAULT_MODEL_NAME else recorded)
    try:
        folder = resolve_model_dir(path)
    except ModelError as exc:
        raise ModelError(f"{record_file}: base model {recorded!r} is not here ({exc}); pass model_path=FOLDER "
                         "(`fedlora export --model-path`) to name its folder on this machine") from None
    actual = model_fingerprint(folder)
    if actual != fingerprint:
        raise ModelError(f"{folder}: base model fingerprint {actual} is not {fingerprint}, the one the adapter was "
                         f"trained on ({record_file}); refusing another base model")
    return folder


@dataclass
class LoadedAdapter:
    """A run's final adapter on its verified base model, in eval mode."""

    model: Any  # peft.PeftModel
    tokenizer: Any  # transformers tokenizer of the base model
    labels: list[str]  # classification: class names in class-id order; causal LM: []
    base_folder: Path


def load_adapter(run_dir: str | Path, model_path: str | None = None) -> LoadedAdapter:
    """The final adapter of the run in `run_dir` (its `adapter/`, `config.toml` and
    `labels.json`), on its base model resolved on this machine and verified by
    fingerprint. `model_path` names the base's folder where the recorded one is not here
    (a user's own model folder on another machine)."""
    from peft import PeftModel

    from fedlora.base_model import load_base_model, load_tokenizer
    from fedlora.config import ConfigError, load_config

    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{run_dir}: no final adapter yet (adapter/adapter_model.safetensors); has the run finished?")
    folder = verified_base(adapter_dir, model_path)
    config = load_config(run_dir / "config.toml")
    labels: list[str] = []
    if config.model.task == "classification":
        labels_file = run_dir / "labels.json"
        labels = json.loads(labels_file.read_text()) if labels_file.is_file() else list(config.data.labels)
    # The head (a modules_to_save) is in the adapter: its seeded initialisation is overwritten.
    base = load_base_model(replace(config.model, path=str(folder)), max(1, len(labels)), config.run.seed)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    # In memory the base is this machine's folder: with the portable name, PEFT's state-dict
    # calls (get_peft_model_state_dict) would look it up on the Hub.
    model.peft_config["default"].base_model_name_or_path = str(folder)
    return LoadedAdapter(model, load_tokenizer(folder), labels, folder)
