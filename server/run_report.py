"""`fedlora report RUN_DIR`: RUN_DIR/report.html, one self-contained page about a run
(plots as inline SVG, no external URL, so it opens on an air-gapped machine): quality
and loss per round (under DP with the noise the sites added), the exact held-out score
with its per-label accuracy and confusion matrix where the run has one (test.json), each
site's epsilon per round (this run's and its ledger total, against its limit), the sites
that calibrated to their limit, participation and failures per round by site, bytes on the
wire, the resolved config and where the final adapter is. Sites are called what
RUN_DIR/site-names.json calls them (server/site_names.py). Everything comes from the run
directory's own files."""

from __future__ import annotations

import html
import io
import json
import math
import re
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.atomic_file import write_atomic
from fedlora.config import ConfigError
from fedlora.run_outcome import metrics_rows
from fedlora.server import site_names
from fedlora.server.progress import raised_noise_line

REPORT_FILE = "report.html"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# Per site: lines that coincide (sites with the same plan spend the same) stay apart by
# marker, and by a small sideways offset of their points.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
TEST_FILE = "test.json"  # simulations/held_out_test.py writes it


def site_style(i: int, count: int) -> dict[str, Any]:
    """The i-th of `count` sites: colour, marker and the x offset of its points."""
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)],
            "offset": 0.0 if count < 2 else 0.16 * (i / (count - 1) - 0.5)}


def svg_figure(draw: Callable[[Any], None], height: float = 3.2, integer_x: bool = True, integer_y: bool = False) -> str:
    """One matplotlib figure drawn by `draw(axes)`, as inline SVG text (x ticks at whole
    numbers, as rounds are, unless `integer_x` is false; y ticks too with `integer_y`)."""
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
        if integer_y:
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # so are sites
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


def noise_scale(row: dict[str, Any], key: str, loss_clip: float) -> float | None:
    """The standard deviation the sites' noise gives a round's validation figure (accuracy
    or loss), or None without noise. Each of k sites adds N(0, sigma^2) to its count and to
    its sum (sensitivity 1 for correct predictions, the loss clip for losses); a ratio of
    two such pooled sums, value v over N units, has variance about k sigma^2 (s^2 + v^2) / N^2."""
    sigma, sites, units, value = (row.get(k) for k in ("eval_noise_multiplier", "eval_sites", "eval_units", key))
    if not sigma or not sites or not units or units <= 0 or value is None:
        return None
    sensitivity = 1.0 if key == "eval_accuracy" else loss_clip
    return sigma * math.sqrt(sites * (sensitivity ** 2 + value ** 2)) / units


def _quality_plot(rows: list[dict[str, Any]], key: str, label: str, loss_clip: float) -> str:
    def draw(ax) -> None:
        x, y = _rounds(rows, key)
        ax.plot(x, y, marker="o", color=COLORS[0], gid=f"series-{key}", label=label)
        band = [(r["round"], r[key], sd) for r in rows if r.get(key) is not None
                and (sd := noise_scale(r, key, loss_clip)) is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                            color=COLORS[0], alpha=0.15, gid=f"noise-{key}", label="± one sd of the noise the sites added")
            ax.legend(fontsize="small")
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel(label)
    return svg_figure(draw)


def _lines_plot(rows: list[dict[str, Any]], keys: tuple[str, ...], ylabel: str, scale: float = 1.0) -> str:
    """One line per metrics key that the run recorded, by round (values times `scale`)."""
    def draw(ax) -> None:
        for i, key in enumerate(keys):
            x, y = _rounds(rows, key)
            if x:  # up and down bytes often coincide: each its own marker and dash
                ax.plot(x, [v * scale for v in y], marker=MARKERS[i], linestyle=("-", "--", ":")[i % 3],
                        fillstyle="full" if i == 0 else "none", color=COLORS[i], label=key.replace("_", " "),
                        gid=f"series-{key}")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend()
    return svg_figure(draw)


def site_epsilons(rows: list[dict[str, Any]], key: str = "epsilon") -> dict[int, list[tuple[int, float]]]:
    """Node -> [(round, `key` it reported after training that round)]: "epsilon" is the
    site's ledger total over every run, "run_epsilon" this run's own spending."""
    out: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        for site in r.get("site_privacy") or []:
            if site.get(key) is not None and not site.get("declined"):
                out.setdefault(site["node"], []).append((r["round"], site[key]))
    return out


def site_limits(rows: list[dict[str, Any]], config: dict[str, Any], run_dir: Path) -> dict[int, float]:
    """Node -> its own epsilon limit, where the run knows it: a simulation's
    privacy.site_max_epsilon (its virtual sites keep their ledgers in RUN_DIR/sites/), or
    what a site said when its budget declined a round."""
    totals = site_epsilons(rows)
    shared = config["privacy"].get("site_max_epsilon") or 0
    limits = {node: float(shared) for node in totals} if shared > 0 and (run_dir / "sites").is_dir() else {}
    for r in rows:
        for site in r.get("site_privacy") or []:
            if site.get("epsilon_limit") is not None and math.isfinite(site["epsilon_limit"]):
                limits[site["node"]] = site["epsilon_limit"]
    return limits


def _epsilon_plot(rows: list[dict[str, Any]], target: float, limits: dict[int, float], labels: dict[int, str]) -> str:
    def draw(ax) -> None:
        totals, runs = site_epsilons(rows), site_epsilons(rows, "run_epsilon")
        for i, node in enumerate(sorted(totals)):
            style, name = site_style(i, len(totals)), site_names.called(node, labels)
            points = totals[node]
            ax.plot([x + style["offset"] for x, _ in points], [y for _, y in points], marker=style["marker"],
                    color=style["color"], label=f"{name}: ledger total", gid=f"series-epsilon-{node}")
            if runs.get(node):
                ax.plot([x + style["offset"] for x, _ in runs[node]], [y for _, y in runs[node]], marker=style["marker"],
                        color=style["color"], linestyle="--", fillstyle="none", label=f"{name}: this run",
                        gid=f"series-run-epsilon-{node}")
        for value in sorted(set(limits.values())):
            whose = [site_names.called(n, labels) for n, v in sorted(limits.items()) if v == value]
            ax.axhline(value, color="black", linestyle="-", linewidth=0.8,
                       label=f"limit {value:g} ({', '.join(whose) if len(whose) < len(totals) else 'every site'}): caps the ledger total")
        ax.axhline(target, color="grey", linestyle=":", label=f"run's target {target:g}: caps this run's spending")
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon")
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
    return svg_figure(draw, height=3.8)


def why_less_than_target(rows: list[dict[str, Any]], target: float, limits: dict[int, float], labels: dict[int, str]) -> str:
    """One sentence per site whose ledger held earlier runs and that spent less than the
    target in this one: why (its limit left less than the target)."""
    totals, runs = site_epsilons(rows), site_epsilons(rows, "run_epsilon")
    out = []
    for node in sorted(totals):
        if not runs.get(node):
            continue
        total, spent = totals[node][-1][1], runs[node][-1][1]
        earlier = total - spent
        if earlier > 0.05 and spent < 0.95 * target:
            limit = limits.get(node)
            left = f"of its limit {limit:g} about {max(0.0, limit - earlier):.2g} was left" if limit else "its limit left less than the target"
            out.append(f"{html.escape(site_names.called(node, labels))} had spent about {earlier:.2g} in earlier runs, so {left}: "
                       f"it calibrated its noise to stay within it and spent {spent:.2g} in this run, not the target {target:g} "
                       "(a second run at the same target spends what the first one left).")
    return " ".join(out)


def _raised_noise(rows: list[dict[str, Any]]) -> str:
    lines = [f"<li>round {r['round']}: {html.escape(raised_noise_line(s))}</li>" for r in rows for s in r.get("noise_raised") or []]
    if not lines:
        return ""
    return ("<h2>Sites that trained with more noise than planned</h2><p>Each calibrated its noise to its own limit; "
            "far above the plan there is little left to learn (a site declines past its policy's "
            "<code>max-noise-increase</code>).</p><ul>" + "".join(lines) + "</ul>")


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
    return svg_figure(draw, integer_y=True)


def failing_sites(row: dict[str, Any], category: str, labels: dict[int, str]) -> list[str]:
    """The sites of `row` whose status is `category` ("evaluate: X" for an evaluation's)."""
    phase, reason = ("evaluate", category.removeprefix("evaluate: ")) if category.startswith("evaluate: ") else ("train", category)
    return [site_names.called(s["node"], labels) for s in row.get("sites") or [] if s.get(phase) == reason]


def _failure_table(rows: list[dict[str, Any]], labels: dict[int, str]) -> str:
    lines = []
    for r in rows:
        for category, count in sorted((r.get("failures") or {}).items()):
            who = failing_sites(r, category, labels)
            # Every attempt counts; the per-site statuses hold each site's last one.
            named = ", ".join(who) + (f" (and {count - len(who)} more attempts)" if count > len(who) else "") if who else str(count)
            lines.append(f"<tr><td>{r['round']}</td><td>{html.escape(category)}</td><td>{html.escape(named)}</td></tr>")
    if not lines:
        return "<p>No failures, declines or rejected updates in any round.</p>"
    return "<table><tr><th>round</th><th>why</th><th>sites</th></tr>" + "".join(lines) + "</table>"


def _secure_rounds(rows: list[dict[str, Any]]) -> str:
    """One sentence saying which rounds were aggregated under secure aggregation."""
    secure = [r["round"] for r in rows if r.get("secure_aggregation")]
    if not secure:
        return "No round was securely aggregated: the coordinator saw each site's update."
    trained = [r["round"] for r in rows if r["round"] > 0 and r.get("clients_ok")]
    which = "Every trained round was" if secure == trained else f"Round{'s' * (len(secure) > 1)} {', '.join(map(str, secure))} " \
        f"{'were' if len(secure) > 1 else 'was'}"
    return f"{which} aggregated under secure aggregation: the coordinator saw only the sum of the sites' updates."


def _held_out(run_dir: Path) -> str:
    """The exact held-out score (simulations/held_out_test.py), per label and as a confusion matrix."""
    path = run_dir / TEST_FILE
    if not path.is_file():
        return ""
    test = json.loads(path.read_text())
    out = (f"<h2>Held-out test</h2><p>The final adapter on {test['notes']} fresh notes no site holds, scored exactly "
           f"(no noise, no site's budget): accuracy <b>{test['accuracy']:.4f}</b>, mean loss {test['loss']:.4f}.</p>")
    labels, matrix = test.get("labels"), test.get("confusion")
    if labels and matrix:
        per_class = test.get("per_class_accuracy") or [None] * len(labels)
        head = "".join(f"<th>{html.escape(str(name))}</th>" for name in labels)
        body = "".join(
            f"<tr><th>{html.escape(str(name))}</th>" + "".join(f"<td>{n}</td>" for n in counts)
            + f"<td>{sum(counts)}</td><td>{'-' if acc is None else f'{acc:.3f}'}</td></tr>"
            for name, counts, acc in zip(labels, matrix, per_class))
        out += ('<table id="confusion"><tr><th>true \\ predicted</th>' + head + "<th>notes</th><th>accuracy</th></tr>"
                + body + "</table>")
    return out


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
    labels = site_names.run_labels(run_dir)
    planned = config["federation"]["rounds"]
    trained = rows[-1]["round"] - (1 if rows[-1].get("ended_early") else 0)
    classification = "eval_accuracy" in rows[0]
    private = config["privacy"]["enabled"]
    loss_clip, target = config["privacy"].get("eval_loss_clip", 1.0), config["privacy"]["target_epsilon"]
    limits = site_limits(rows, config, run_dir)
    noise = [sd for r in rows if (sd := noise_scale(r, "eval_accuracy" if classification else "eval_loss", loss_clip)) is not None]
    sigma = max((r.get("eval_noise_multiplier") or 0 for r in rows), default=0)
    noisy = (f" (shaded: one standard deviation of the noise the sites added, noise multiplier {sigma:.3g} on each "
             f"site's sums: up to ±{max(noise):.3f})" if noise else "")

    figures = [
        figure_html("quality", ("Validation accuracy per round" if classification else "Validation perplexity per round") + noisy,
                _quality_plot(rows, "eval_accuracy", "accuracy", loss_clip) if classification
                else _quality_plot(rows, "eval_perplexity", "perplexity", loss_clip)),
        figure_html("loss", "Loss per round (the train loss stays at the sites under DP)",
                _lines_plot(rows, ("eval_loss", "train_loss"), "loss")),
    ]
    if private:
        figures.append(figure_html("epsilon", "Each site's epsilon after each round: this run's spending (dashed) "
                                   "against the run's target, the site's ledger total over every run (solid) against its limit",
                               _epsilon_plot(rows, target, limits, labels)))
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
Evaluation figures under DP are released with noise by each site.
{_secure_rounds(rows)}
{why_less_than_target(rows, target, limits, labels) if private else ''}</p>
<p>Final adapter: <code>{html.escape(str(adapter.resolve()))}</code>{'' if adapter.is_dir() else ' (not written yet)'}.
Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from <code>metrics.jsonl</code> and <code>config.toml</code>.</p>
{_held_out(run_dir)}
{''.join(figures)}
{_raised_noise(rows)}
<h2>Failures, declines and rejected updates</h2>
{_failure_table(rows, labels)}
<h2>Resolved configuration (config.toml)</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = run_dir / REPORT_FILE
    write_atomic(out, page)
    return out
