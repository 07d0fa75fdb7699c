"""`fedlora audit`: an empirical privacy audit with canaries.

Accounting gives an upper bound on what a release can reveal about one record; an audit
gives a lower bound, by trying. Canaries are records no real site holds: a string of
random words from the tokenizer's vocabulary with a random label, so that nothing but
having trained on it lowers its loss. Half of them (drawn at random) are inserted once
each into the sites' training data (canary i at site i mod the number of sites), the
other half never: those are the non-members.

The federation is trained twice at the same compute (the same sites, rounds, steps,
batch and clipping): once under the run's DP plan, once with the noise set to zero
(clipping kept, so the two differ in the noise alone). This is the recipe study's
arithmetic in one process (simulations/recipe_study.py: every site's own
`train_locally` and calibrated DP plan, the project's strategy), not Ray: the mechanism
that protects a record is the site's DP-SGD, which is the same code.

A canary's membership score is how much training raised the log-probability of its
random label, from the initial adapter to the final one, relative to its other labels
and beyond the rise of that label over all canaries (training shifts each label's share
of any random text alike; only having trained on the canary raises its own label beyond
that). The audit reports,
per arm, the AUC of members against non-members (0.5: the scores cannot tell them
apart) with a bootstrap 95% interval. Without noise the AUC should sit clearly above
0.5 (the audit can see memorization); under DP it should hold 0.5 in its interval.
An AUC near 0.5 is evidence, not proof: a stronger attack (many shadow models, a
canary crafted for the model) could do better; the epsilon bounds every attack.

Writes OUTPUT/audit.json and OUTPUT/audit.html (score histograms and ROC curves).
"""

from __future__ import annotations

import html
import json
import math
import random
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedlora.adapter_state import put_adapter
from fedlora.base_model import build_peft_model, load_tokenizer, resolve_model_dir
from fedlora.client.local_evaluation import batched_logits
from fedlora.client.site_privacy import calibrated_plan
from fedlora.config import Config
from fedlora.server.run_report import COLORS, figure_html, svg_figure
from fedlora.simulations.recipe_study import Site, federate, study_sites
from fedlora.simulations.virtual_sites import dataset_labels
from fedlora.text_data import Example, encode

CANARY_SEED_OFFSET = 424_242  # canaries are drawn from their own stream, apart from the data's
CANARY_WORDS = 16
BOOTSTRAP_SAMPLES = 2000
JSON_FILE, HTML_FILE = "audit.json", "audit.html"


@dataclass
class Canary:
    text: str
    label: str
    member: bool
    site: int | None  # the site that holds it (members only)


def make_canaries(count: int, labels: list[str], tokenizer, sites: int, seed: int) -> list[Canary]:
    """`count` canaries, half of them members spread over `sites`: random whole words of the
    tokenizer's vocabulary (no sub-word pieces, no special tokens) and a random label."""
    rng = random.Random(seed + CANARY_SEED_OFFSET)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 4)
    if len(words) < CANARY_WORDS:
        raise ValueError(f"the tokenizer's vocabulary has {len(words)} whole words; canaries need {CANARY_WORDS}")
    members = set(rng.sample(range(count), count // 2))
    canaries, placed = [], 0
    for i in range(count):
        member = i in members
        canaries.append(Canary(" ".join(rng.sample(words, CANARY_WORDS)), rng.choice(labels), member,
                               placed % sites if member else None))
        placed += member
    return canaries


def canary_examples(canaries: list[Canary], config: Config, labels: list[str], tokenizer) -> list[Example]:
    rows = [{config.data.text_column: c.text, config.data.label_column: c.label} for c in canaries]
    return encode(rows, tokenizer, replace(config, privacy=replace(config.privacy, unit="example")), labels, "canaries")


@torch.no_grad()
def log_probabilities(model: torch.nn.Module, examples: list[Example], config: Config, pad_id: int) -> np.ndarray:
    """[example, label] log-probabilities under the model's current adapter."""
    out = [torch.log_softmax(logits.float(), dim=-1).cpu() for logits, _ in batched_logits(model, examples, config, pad_id)]
    return torch.cat(out).numpy().astype(np.float64)


def membership_scores(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How much training raised each canary's log-probability of its own label, relative to its
    other labels, less that label's mean rise over all canaries: training shifts each label's
    share of random text alike (and any text's labels together), and a canary trained on is one
    whose own label rose beyond both. Both differences cut the scores' shared part, which one
    training's noise moves for all canaries at once and a bootstrap over canaries cannot see."""
    change = after - before
    change = change - change.mean(axis=1, keepdims=True)  # what rose on this text, relative to its other labels
    rows = np.arange(len(labels))
    return change[rows, labels] - change.mean(axis=0)[labels]


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's score > a non-member's), ties counting half (the Mann-Whitney U statistic)."""
    greater = (members[:, None] > others[None, :]).sum()
    ties = (members[:, None] == others[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(members) * len(others)))


def auc_interval(members: np.ndarray, others: np.ndarray, seed: int, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the AUC (members and non-members resampled apart)."""
    rng = np.random.default_rng(seed)
    values = [auc(rng.choice(members, len(members)), rng.choice(others, len(others))) for _ in range(BOOTSTRAP_SAMPLES)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def roc_points(members: np.ndarray, others: np.ndarray) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) at every threshold, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    points = [(0.0, 0.0)]
    for t in thresholds:
        points.append((float((others >= t).mean()), float((members >= t).mean())))
    return points


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC any membership test can reach against an (epsilon, delta)-DP
    release: its best trade-off of errors is beta(alpha) = max(0, 1 - delta - e^eps alpha,
    e^-eps (1 - delta - alpha)) (DP as hypothesis testing), whose area is
    (1 - delta)^2 / (1 + e^eps). At delta = 0 the bound is the logistic sigmoid of epsilon:
    0.731 at epsilon 1, 0.9997 at epsilon 8."""
    return 1.0 - (1.0 - delta) ** 2 / (1.0 + math.exp(epsilon))


def verdict(low: float, high: float) -> str:
    if low > 0.5:
        return "above chance: the scores tell members from non-members"
    if high < 0.5:
        return "below chance: the scores tell them apart the other way round"
    return "consistent with chance: 0.5 is inside the interval"


def audit_arm(config: Config, sites: list[Site], canaries: list[Example], membership: np.ndarray, noise: bool,
              pad: int, labels: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """One training of the federation (noise as the DP plan has it, or none) and the canaries' scores."""
    start = time.perf_counter()
    model = build_peft_model(config.model, config.lora, len(labels), seed=config.run.seed)
    plans = [calibrated_plan(config, site.train) for site in sites]
    if not noise:
        plans = [replace(plan, noise_multiplier=0.0) for plan in plans]
    before = log_probabilities(model, canaries, config, pad)
    final, _ = federate(config, model, sites, plans, pad, progress)
    put_adapter(model, final)
    after = log_probabilities(model, canaries, config, pad)
    scores = membership_scores(before, after, np.array([c.labels for c in canaries]))
    members, others = scores[membership], scores[~membership]
    value = auc(members, others)
    low, high = auc_interval(members, others, seed=config.run.seed)
    return {
        "noise": noise, "noise_multiplier": [round(p.noise_multiplier, 4) for p in plans],
        "auc": value, "interval": [low, high], "verdict": verdict(low, high),
        "member_scores": members.round(6).tolist(), "non_member_scores": others.round(6).tolist(),
        "roc": roc_points(members, others), "seconds": round(time.perf_counter() - start, 1),
    }


def run_audit(config: Config, output: Path, canary_count: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Insert the canaries, train both arms, score, and write OUTPUT/audit.json and audit.html."""
    if config.model.task != "classification":
        raise ValueError("fedlora audit needs model.task = 'classification': a canary is a text with a random label")
    if not config.privacy.enabled:
        raise ValueError("fedlora audit compares DP with no noise: privacy.enabled must be true")
    if canary_count < 10:
        raise ValueError(f"--canaries {canary_count}: give at least 10 (half members, half not)")
    labels = dataset_labels(config)
    config = replace(config, data=replace(config.data, labels=labels))
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
    sites = study_sites(config, labels, tokenizer)
    canaries = make_canaries(canary_count, labels, tokenizer, len(sites), config.run.seed)
    examples = canary_examples(canaries, config, labels, tokenizer)
    inserted = [Site(site.train + [e for c, e in zip(canaries, examples) if c.site == number], site.validation)
                for number, site in enumerate(sites)]
    membership = np.array([c.member for c in canaries])
    pad = tokenizer.pad_token_id
    output.mkdir(parents=True, exist_ok=True)
    arms = []
    for noise in (False, True):
        name = f"DP, epsilon {config.privacy.target_epsilon:g}" if noise else "no noise (clipping kept)"
        progress(f"[fedlora] audit: training {name}, {config.federation.rounds} rounds at {len(sites)} sites")
        arm = audit_arm(config, inserted, examples, membership, noise, pad, labels, progress)
        arm["name"] = name
        progress(f"[fedlora] audit: {name}: AUC {arm['auc']:.3f} [{arm['interval'][0]:.3f}, {arm['interval'][1]:.3f}] "
                 f"- {arm['verdict']} ({arm['seconds']:.0f} s)")
        arms.append(arm)
    bound = dp_auc_bound(config.privacy.target_epsilon, config.privacy.delta)
    progress(f"[fedlora] audit: (epsilon {config.privacy.target_epsilon:g}, delta {config.privacy.delta:g})-DP allows "
             f"an AUC up to {bound:.4g}; the DP training's {arms[1]['auc']:.3f} is "
             f"{'within' if arms[1]['auc'] <= bound else 'ABOVE'} it")
    result = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": config.simulation.dataset, "sites": len(sites), "rounds": config.federation.rounds,
        "local_steps": config.train.local_steps, "batch_size": config.train.batch_size,
        "epsilon": config.privacy.target_epsilon, "delta": config.privacy.delta, "unit": config.privacy.unit,
        "canaries": canary_count, "members": int(membership.sum()), "canary_words": CANARY_WORDS,
        "score": "the rise of the log-probability of the canary's random label from the initial adapter to the final "
                 "one, relative to its other labels, less that label's mean rise over all canaries",
        "arms": arms,
        # What DP promises: no test beats this AUC. Above chance is allowed, above this is not.
        "dp_auc_bound": bound,
        # The audit has power only if, without noise, the members stand out.
        "audit_sees": arms[0]["interval"][0] > 0.5,
    }
    (output / JSON_FILE).write_text(json.dumps(result, indent=1) + "\n")
    (output / HTML_FILE).write_text(audit_html(result))
    return result


BLIND = ("without noise the canaries do not stand out either: at this scale the audit cannot see, and its DP "
         "figure shows nothing (fewer records per site, or more rounds, give it power)")


def summary_line(result: dict[str, Any]) -> str:
    no_noise, dp = result["arms"]
    return (f"audit: no noise AUC {no_noise['auc']:.3f} [{no_noise['interval'][0]:.3f}, {no_noise['interval'][1]:.3f}], "
            f"DP at epsilon {result['epsilon']:g} AUC {dp['auc']:.3f} [{dp['interval'][0]:.3f}, {dp['interval'][1]:.3f}] "
            f"({dp['verdict'] if result['audit_sees'] else BLIND}; the DP bound is {result['dp_auc_bound']:.4g})")


def _histograms(result: dict[str, Any]) -> str:
    def draw(axes) -> None:
        arms = result["arms"]
        every = np.concatenate([np.array(a["member_scores"] + a["non_member_scores"]) for a in arms])
        bins = np.linspace(float(every.min()), float(every.max()) + 1e-9, 25)
        for i, arm in enumerate(arms):
            axes.hist(arm["member_scores"], bins=bins, histtype="step", color=COLORS[2 * i], linewidth=1.6,
                      label=f"{arm['name']}: members")
            axes.hist(arm["non_member_scores"], bins=bins, histtype="step", color=COLORS[2 * i + 1], linestyle="--",
                      linewidth=1.6, label=f"{arm['name']}: non-members")
        axes.set_xlabel("membership score (rise of the own label's log-probability, beyond its label's)")
        axes.set_ylabel("canaries")
        axes.legend(fontsize=7)

    return svg_figure(draw, integer_x=False, integer_y=True)


def _roc(result: dict[str, Any]) -> str:
    def draw(axes) -> None:
        for i, arm in enumerate(result["arms"]):
            xs, ys = zip(*arm["roc"])
            axes.plot(xs, ys, color=COLORS[2 * i], label=f"{arm['name']} (AUC {arm['auc']:.2f})")
        axes.plot([0, 1], [0, 1], color="#999", linestyle=":", label="chance")
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.legend(fontsize=8)

    return svg_figure(draw, height=4.0, integer_x=False)


def audit_html(result: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(a['name'])}</td><td>{a['auc']:.3f}</td><td>[{a['interval'][0]:.3f}, {a['interval'][1]:.3f}]</td>"
        f"<td>{e(a['verdict'])}</td><td>{e(', '.join(f'{s:g}' for s in a['noise_multiplier']))}</td><td>{a['seconds']:.0f}</td></tr>"
        for a in result["arms"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedlora privacy audit</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}}th{{background:#f3f3f3}}</style>
</head><body><h1>Privacy audit with canaries</h1>
<p>{result['canaries']} canaries ({result['members']} inserted once each into the sites' training data, the rest never),
each {result['canary_words']} random words with a random label; {result['sites']} sites, {result['rounds']} rounds of
{result['local_steps']} steps of batch {result['batch_size']}; epsilon {result['epsilon']:g} at delta {result['delta']:g}
per {e(result['unit'])}. Score: {e(result['score'])}.</p>
<table><tr><th>training</th><th>AUC</th><th>95% interval (bootstrap)</th><th>reading</th><th>noise multiplier per site</th><th>seconds</th></tr>{rows}</table>
{"" if result["audit_sees"] else f"<p><b>{e(BLIND[0].upper() + BLIND[1:])}.</b></p>"}
<p>An AUC of 0.5 means the scores cannot tell the canaries a site trained on from those it never saw. The audit is a
lower bound on leakage (one attack, one training); the accounted epsilon is the upper bound on every attack: under
(epsilon {result['epsilon']:g}, delta {result['delta']:g})-DP no membership test reaches an AUC above
{result['dp_auc_bound']:.4g}. Above chance is allowed; above that bound is not.</p>
{figure_html("scores", "Membership scores of members and non-members", _histograms(result))}
{figure_html("roc", "ROC of the loss-based membership test", _roc(result))}
<p>Written {e(result['written'])}; figures in {JSON_FILE}.</p></body></html>
"""
