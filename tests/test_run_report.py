"""`fedlora report`: one self-contained HTML file per run (inline SVG, no URL at all),
one figure per plot, each with as many points as the run has rounds for it."""

from __future__ import annotations

import json
import re

from fedlora.cli import main
from fedlora.config import load_config
from tests.helpers.run_dirs import write_run


def series_points(page: str, gid: str) -> int:
    """Markers drawn for the plotted series `gid` (matplotlib draws one <use> per point)."""
    match = re.search(rf'<g id="{gid}">(.*?)</g>\s*</g>', page, re.S)
    assert match, gid
    return match.group(1).count("<use")


def test_the_report_is_self_contained_with_one_figure_per_plot_and_every_point(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    # Opens on an air-gapped machine: no URL, script, stylesheet link or image; references stay in the page (#id).
    assert not re.search(r"https?://|<script|<link|<img|url\((?!#)|href=\"(?!#)", page)
    assert "clip-path=\"url(#" in page and "xlink:href=\"#" in page  # what the pattern above allows is really there
    figures = re.findall(r'<figure id="([a-z]+)">.*?</figure>', page, re.S)
    assert figures == ["quality", "loss", "epsilon", "participation", "bytes"]
    assert page.count("<svg") == len(figures)
    assert series_points(page, "series-eval_accuracy") == 4 and series_points(page, "series-eval_loss") == 4
    assert series_points(page, "series-bytes_up") == 4
    # Each site's epsilon at the rounds it trained: 3, 2 (it declined round 3) and 1 (lost after round 1).
    assert [series_points(page, f"series-epsilon-{n}") for n in (11, 12, 13)] == [3, 2, 1]
    assert "declined: privacy budget" in page and "node unavailable" in page  # the failure table
    assert "all 3 planned rounds trained" in page and "[privacy]" in page and str((run_dir / "adapter").resolve()) in page


def test_without_dp_there_is_no_epsilon_plot_and_a_bad_folder_is_one_line(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", private=False)
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert re.findall(r'<figure id="([a-z]+)">', page) == ["quality", "loss", "participation", "bytes"]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err


def test_fedlora_run_ends_with_the_table_the_sites_by_name_and_the_report(tmp_path, capsys):
    from fedlora.config import load_config
    from fedlora.cli.deployment import _show_finished_run
    from fedlora.server import site_names

    run_dir = write_run(tmp_path / "run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows[2]["sites"] = [{"node": 13, "train": "node unavailable", "evaluate": None}, {"node": 11, "train": "ok", "evaluate": "ok"}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    site_names.record(coordinator, 13, "north-clinic")
    config = load_config(run_dir / "config.toml")
    config.run.output_dir = str(run_dir)

    assert _show_finished_run(config, coordinator) == 0
    out = capsys.readouterr().out
    assert "eval_accuracy  epsilon_max" in out and "[fedlora] round 2: north-clinic (node 13) train: node unavailable" in out
    assert f"[fedlora] report: {run_dir / 'report.html'}" in out and out.rstrip().endswith(f"run finished: {run_dir}")

    rows[-1]["ended_early"] = True  # the last round could not be completed
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _show_finished_run(config, None) == 3
    captured = capsys.readouterr()
    assert "run finished" not in captured.out and "run ended early: 2 of 3 rounds trained" in captured.err
