"""`fedlora report RUN_DIR`: RUN_DIR/report.html, one self-contained page about a run
(plots as inline SVG, no external URL, so it opens on an air-gapped machine): quality
and loss per round, each site's epsilon per round against the run's target,
participation and failures per round, bytes on the wire, the resolved config and where
the final adapter is. Everything comes from the run directory's own files."""

from __future__ import annotations

import html
import io
import re
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError
from fedlora.run_outcome import metrics_rows

REPORT_FILE = "report.html"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def svg_figure(draw: Callable[[Any], None], height: float = 3.2, integer_x: bool = True) -> str:
    """One matplotlib figure drawn by `draw(axes)`, as inline SVG text (x ticks at whole
    numbers, as rounds are, unless `integer_x` is false)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # No pyplot (no global figure state); text stays text; ids are reproducible.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fedlora"}):
        figure = Figure(figsize=(7.5, height))
        axes = figure.add_subplot()
        draw(axes)
        if integer_x:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        out = io.StringIO()
        # No <metadata> (its RDF names URLs, and its date would differ on every run).
        figure.savefig(out, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = out.getvalue()
    text = text[text.index("<svg"):]  # the XML prolog and DOCTYPE are not allowed inside HTML
    # HTML's parser puts inline <svg> (and xlink:href) in their namespaces itself: the
    # namespace declarations, the page's only URLs, are dropped.
    return re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", text, count=2)


def _rounds(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _quality_plot(rows: list[dict[str, Any]], key: str, label: str) -> str:
    def draw(ax) -> None:
        x, y = _rounds(rows, key)
        ax.plot(x, y, marker="o", color=COLORS[0], gid=f"series-{key}")
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel(label)
    return svg_figure(draw)


def _lines_plot(rows: list[dict[str, Any]], keys: tuple[str, ...], ylabel: str, scale: float = 1.0) -> str:
    """One line per metrics key that the run recorded, by round (values times `scale`)."""
    def draw(ax) -> None:
        for i, key in enumerate(keys):
            x, y = _rounds(rows, key)
            if x:
                ax.plot(x, [v * scale for v in y], marker="o", color=COLORS[i], label=key.replace("_", " "), gid=f"series-{key}")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend()
    return svg_figure(draw)


def site_epsilons(rows: list[dict[str, Any]]) -> dict[int, list[tuple[int, float]]]:
    """Node -> [(round, epsilon it reported after training that round)]."""
    out: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        for site in r.get("site_privacy") or []:
            if site.get("epsilon") is not None and not site.get("declined"):
                out.setdefault(site["node"], []).append((r["round"], site["epsilon"]))
    return out


def _epsilon_plot(rows: list[dict[str, Any]], target: float) -> str:
    def draw(ax) -> None:
        for i, (node, points) in enumerate(sorted(site_epsilons(rows).items())):
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=COLORS[i % len(COLORS)],
                    label=f"node {node}", gid=f"series-epsilon-{node}")
        ax.axhline(target, color="black", linestyle="--", label=f"run's target ({target:g})")
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon spent (site's ledger)")
        ax.legend(fontsize="small")
    return svg_figure(draw)


def _participation_plot(rows: list[dict[str, Any]]) -> str:
    def draw(ax) -> None:
        x = [r["round"] for r in rows]
        ok = [r.get("clients_ok", 0) for r in rows]
        declined = [r.get("clients_declined", 0) for r in rows]
        failed = [max(0, r.get("clients_failed", 0) - d) for r, d in zip(rows, declined)]  # failures include declines
        ax.bar(x, ok, color=COLORS[2], label="trained", gid="series-trained")
        ax.bar(x, failed, bottom=ok, color=COLORS[3], label="failed or rejected", gid="series-failed")
        ax.bar(x, declined, bottom=[a + b for a, b in zip(ok, failed)], color=COLORS[7], label="declined", gid="series-declined")
        ax.set_xlabel("round")
        ax.set_ylabel("sites")
        ax.legend(fontsize="small")
    return svg_figure(draw)


def _failure_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"<tr><td>{r['round']}</td><td>{html.escape(category)}</td><td>{count}</td></tr>"
             for r in rows for category, count in sorted((r.get("failures") or {}).items())]
    if not lines:
        return "<p>No failures, declines or rejected updates in any round.</p>"
    return "<table><tr><th>round</th><th>why</th><th>sites</th></tr>" + "".join(lines) + "</table>"


def figure_html(name: str, title: str, svg: str) -> str:
    return f'<figure id="{name}"><figcaption>{html.escape(title)}</figcaption>{svg}</figure>'


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report.html from RUN_DIR's config.toml and metrics.jsonl; returns its path."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    config_text = config_path.read_text()
    config = tomllib.loads(config_text)
    rows = metrics_rows(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}: no rounds recorded yet (metrics.jsonl is missing or empty)")
    planned = config["federation"]["rounds"]
    trained = rows[-1]["round"] - (1 if rows[-1].get("ended_early") else 0)
    classification = "eval_accuracy" in rows[0]
    private = config["privacy"]["enabled"]

    figures = [
        figure_html("quality", "Validation accuracy per round" if classification else "Validation perplexity per round",
                _quality_plot(rows, "eval_accuracy", "accuracy") if classification
                else _quality_plot(rows, "eval_perplexity", "perplexity")),
        figure_html("loss", "Loss per round (the train loss stays at the sites under DP)",
                _lines_plot(rows, ("eval_loss", "train_loss"), "loss")),
    ]
    if private:
        figures.append(figure_html("epsilon", "Each site's epsilon after each round, against the run's target",
                               _epsilon_plot(rows, config["privacy"]["target_epsilon"])))
    figures += [
        figure_html("participation", "Sites per round: trained, failed or rejected, declined", _participation_plot(rows)),
        figure_html("bytes", "Bytes on the wire per round", _lines_plot(rows, ("bytes_up", "bytes_down"), "MB (all sites)", 1e-6)),
    ]
    adapter = run_dir / "adapter"
    status = (f"{trained} of {planned} planned rounds trained" + (" (the run ended early)" if rows[-1].get("ended_early") else "")
              if trained < planned else f"all {planned} planned rounds trained")
    final = rows[-1]
    quality = final.get("eval_accuracy" if classification else "eval_perplexity")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedlora run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: bold; margin-bottom: 0.3em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: left; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>fedlora run: {html.escape(str(run_dir.resolve()))}</h1>
<p>{html.escape(status)}. Last round: {final['round']}, {'accuracy' if classification else 'perplexity'}
{'-' if quality is None else f'{quality:.4f}'}, largest epsilon of any site {final.get('epsilon_max') or 0:.3f}
({'DP-SGD at target epsilon ' + format(config['privacy']['target_epsilon'], 'g') if private else 'no DP'}).
Evaluation figures under DP are released with noise by each site.</p>
<p>Final adapter: <code>{html.escape(str(adapter.resolve()))}</code>{'' if adapter.is_dir() else ' (not written yet)'}.
Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from <code>metrics.jsonl</code> and <code>config.toml</code>.</p>
{''.join(figures)}
<h2>Failures, declines and rejected updates</h2>
{_failure_table(rows)}
<h2>Resolved configuration (config.toml)</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = run_dir / REPORT_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
