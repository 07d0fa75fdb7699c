"""fedlora: federated LoRA fine-tuning under differential privacy.

The distribution installs one top-level package, `fedlora`. Its floors keep their
folders at the top of the source tree (server/, client/, strategies/, privacy/,
simulations/) and are imported as `fedlora.server`, `fedlora.client`, ... An
installed wheel holds them inside fedlora/ (setuptools package-dir); in the source
tree and in a Flower App bundle, which ship the folders side by side, the finder
below maps `fedlora.<floor>` to the folder next to the `fedlora` folder that was
imported. It serves exactly these five names, so nothing else in the folder above
becomes importable under `fedlora`.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

FLOORS = ("server", "client", "strategies", "privacy", "simulations")


class SiblingFloorFinder:
    """`fedlora.<floor>` from <root>/<floor>/, where <root> holds the imported fedlora/
    folder and the app's pyproject.toml (a source tree or an installed app bundle)."""

    marker = "fedlora-sibling-floors"

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib's protocol)
        parent, _, floor = fullname.rpartition(".")
        if parent != "fedlora" or floor not in FLOORS or not path:
            return None
        # `path` is the imported fedlora's __path__. An installed wheel has no
        # pyproject.toml beside it (its floors lie inside fedlora/, found before this
        # finder is asked), so site-packages' own top-level names are never served.
        roots = [str(Path(entry).parent) for entry in path if (Path(entry).parent / "pyproject.toml").is_file()]
        spec = importlib.machinery.PathFinder.find_spec(fullname, roots) if roots else None
        return spec if spec is not None and spec.submodule_search_locations else None


if not any(getattr(finder, "marker", None) == SiblingFloorFinder.marker for finder in sys.meta_path):
    # First: setuptools' editable finder would serve `fedlora.<floor>` from the checkout
    # it was installed from even when the imported fedlora is an app bundle's.
    sys.meta_path.insert(0, SiblingFloorFinder)


def load_adapter(run_dir, model_path=None):  # noqa: ANN001, ANN201 (kept free of imports: see below)
    """A run's final adapter on its base model, resolved on this machine and checked by
    fingerprint: `.model`, `.tokenizer`, `.labels` (fedlora/portable_adapter.py). Imported
    on call: `import fedlora` stays free of torch."""
    from fedlora.portable_adapter import load_adapter as load

    return load(run_dir, model_path)
