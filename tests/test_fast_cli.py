"""Commands that need no model import no torch, transformers, PEFT or Opacus, on
success and on error, so that they answer in a fraction of a second (the times are
measured by `python -m fedlora.simulations.bench_cli`, not here)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.fresh_process import fedlora_in_fresh_process, in_fresh_process

QUICK = [
    (["--help"], 0),
    (["privacy", "--help"], 0),
    (["audit", "--help"], 0),
    (["privacy", "no-such-state-dir"], 2),
    (["certs", "--out", "certs"], 0),
    (["site-key", "--out", "keys", "--name", "site-a"], 0),
    (["sites", "--coordinator-dir", "no-coordinator-here"], 2),
    (["register-site", "keys/site-a.pub", "--coordinator-dir", "no-coordinator-here"], 2),
    (["sample-data", "--out", "data", "--sites", "2", "--notes", "12"], 0),
    (["compare", "--strategies", "fedprox", "--output", "cmp"], 2),  # refused before any run
]


def test_quick_commands_import_no_model_libraries(tmp_path):
    for args, code in QUICK:
        result = fedlora_in_fresh_process(*args, cwd=tmp_path)
        assert (result.code, result.heavy) == (code, []), (args, result)
    assert (tmp_path / "certs" / "ca.pem").is_file() and (tmp_path / "keys" / "site-a.pub").is_file()
    assert len(list((tmp_path / "data").glob("*.jsonl"))) == 2


def test_a_reader_that_goes_away_ends_a_command_quietly(tmp_path):
    """`fedlora privacy DIR | head -1`: the pipe closes under the command; it exits 141
    (128 + SIGPIPE, as `cat` does) and prints no traceback."""
    import os
    from pathlib import Path

    from tests.helpers.ledgers import record

    record(tmp_path, "runs/a", 1e-5, 3)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, "-m", "fedlora.cli", "privacy", str(tmp_path)], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr[-2000:]


def test_what_fedlora_run_shows_after_a_run_imports_no_model_libraries(tmp_path):
    """`fedlora run` waits on `flwr run`, then prints the summary, names the sites that did not
    deliver and writes report.html: none of that needs torch (it cost each run about 8
    CPU-seconds when the report's module reached the coordinator's reply parsing)."""
    from pathlib import Path

    from tests.helpers.run_dirs import write_run

    run_dir = write_run(tmp_path / "run")
    probe = ("import sys\nfrom fedlora.config import load_config\nfrom fedlora.cli.deployment import _show_finished_run\n"
             "code = _show_finished_run(load_config(sys.argv[1], {'run.output_dir': sys.argv[2]}), None)\n")
    result = in_fresh_process(probe, str(run_dir / "config.toml"), str(run_dir), cwd=Path(__file__).resolve().parents[1])
    assert (result.code, result.heavy) == (0, []), result
    assert "[fedlora] run finished" in result.output and (run_dir / "report.html").is_file()
