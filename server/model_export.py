"""`fedlora export RUN_DIR --out DIR [--merge]`: the run's final adapter, ready to use.

Without --merge: the PEFT adapter folder (adapter_config.json,
adapter_model.safetensors, and base-model.json: the base model's portable name and
fingerprint, fedlora/portable_adapter.py), plus the tokenizer and, for classification,
labels.json; load it with `PeftModel.from_pretrained(base, DIR)`. Either way the base
model is first checked against the fingerprint the run recorded.
With --merge: the base model with the adapter merged in, saved as a plain
transformers model (label names in its config); load it with
`AutoModelForSequenceClassification.from_pretrained(DIR)` or `AutoModelForCausalLM`.
A mean-pooling classifier (`model.pooling`, fedlora/mean_pooling.py) has no standard
class: --merge saves its backbone as a plain `AutoModel` folder, the head as
`classifier.safetensors` and `pooling.json`; `fedlora.mean_pooling.load_exported(DIR)`
rebuilds it (docs/deployment.md shows the few lines it takes).
Either way the export ends with the run's dossier (server/dossier.py) beside the model:
dossier.json and dossier.html, naming the exported files by their SHA-256.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from fedlora.base_model import load_base_model, load_tokenizer, resolve_model_dir, resolved_pooling
from fedlora.config import ConfigError, load_config
from fedlora.portable_adapter import BASE_FILE, verified_base
from fedlora.server.dossier import write_dossier


def export_run(run_dir: Path, out: Path, merge: bool, model_path: str | None = None) -> Path:
    """Write the export into `out` (which must not exist or be empty); returns `out`."""
    from peft import PeftModel

    run_dir = run_dir.expanduser().resolve()
    adapter_dir = run_dir / "adapter"
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{run_dir}: no final adapter yet (adapter/adapter_model.safetensors); has the run finished?")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty (an export never overwrites)")
    config = load_config(run_dir / "config.toml", {"model.path": model_path} if model_path else None)
    labels = config.data.labels if config.model.task == "classification" else []
    if (adapter_dir / BASE_FILE).is_file():  # the base the adapter was trained on, checked by fingerprint
        folder = verified_base(adapter_dir, model_path)
        config = replace(config, model=replace(config.model, path=str(folder)))
    else:  # a run from before the base was recorded
        folder = resolve_model_dir(config.model.path)
    tokenizer = load_tokenizer(folder)
    out.mkdir(parents=True, exist_ok=True)

    if not merge:
        for name in ("adapter_config.json", "adapter_model.safetensors", BASE_FILE):
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, out / name)
    else:
        base = load_base_model(config.model, max(1, len(labels)), config.run.seed)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        if labels:
            merged.config.id2label = dict(enumerate(labels))
            merged.config.label2id = {name: i for i, name in enumerate(labels)}
        if resolved_pooling(config.model, folder) == "mean":
            from fedlora.mean_pooling import save_exported

            save_exported(merged, out)
        else:
            merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if labels:
        (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    write_dossier(run_dir, out, model_dir=out)  # last: it names every file written above
    return out
