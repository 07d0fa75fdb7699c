"""The site policy is written once (fedlora/site_policy_keys.py): the dataclass, the
node-config parser and writer, the `fedlora client` flags, the keys a decline may
name and both docs tables agree with it, key by key."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from fedlora.cli import build_parser
from fedlora.client.site_agent import SiteSettings
from fedlora.client.site_policy import SitePolicy, site_policy
from fedlora.config import Config, SitePolicySection
from fedlora.messages import POLICY_KEYS
from fedlora.site_policy_keys import SITE_POLICY, markdown_table

ROOT = Path(__file__).resolve().parent.parent

# A value unlike the default for each kind, valid for every key of that kind.
OTHER = {"float": 7.0, "int": 5, "bool": None, "str": "other", "labels": ("x", "y", "z")}


def other_value(p):
    if p.key == "max-delta":
        return 1e-6  # below 1
    if p.kind == "bool":
        return not p.default
    if p.choices:
        return next(c for c in p.choices if c != p.default)
    return OTHER[p.kind]


def test_the_dataclass_has_one_field_per_key_with_its_default():
    fields = dataclasses.fields(SitePolicy)
    assert [f.name for f in fields] == [p.field for p in SITE_POLICY]
    for f, p in zip(fields, SITE_POLICY):
        assert f.default == p.default, p.key


def test_every_key_goes_from_the_flag_to_the_node_config_to_the_policy():
    """A site started with every policy flag at a non-default value: the node config it
    writes holds each key, and the ClientApp's parser reads back exactly those values."""
    argv = ["client", "--coordinator", "x:1", "--data-path", "d.jsonl", "--state-dir", "s"]
    for p in SITE_POLICY:
        value = other_value(p)
        if p.kind == "bool":
            argv.append(p.flag)
        else:
            argv += [p.flag, ",".join(value) if p.kind == "labels" else str(value)]
    args = build_parser().parse_args(argv)
    settings = SiteSettings(superlink="x:1", data_path=Path("d.jsonl"), state_dir=Path("s"),
                            **{p.field: getattr(args, p.field) for p in SITE_POLICY})
    node_config = settings.policy()
    assert set(node_config) == {p.key for p in SITE_POLICY}
    policy = site_policy(Config(), node_config)
    for p in SITE_POLICY:
        got, want = getattr(policy, p.field), other_value(p)
        assert (tuple(got) if p.kind == "labels" else got) == want, p.key


def test_a_site_that_says_nothing_gets_the_defaults():
    policy = site_policy(Config(), {})
    assert all(getattr(policy, p.field) == p.default for p in SITE_POLICY)
    assert math.isinf(policy.max_epsilon)


def test_every_key_may_name_a_decline():
    assert {p.key for p in SITE_POLICY} <= set(POLICY_KEYS)


def test_the_simulation_policy_table_uses_the_same_keys():
    assert {f.name for f in dataclasses.fields(SitePolicySection)} <= {p.field for p in SITE_POLICY}


def test_the_deployment_guide_holds_the_table_as_the_code_prints_it():
    assert markdown_table() in (ROOT / "docs" / "deployment.md").read_text()


def test_the_privacy_docs_table_names_every_key_and_no_other():
    text = (ROOT / "docs" / "privacy.md").read_text()
    section = text[text.index("## The site's policy"):]
    rows = [line for line in section.split("\n\n")[2].splitlines() if line.startswith("| `")]
    named = {key for row in rows for key in re.findall(r"`([a-z][a-z-]*)`", row.split("|")[1])}
    assert named == {p.key for p in SITE_POLICY}


@pytest.mark.parametrize("p", SITE_POLICY, ids=lambda p: p.key)
def test_a_wrong_value_is_one_line_naming_the_key(p):
    from fedlora.client.site_policy import PolicyError

    if p.kind in ("str", "labels") and not p.choices:
        bad = "" if p.kind == "str" else "a,,b"
    elif p.kind == "bool":
        bad = "maybe"
    elif p.choices:
        bad = "nobody"
    else:
        bad = "many"
    with pytest.raises(PolicyError, match=f"'{p.key}'"):
        site_policy(Config(), {p.key: bad})
