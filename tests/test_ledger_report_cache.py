"""`fedlora privacy` reads the epsilons the ledger kept when it recorded each entry
(privacy/epsilon_cache.py): the same figures as recomputing them, and no accountant
(Opacus, torch) imported to show them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedlora.privacy.epsilon_cache import CACHE_FILE
from fedlora.privacy.ledger_report import ledger_summary
from tests.helpers.ledgers import record

ROOT = Path(__file__).resolve().parents[1]


def test_kept_figures_equal_recomputed_ones_across_runs_deltas_and_accountants(tmp_path):
    record(tmp_path, "runs/a", 1e-5, 3)
    record(tmp_path, "runs/b", 1e-6, 2, accountant="rdp")  # a smaller delta: the site totals are restated at it
    kept, fresh = ledger_summary(tmp_path), ledger_summary(tmp_path, recompute=True)
    assert kept == fresh
    assert kept["epsilon_total"] > max(r["epsilon"] for r in kept["runs"]) > 0
    # A kept value is used only for exactly the inputs it was computed for: a wrong one under
    # another key is never read, and a new run's restated totals are computed, not looked up.
    cache = json.loads((tmp_path / CACHE_FILE).read_text())
    (tmp_path / CACHE_FILE).write_text(json.dumps({**cache, "not-a-key": 99.0}))
    record(tmp_path, "runs/c", 1e-7, 1)
    assert ledger_summary(tmp_path) == ledger_summary(tmp_path, recompute=True)


def test_a_ledger_without_kept_figures_is_reported_all_the_same(tmp_path):
    record(tmp_path, "runs/a", 1e-5, 2)
    (tmp_path / CACHE_FILE).unlink()  # as a ledger written before the figures were kept
    assert ledger_summary(tmp_path) == ledger_summary(tmp_path, recompute=True)
    assert (tmp_path / CACHE_FILE).is_file()  # and kept for the next time


def test_the_privacy_command_imports_no_accountant_on_a_recorded_ledger(tmp_path):
    record(tmp_path, "runs/a", 1e-5, 3)
    probe = ("import sys; from fedlora.cli import main; code = main(['privacy', sys.argv[1]]); "
             "print(code, sorted(m for m in ('opacus', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout[-2000:] + out.stderr[-2000:]
    assert "epsilon spent over all runs" in out.stdout
