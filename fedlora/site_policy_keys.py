"""The site policy's keys, in one table: what each is, its type and default, its
`fedlora client` flag and what it means.

Everything else is derived from it: the node-config parser (client/site_policy.py)
and writer (client/site_agent.py: SiteSettings.policy), the `fedlora client` flags
(fedlora/cli/deployment.py), the keys a decline may name (fedlora/messages.py:
POLICY_KEYS) and the table in docs/deployment.md
(`python -m fedlora.site_policy_keys` prints it; tests/test_site_policy_table.py fails
when any of them, the SitePolicy dataclass or docs/privacy.md's table disagrees).
No torch, no Flower: the CLI builds its parser from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class PolicyKey:
    key: str  # the node-config key
    kind: str  # "float", "int", "bool", "str" or "labels" (comma-separated names)
    default: object  # what a site that does not set the key gets
    meaning: str  # one line, for --help and the docs
    metavar: str = ""  # the flag's value placeholder (none for a bool flag)
    choices: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        """The attribute name in SitePolicy and SiteSettings."""
        return self.key.replace("-", "_")

    @property
    def flag(self) -> str:
        """The `fedlora client` flag: a bool that defaults to true is turned off with --no-KEY."""
        return f"--no-{self.key}" if self.kind == "bool" and self.default else f"--{self.key}"


SITE_POLICY: tuple[PolicyKey, ...] = (
    PolicyKey("max-epsilon", "float", math.inf, "the site's own privacy limit over all runs; required, unless "
              "--no-privacy-limit (then the key is absent: no limit)", "EPS"),
    PolicyKey("max-delta", "float", DEFAULT_MAX_DELTA, "the largest delta the site accepts; its budget is measured at it", "D"),
    PolicyKey("privacy-unit", "str", "example", "what DP protects: one row (example), or all rows of one user (user)",
              choices=("example", "user")),
    PolicyKey("user-column", "str", "user_id", "the column naming each row's user, under --privacy-unit user", "NAME"),
    PolicyKey("allow-no-dp", "bool", False, "take part in runs that train without DP (otherwise declined)"),
    PolicyKey("text-column", "str", "text", "the site's text column", "NAME"),
    PolicyKey("label-column", "str", "label", "the site's label column (classification)", "NAME"),
    PolicyKey("prompt-column", "str", "prompt", "the site's prompt column (causal LM)", "NAME"),
    PolicyKey("response-column", "str", "response", "the site's response column (causal LM)", "NAME"),
    PolicyKey("max-evaluations", "int", 0, "evaluations the site answers per run, each that read data counted (0 = no cap)",
              "N"),
    PolicyKey("calibrate-to-limit", "bool", True, "a site whose limit is below the run's plan adds noise to stay within "
              "it for every round; turned off, it declines the rounds past its limit instead"),
    PolicyKey("max-noise-increase", "float", 4.0, "decline a round whose noise, raised to stay within the limit, would "
              "exceed X times the run's plan (little left to learn; 0 = no cap)", "X"),
    PolicyKey("require-secure-aggregation", "bool", False, "decline every run without secure aggregation (needs --peer-keys)"),
    PolicyKey("allow-distributed-dp", "bool", False, "take part in privacy.mode = 'distributed': one DP-SGD step per "
              "round whose noise the sites add together under secure aggregation (needs --peer-keys; trusts that few "
              "sites drop out or collude)"),
    PolicyKey("min-distributed-tolerance", "int", 1, "under distributed DP, decline runs whose "
              "privacy.distributed_tolerance (dropped or colluding sites the noise still covers) is below N", "N"),
    PolicyKey("min-sites", "int", 3, "under secure aggregation, refuse an aggregation whose roster, sharers or survivors "
              "are fewer than N sites (at least 2; with 2, one colluding site and the coordinator learn this one's "
              "update)", "N"),
    PolicyKey("min-records", "int", 0, "decline every run while the site's data holds fewer than N privacy units "
              "(rows, or users under --privacy-unit user), counted before any split; the decline names the key, "
              "not the count (0 = no minimum)", "N"),
    PolicyKey("labels", "labels", (), "classification: the site's label names in class-id order, comma-separated; a run "
              "with other data.labels is declined before data is read, and every row's label must be one of them at "
              "start (not declared: the site declines classification runs)", "A,B,..."),
)
BY_KEY = {p.key: p for p in SITE_POLICY}


def shown_default(p: PolicyKey) -> str:
    """The default as the docs and --help say it."""
    if p.key == "max-epsilon":
        return "none (required)"
    if p.kind == "labels":
        return "not declared"
    if p.kind == "bool":
        return "true" if p.default else "false"
    return f"{p.default:g}" if isinstance(p.default, float) else str(p.default)


def markdown_table() -> str:
    """docs/deployment.md's table of the policy keys."""
    lines = ["| node config key (type) | `fedlora client` flag | default | meaning |", "| --- | --- | --- | --- |"]
    for p in SITE_POLICY:
        flag = f"{p.flag} {'|'.join(p.choices) or p.metavar}".strip().replace("|", "\\|")
        lines.append(f"| `{p.key}` ({p.kind}) | `{flag}` | {shown_default(p)} | {p.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
