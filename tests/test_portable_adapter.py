"""A run directory copied elsewhere still loads (fedlora/portable_adapter.py): the embedded
base model is recorded by its portable name and fingerprint, resolved on load by
`fedlora.load_adapter`, and a base model with another fingerprint is refused in one line."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

import fedlora
from fedlora.adapter_state import adapter_of, write_peft_dir
from fedlora.base_model import build_peft_model
from fedlora.config import load_config, write_config
from fedlora.model_folder import DEFAULT_MODEL_NAME, ModelError
from fedlora.portable_adapter import BASE_FILE

ROOT = Path(__file__).resolve().parents[1]
NOTE = "72F c/o crushing CP radiating to L arm, diaphoretic"


def make_run(run_dir: Path, model_path: str, labels: list[str]) -> torch.Tensor:
    """A finished run's directory, written as the coordinator writes it (config.toml,
    labels.json, adapter/ by write_peft_dir); returns the trained model's logits for NOTE."""
    run_dir.mkdir(parents=True)
    config = load_config(None, {"model.path": model_path, "data.labels": labels, "run.output_dir": str(run_dir)})
    write_config(config, run_dir / "config.toml")
    (run_dir / "labels.json").write_text(json.dumps(labels))
    model = build_peft_model(config.model, config.lora, num_labels=len(labels), seed=0)
    torch.manual_seed(1)
    adapter = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_of(model).items()}  # a trained-looking adapter
    write_peft_dir(model, adapter, run_dir / "adapter", model_path)
    from fedlora.base_model import load_tokenizer, resolve_model_dir

    batch = load_tokenizer(resolve_model_dir(model_path))([NOTE], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def moved(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    shutil.rmtree(run_dir)  # nothing may point back at where the run was written
    return to


def readme_snippet() -> str:
    """The README's Python block that loads a run's adapter."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if "load_adapter" in b)


def test_a_copied_run_loads_its_default_base_by_name_and_fingerprint(tmp_path, capsys):
    labels = ["cardiology", "dermatology", "neurology"]
    trained = make_run(tmp_path / "runs" / "demo", "default", labels)
    run_dir = moved(tmp_path / "runs" / "demo", tmp_path / "elsewhere" / "demo")

    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    record = json.loads((run_dir / "adapter" / BASE_FILE).read_text())
    assert adapter_config["base_model_name_or_path"] == record["base_model"] == DEFAULT_MODEL_NAME
    assert record["fingerprint"].startswith("sha256:") and "site-packages" not in json.dumps(adapter_config)

    run = fedlora.load_adapter(run_dir)
    assert run.labels == labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT looks a base it cannot find locally up on the Hub, warning offline
        get_peft_model_state_dict(run.model)
    with torch.no_grad():
        logits = run.model(**run.tokenizer([NOTE], return_tensors="pt")).logits
    assert torch.allclose(logits, trained, atol=1e-5)

    # The README's snippet, as a user runs it on the copied directory.
    exec(readme_snippet().replace('"runs/demo"', repr(str(run_dir))), {})  # noqa: S102
    assert capsys.readouterr().out.strip() == labels[int(trained.argmax(-1))]


def test_a_base_model_with_another_fingerprint_is_refused_in_one_line(tmp_path, tiny_models):
    make_run(tmp_path / "run", str(tiny_models["bert"]), ["a", "b", "c"])
    run_dir = moved(tmp_path / "run", tmp_path / "copy")
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_models["bert"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0  # the same architecture, other weights
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ModelError) as caught:
        fedlora.load_adapter(run_dir, model_path=str(other))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{other.resolve()}: base model fingerprint sha256:")
    assert message.endswith(f"({run_dir / 'adapter' / BASE_FILE}); refusing another base model")

    record_file = run_dir / "adapter" / BASE_FILE
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "fingerprint": "sha256:" + "0" * 64}))  # a record for another base
    with pytest.raises(ModelError, match="refusing another base model"):
        fedlora.load_adapter(run_dir)


def test_a_local_model_folder_keeps_its_path_and_can_be_named_where_it_moved(tmp_path, tiny_models):
    base = tmp_path / "models" / "bert"
    shutil.copytree(tiny_models["bert"], base)
    trained = make_run(tmp_path / "run", str(base), ["a", "b", "c"])
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    run_dir = moved(tmp_path / "run", tmp_path / "copy")
    new_base = moved(base, tmp_path / "elsewhere" / "bert")

    with pytest.raises(ModelError) as caught:
        fedlora.load_adapter(run_dir)
    assert len(str(caught.value).splitlines()) == 1 and "pass model_path=FOLDER" in str(caught.value)
    run = fedlora.load_adapter(run_dir, model_path=str(new_base))
    assert run.base_folder == new_base.resolve()
    with torch.no_grad():
        assert torch.allclose(run.model(**run.tokenizer([NOTE], return_tensors="pt")).logits, trained, atol=1e-5)
