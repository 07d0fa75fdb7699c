"""App pinning at the site (issue 10, part A) and the site policy flags of
`fedlora client` (part B).

- The app hash: `fedlora app-hash` equals the hash of the FAB Flower builds from the
  same folder; a changed byte, an added file or another ClientApp reference change it.
- `--allow-app` / `--allow-apps` parsing; `--max-epsilon` required unless
  `--no-privacy-limit`; every policy flag reaches Flower's node-config parser intact;
  bad flags and data without the site's columns are one-line errors without values.
- The pinned ClientApp loader imports the approved bundle's code, not the installed
  package that the trusted process had imported, and refuses code from elsewhere.
- In a real deployment (TLS, node auth, sites started with `fedlora client`), a bundle
  with one changed line is refused at every site before any of its code runs, and the
  unmodified app then runs on the same sites: the first run of
  tests/test_deployment.py's three-site test.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomli_w

from fedlora.client.app_pinning import AppPinningError, approved_hashes, decide, parse_app_hash, read_allowed_apps
from fedlora.client.site_agent import SiteError, SiteSettings, validate_site
from fedlora.app_hash import AppHashError, app_dir_hash, build_app_fab, fab_code_hash, installed_app_dir, stage_app
from fedlora.cli import main
from fedlora.flower_env import flower_env
from tests.helpers.app_bundles import copy_app
from tests.helpers.site_data import write_site_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "fedlora")


# --- The app hash ---------------------------------------------------------------


def test_app_hash_command_prints_the_hash_of_the_fab_flower_builds(app_copy, capsys):
    from flwr.cli.build import build_fab_from_disk  # what `flwr build` and `flwr run` bundle

    assert main(["app-hash", str(app_copy)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == fab_code_hash(build_fab_from_disk(app_copy))
    assert parse_app_hash(printed) == printed
    # The copy holds the installed release's code: the same hash as the installed app folder.
    assert main(["app-hash"]) == 0
    assert capsys.readouterr().out.strip() == printed == app_dir_hash(installed_app_dir())


def test_a_changed_byte_an_added_file_or_another_clientapp_change_the_hash(app_copy, tmp_path):
    base = app_dir_hash(app_copy)
    app = shutil.copytree(app_copy, tmp_path / "fedlora")

    path = app / "privacy" / "budget_guard.py"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert app_dir_hash(app) != base
    path.write_bytes(original)
    assert app_dir_hash(app) == base

    (app / "client" / "extra.py").write_text("x = 1\n")
    assert app_dir_hash(app) != base
    (app / "client" / "extra.py").unlink()

    # Run-config defaults in pyproject.toml are data, not code: the hash ignores them...
    pyproject = (app / "pyproject.toml").read_text()
    defaults = pyproject.replace('"train.lr" = 4.0', '"train.lr" = 3.0')
    assert defaults != pyproject
    (app / "pyproject.toml").write_text(defaults)
    assert app_dir_hash(app) == base
    # ... but not which ClientApp Flower loads.
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "fedlora.cli.flower_app:client_app"',
                                                          'clientapp = "fedlora.cli.flower_app:other"'))
    assert app_dir_hash(app) != base


def test_the_staged_submission_holds_the_bundles_files_only_and_hashes_the_same(app_copy, tmp_path):
    """`fedlora run` submits a staged copy (`flwr run` reads every file under its folder before
    filtering): the copy holds exactly the bundle's files and pyproject.toml, so the same hash."""
    app = shutil.copytree(app_copy, tmp_path / "fedlora")
    (app / ".gitignore").write_text(".venv/\nruns/\n")
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / ".venv" / "lib" / "big.py").write_text("x = 1\n")  # ignored, as a virtual environment is
    (app / "notes.md").write_text("not in fab-include\n")

    staged = tmp_path / "staged"
    app_hash = stage_app(app, staged)
    assert app_hash == app_dir_hash(app) == app_dir_hash(staged) == app_dir_hash(app_copy)
    with zipfile.ZipFile(io.BytesIO(build_app_fab(app))) as zf:
        bundled = {n for n in zf.namelist() if not n.startswith(".info/")}
    assert {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()} == bundled
    assert (staged / "pyproject.toml").read_bytes() == (app / "pyproject.toml").read_bytes()


def test_the_hash_of_a_bundle_counts_every_entry_and_refuses_forged_names(app_copy):
    fab = build_app_fab(app_copy)
    base = fab_code_hash(fab)
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}

    def rezip(extra: list[tuple[str, bytes]]) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            for name, data in [*entries.items(), *extra]:
                zf.writestr(name, data)
        return out.getvalue()

    assert fab_code_hash(rezip([])) == base  # zip metadata (compression, dates) is not part of it
    with pytest.warns(UserWarning, match="Duplicate name"):
        duplicated = rezip([("client/client_app.py", entries["client/client_app.py"])])
    assert fab_code_hash(duplicated) != base
    assert fab_code_hash(rezip([("client/__pycache__/client_app.cpython-311.pyc", b"\x00")])) != base
    with pytest.raises(AppHashError, match="control character"):
        fab_code_hash(rezip([("client/x.py\n0000  client/y.py", b"")]))
    # Names that point outside the app folder: ".info/../x.py" would be skipped as Flower's manifest.
    for name in (".info/../client/evil.py", "/etc/evil.py", "client\\evil.py", "client/./evil.py"):
        with pytest.raises(AppHashError, match="outside the app folder"):
            fab_code_hash(rezip([(name, b"import os")]))
    assert decide(b"not a zip", [base]).approved is False
    assert decide(fab, [base]).approved is True and decide(fab, []).approved is False


# --- Approved hashes, policy flags, node config ---------------------------------------


def test_allow_app_and_allow_apps_file_parsing(tmp_path):
    h1, h2 = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    assert parse_app_hash("SHA256:" + "AB" * 32) == h1
    for bad in ("ab" * 32, "sha256:" + "ab" * 31, "sha256:" + "zz" * 32, "md5:" + "ab" * 32):
        with pytest.raises(AppPinningError, match="--allow-app"):
            parse_app_hash(bad)
    listing = tmp_path / "approved.txt"
    listing.write_text(f"# the consortium's releases\n{h1}  # 0.1.0\n\n   {h2.upper().replace('SHA256', 'sha256')}\n")
    assert read_allowed_apps(listing) == [h1, h2]
    listing.write_text(f"{h1}\nnot-a-hash\n")
    with pytest.raises(AppPinningError, match=r"--allow-apps .*approved.txt: line 2 is not"):
        read_allowed_apps(listing)
    with pytest.raises(AppPinningError, match="not readable"):
        read_allowed_apps(tmp_path / "missing.txt")
    listing.write_text(f"{h2}\n{h1}\n")
    installed = "sha256:" + "ef" * 32
    assert approved_hashes([h1, h1], listing, installed=installed) == [installed, h1, h2]


def client_args(tmp_path: Path, *extra: str) -> list[str]:
    data = write_site_data(tmp_path / "notes.jsonl", rows=12)
    return ["client", "--coordinator", "127.0.0.1:1", "--insecure", "--data-path", str(data),
            "--state-dir", str(tmp_path / "state"), *extra]


def test_client_needs_max_epsilon_or_an_explicit_no_privacy_limit(tmp_path, capsys):
    assert main(client_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-epsilon" in err and "--no-privacy-limit" in err
    assert main(client_args(tmp_path, "--max-epsilon", "5", "--no-privacy-limit")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not both" in err
    assert main(client_args(tmp_path, "--max-epsilon", "5", "--allow-app", "sha256:nope")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-app" in err


@pytest.fixture
def site(tmp_path, tiny_models) -> SiteSettings:
    return SiteSettings(superlink="127.0.0.1:9093", data_path=write_site_data(tmp_path / "notes.jsonl", rows=12, users=3),
                        state_dir=tmp_path / "state", model_path=str(tiny_models["bert"]), max_epsilon=8.0, insecure=True)


def test_every_policy_key_survives_flowers_node_config_parser(site):
    from flwr.common.config import parse_config_args

    site.text_column, site.label_column = "note text", "dept=label"  # spaces, '=' and quotes of the other kind
    site.prompt_column, site.response_column, site.user_column = "it's", "réponse", "patient id"
    site.max_delta, site.privacy_unit, site.allow_no_dp = 1e-6, "user", True
    site.max_evaluations, site.calibrate_to_limit, site.lora_rank = 3, False, 4
    site.data_path.write_text(json.dumps({"note text": "a", "dept=label": "b", "patient id": "u"}) + "\n")
    from fedlora.client.site_keys import create_site_key

    site.key, public = create_site_key(site.state_dir.parent / "keys", "site 0")
    site.peer_keys, site.require_secure_aggregation = public, True
    site.allow_distributed_dp, site.min_distributed_tolerance, site.min_sites = True, 2, 4
    validate_site(site)
    expected = {
        "data-path": str(site.data_path), "model-path": site.model_path, "state-dir": str(site.state_dir),
        "max-epsilon": 8.0, "max-delta": 1e-6, "privacy-unit": "user", "user-column": "patient id",
        "allow-no-dp": True, "text-column": "note text", "label-column": "dept=label", "prompt-column": "it's",
        "response-column": "réponse", "max-evaluations": 3, "calibrate-to-limit": False, "lora-rank": 4,
        "require-secure-aggregation": True, "peer-keys": str(public), "node-key": str(site.key),
        "allow-distributed-dp": True, "min-distributed-tolerance": 2, "min-sites": 4, "max-noise-increase": 4.0,
        "min-records": 0,
    }
    parsed = parse_config_args([site.node_config()])
    assert parsed == expected
    assert [type(parsed[k]) for k in ("max-epsilon", "max-delta", "max-evaluations", "allow-no-dp")] == [float, float, int, bool]

    # Defaults, always passed; no max-epsilon key under --no-privacy-limit.
    plain = SiteSettings(superlink="x:1", data_path=site.data_path, state_dir=site.state_dir, no_privacy_limit=True)
    parsed = parse_config_args([plain.node_config()])
    assert "max-epsilon" not in parsed
    assert {k: parsed[k] for k in plain.policy()} == {
        "max-delta": 1e-5, "privacy-unit": "example", "user-column": "user_id", "allow-no-dp": False,
        "text-column": "text", "label-column": "label", "prompt-column": "prompt", "response-column": "response",
        "max-evaluations": 0, "calibrate-to-limit": True, "require-secure-aggregation": False,
        "allow-distributed-dp": False, "min-distributed-tolerance": 1, "min-sites": 3, "max-noise-increase": 4.0,
        "min-records": 0}


@pytest.mark.parametrize("change, message", [
    ({"max_epsilon": None}, "--max-epsilon EPS is required"),
    ({"max_epsilon": float("inf")}, "--max-epsilon must be > 0 and finite"),
    ({"max_delta": 0.0}, "--max-delta must be in (0, 1)"),
    ({"max_delta": 1.0}, "--max-delta must be in (0, 1)"),
    ({"privacy_unit": "row"}, "--privacy-unit must be one of example, user"),
    ({"max_evaluations": -1}, "--max-evaluations must be >= 0"),
    ({"text_column": "  "}, "--text-column: a column name cannot be empty"),
    ({"label_column": 'a"b'}, "--label-column 'a\"b': a column name with a double quote"),
    ({"user_column": "a\\b"}, "--user-column"),
])
def test_bad_policy_flags_are_one_line_errors_naming_the_flag(site, change, message):
    for name, value in change.items():
        setattr(site, name, value)
    with pytest.raises(SiteError) as info:
        validate_site(site)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_data_check_names_missing_columns_never_values(site, tmp_path):
    def rows_file(rows: list[dict]) -> Path:
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    secret = "Jane Doe"
    site.privacy_unit = "user"
    for rows, expected in [
        ([{"text": secret, "user_id": "u"}, {"body": secret}], "row 2 has no column 'text' (--text-column) and no columns 'prompt' and 'response'"),
        ([{"prompt": secret, "user_id": "u"}], "row 1 has no column 'response' (--response-column)"),
        ([{"text": secret, "user_id": "u"}, {"text": secret}], "row 2 has no column 'user_id' (--user-column, needed by --privacy-unit user)"),
    ]:
        site.data_path = rows_file(rows)
        with pytest.raises(SiteError) as info:
            validate_site(site)
        assert expected in str(info.value) and secret not in str(info.value)
    # Accepted: text + label, text only, prompt + response (the site does not know the task).
    for rows in ([{"text": "a", "label": "b", "user_id": "u"}], [{"text": "a", "user_id": "u"}],
                 [{"prompt": "a", "response": "b", "user_id": "u"}]):
        site.data_path = rows_file(rows)
        validate_site(site)
    # The site's own column names.
    site.privacy_unit, site.text_column = "example", "note"
    site.data_path = rows_file([{"note": "a"}])
    validate_site(site)
    csv = tmp_path / "rows.csv"
    csv.write_text("note,label\na,b\nc\n")  # row 2 is short: its label is missing, its note is there
    site.data_path = csv
    validate_site(site)


# --- What runs is what was approved ---------------------------------------------------

LOADER_CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import fedlora.client.pinned_clientapp as pinned  # the trusted process imports the installed fedlora
    from fedlora.app_hash import installed_files_hash

    app, decoy = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, decoy)  # another fedlora, with its own client floor, lies first on sys.path
    assert sys.modules["fedlora.client"].__file__.startswith(sys.argv[3])  # installed, so far
    client_app, packages = pinned.load_approved_clientapp(app, installed_files_hash(app))
    module = sys.modules["fedlora.client.client_app"]
    result = {"file": module.__file__, "mark": module.MARK, "client": sys.modules["fedlora.client"].__file__,
              "fedlora": sys.modules["fedlora"].__file__, "foreign": pinned.foreign_modules(packages, app)}

    class Hijack:  # a finder ahead of everything that serves `fedlora.client` from elsewhere
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "fedlora.client" or name.startswith("fedlora.client."):
                from importlib.machinery import PathFinder
                return PathFinder.find_spec(name, [decoy] if name == "fedlora.client" else [decoy + "/client"])
            return None

    sys.meta_path.insert(0, Hijack)
    try:
        pinned.load_approved_clientapp(app, installed_files_hash(app))
        result["hijack"] = "loaded"
    except pinned.ForeignCodeError as exc:
        result["hijack"] = str(exc)
    print(json.dumps(result))
""")


def app_folder(folder: Path, mark: str) -> Path:
    """A Flower App laid out as fedlora's bundle is: fedlora/ and the floors beside it."""
    (folder / "fedlora").mkdir(parents=True)
    (folder / "client").mkdir()
    (folder / "pyproject.toml").write_text(tomli_w.dumps(
        {"tool": {"flwr": {"app": {"components": {"clientapp": "fedlora.client.client_app:app"}}}}}))
    (folder / "fedlora" / "__init__.py").write_text((ROOT / "fedlora" / "__init__.py").read_text())
    (folder / "client" / "__init__.py").write_text("")
    (folder / "client" / "client_app.py").write_text(
        f"from flwr.clientapp import ClientApp\nMARK = {mark!r}\napp = ClientApp()\n")
    return folder


def test_the_approved_bundle_is_what_is_imported_whatever_lies_first_on_sys_path(tmp_path):
    app = app_folder(tmp_path / "apps" / "fedlora.fedlora.0.1.0.12345678", "bundle")
    decoy = app_folder(tmp_path / "decoy", "decoy")

    out = subprocess.run([sys.executable, "-I", "-c", LOADER_CHECK, str(app), str(decoy), str(ROOT)],
                         capture_output=True, text=True, timeout=120, env=flower_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mark"] == "bundle" and result["file"] == str(app / "client" / "client_app.py")
    assert result["client"] == str(app / "client" / "__init__.py") and result["foreign"] == []
    assert result["fedlora"] == str(app / "fedlora" / "__init__.py")
    assert result["hijack"].startswith("modules loaded from outside the approved bundle: fedlora.client")
