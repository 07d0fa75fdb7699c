"""The deployment commands of `fedlora`: the coordinator service, the site agent,
submitting and resuming runs, the operator's certificate/key/registration helpers,
and exporting a run's adapter. Each implementation is imported only when run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fedlora.config import Config, parse_override
from fedlora.site_policy_keys import SITE_POLICY, PolicyKey, shown_default

DEPLOYMENT_GUIDE = "See docs/deployment.md for a three-site TLS federation with node authentication."


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-dir", type=Path, metavar="DIR", help="the coordinator's state dir (on this machine)")
    p.add_argument("--superlink", metavar="HOST:PORT", help="the coordinator's address (from another machine)")
    p.add_argument("--root-cert", type=Path, metavar="FILE", help="the CA certificate (ca.pem) with --superlink")
    p.add_argument("--insecure", action="store_true", help="no TLS (a local trial only)")


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per site-policy key (fedlora/site_policy_keys.py), into the attribute of its
    SiteSettings field; a bool that defaults to true is turned off with --no-KEY."""
    for p in SITE_POLICY:
        said = p.kind == "bool" or _flag_default(p) is None  # the flag or the meaning says it
        options: dict = {"dest": p.field, "help": p.meaning if said else f"{p.meaning} (default {shown_default(p)})"}
        if p.kind == "bool":
            options["action"] = "store_false" if p.default else "store_true"
        else:
            options["metavar"] = p.metavar or None
            options["type"] = _FLAG_TYPES[p.kind]
            options["default"] = _flag_default(p)
            if p.choices:
                options.update(choices=p.choices, metavar=None)
        parser.add_argument(p.flag, **options)


_FLAG_TYPES = {"float": float, "int": int, "str": str, "labels": lambda value: value.split(",")}


def _flag_default(p: PolicyKey) -> object:
    # max-epsilon and labels have no default a site could get by saying nothing:
    # the limit is required (or --no-privacy-limit), the labels are declared or absent.
    return None if p.key in ("max-epsilon", "labels") else p.default


def add_deployment_commands(commands: argparse._SubParsersAction) -> None:
    c = commands.add_parser(
        "coordinator", help="start the coordinator service (a Flower SuperLink with TLS and node authentication)",
        description="Start a Flower SuperLink with TLS, node authentication (only registered sites may join) and a "
                    "persistent database under --state-dir. Runs are submitted to it with `fedlora run`. " + DEPLOYMENT_GUIDE)
    c.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="database, log and operator connection live here")
    c.add_argument("--certs", type=Path, metavar="DIR", help="folder with ca.pem, server.pem, server.key (`fedlora certs`)")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other machines; default 127.0.0.1)")
    c.add_argument("--port", type=int, default=9093, help="port for sites and operator commands (default 9093)")
    c.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: a local trial only")

    s = commands.add_parser(
        "client", help="start the client agent of one site (a Flower SuperNode)",
        description="Check this site's settings (policy flags, data readable with this site's columns, model folder "
                    "loads, state dir writable, key and certificate parse), then connect to the coordinator as a "
                    "Flower SuperNode. Training happens here; only adapter tensors and a few scalar metrics leave the "
                    "site. The site runs only app code it approved: by default the fedlora release installed here "
                    "(`fedlora app-hash`); other runs are refused before their code is imported. " + DEPLOYMENT_GUIDE)
    s.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    s.add_argument("--root-cert", type=Path, metavar="FILE", help="the CA certificate that signed the coordinator's (ca.pem)")
    s.add_argument("--key", type=Path, metavar="FILE", help="this site's private key (`fedlora site-key`), registered at the coordinator")
    s.add_argument("--data-path", type=Path, required=True, metavar="FILE", help="this site's data: a .jsonl or .csv file")
    s.add_argument("--model-path", default="default", metavar="DIR",
                   help="this site's local copy of the base model ('default' = the embedded model)")
    s.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="this site's privacy ledger, audit log and local state")
    add_policy_flags(s)
    s.add_argument("--no-privacy-limit", action="store_true", help="run without an epsilon limit (instead of --max-epsilon)")
    s.add_argument("--allow-app", action="append", default=[], metavar="sha256:HEX",
                   help="also run this app hash (`fedlora app-hash`) besides the installed fedlora release (repeatable)")
    s.add_argument("--allow-apps", type=Path, metavar="FILE",
                   help="also run the app hashes in FILE (one sha256:HEX per line, # comments)")
    s.add_argument("--peer-keys", type=Path, metavar="FILE",
                   help="take part in secure aggregation: the public keys (.pub lines) of the consortium's sites, this "
                        "one's included, exchanged among the sites (not through the coordinator); the site signs with --key")
    s.add_argument("--lora-rank", type=int, metavar="R", help="this site's LoRA rank (needs strategy.name = 'exact' if it differs)")
    s.add_argument("--port", type=int, default=9094, help="this SuperNode's local API port (one per SuperNode on a machine)")
    s.add_argument("--insecure", action="store_true", help="no TLS (a local trial only)")
    s.add_argument("--give-up-after", metavar="DURATION",
                   help="while the coordinator cannot be reached the site says so every minute; after this long "
                        "(e.g. 90s, 10m, 2h) it stops with exit code 4 (default: it keeps trying)")

    r = commands.add_parser(
        "run", help="submit a federation run to the coordinator, or resume one",
        description="Validate the run configuration and submit it to the coordinator (`flwr run` with every key as "
                    "run config), then stream its log. The run directory goes to the absolute run.output_dir on the "
                    "coordinator's machine. With --resume RUN_DIR, continue that run after its last completed round.")
    r.add_argument("--config", metavar="FILE", help="TOML run configuration")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its last checkpoint")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    r.add_argument("--detach", action="store_true", help="submit and return without streaming the log")
    _connection_args(r)

    ah = commands.add_parser(
        "app-hash", help="print the app hash a site approves (of the installed fedlora, or of APP_DIR)",
        description="Print the hash of the app bundle `fedlora run` / `flwr run` would submit from APP_DIR: SHA-256 "
                    "over its code files (paths and contents) and its ClientApp reference, not over pyproject.toml. "
                    "A site runs a bundle only if this hash is approved (`fedlora client --allow-app`); by default it "
                    "approves the installed release. See docs/deployment.md.")
    ah.add_argument("app_dir", nargs="?", type=Path, metavar="APP_DIR",
                    help="a Flower App folder (pyproject.toml with [tool.flwr.app]; default: the installed fedlora)")

    k = commands.add_parser("certs", help="create a CA and the coordinator's TLS certificate (test or pilot deployments)",
                            description="Write ca.pem, ca.key, server.pem, server.key into --out. Give every name or "
                                        "IP address sites will dial with --host. Sites get ca.pem only.")
    k.add_argument("--out", type=Path, required=True, metavar="DIR")
    k.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name in the server certificate (repeatable; default: localhost and 127.0.0.1)")
    k.add_argument("--days", type=int, default=365, help="validity in days (default 365)")

    sk = commands.add_parser("site-key", help="create a site's node-authentication key pair",
                             description="Write NAME (private: stays at the site) and NAME.pub (give it to the "
                                         "coordinator's operator for `fedlora register-site`) into --out.")
    sk.add_argument("--out", type=Path, required=True, metavar="DIR")
    sk.add_argument("--name", required=True, help="the site's name, e.g. hospital-a")

    rs = commands.add_parser("register-site", help="allow a site's public key to join the coordinator",
                             description="Register a site's public key (NAME.pub) with the coordinator; prints the node id.")
    rs.add_argument("public_key", type=Path, metavar="KEY.pub")
    rs.add_argument("--name", help="a name for the site")
    _connection_args(rs)

    us = commands.add_parser("unregister-site", help="remove a site from the coordinator",
                             description="Unregister a site by node id (see `fedlora sites`); it can no longer connect.")
    us.add_argument("node_id", type=int, metavar="NODE_ID")
    _connection_args(us)

    ls = commands.add_parser("sites", help="list the sites registered at the coordinator")
    _connection_args(ls)

    sd = commands.add_parser("sample-data", help="write synthetic triage-note files, one per site, to try a deployment",
                             description="One JSONL file per site (text, label, patient_id) from the built-in synthetic "
                                         "triage-note generator; the labels are the 6 departments of the default task.")
    sd.add_argument("--out", type=Path, required=True, metavar="DIR")
    sd.add_argument("--sites", type=int, default=3, metavar="N", help="number of site files (default 3)")
    sd.add_argument("--notes", type=int, default=1200, metavar="N", help="notes per site (default 1200)")

    e = commands.add_parser(
        "export", help="write a run's final adapter, or the base model with it merged, loadable by transformers",
        description="Without --merge: the PEFT adapter (load with PeftModel.from_pretrained(base, DIR)) plus tokenizer "
                    "and labels.json. With --merge: a plain transformers model with the adapter merged in "
                    "(AutoModelForSequenceClassification / AutoModelForCausalLM.from_pretrained(DIR)); a mean-pooling classifier "
                    "(model.pooling) as an AutoModel folder plus classifier.safetensors, loaded by "
                    "fedlora.mean_pooling.load_exported(DIR) (docs/deployment.md). Either way DIR also gets dossier.json "
                    "and dossier.html: the base model, the app hash, the config, every site's signed privacy statement "
                    "and the largest epsilon; check it with `fedlora verify-dossier DIR`.")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write (must not exist or be empty)")
    e.add_argument("--merge", action="store_true", help="merge the adapter into the base model")
    e.add_argument("--model-path", metavar="DIR", help="the base model on this machine, if not the run's model.path")

    vd = commands.add_parser(
        "verify-dossier", help="re-check an export dossier: every signature and the consistency of its numbers",
        description="Check DIR/dossier.json (written by `fedlora export` and at the end of every run) from the file "
                    "alone: every site's privacy statement is well formed, signed by its signer, and the signer is a "
                    "registered site key (and, with --trusted-keys, one the reader got from the sites); every figure "
                    "derived from the statements (largest epsilon, sites, app hashes) is what the statements give; "
                    "every model file beside it has the recorded SHA-256. Prints one line. Exit 0 valid, 1 invalid, "
                    "2 bad input.")
    vd.add_argument("dir", type=Path, metavar="DIR", help="the folder holding dossier.json (an export, or a run directory)")
    vd.add_argument("--trusted-keys", type=Path, action="append", default=[], metavar="FILE",
                    help="OpenSSH public keys (one per line, as the sites' KEY.pub files) the reader trusts as the "
                         "sites': every statement must be signed by one of them (repeatable)")


def _home(args: argparse.Namespace) -> Path:
    from fedlora.server.coordinator_service import connection_home

    return connection_home(args.coordinator_dir and args.coordinator_dir.resolve(), args.superlink, args.root_cert, args.insecure)


def run_coordinator_cmd(args: argparse.Namespace) -> int:
    from fedlora.server.coordinator_service import CoordinatorSettings, run_coordinator

    return run_coordinator(CoordinatorSettings(args.state_dir.resolve(), args.certs and args.certs.resolve(), args.host,
                                               args.port, args.insecure))


def run_client_cmd(args: argparse.Namespace) -> int:
    from fedlora.client.site_agent import SiteSettings, run_site

    model = args.model_path if args.model_path == "default" else str(Path(args.model_path).expanduser().resolve())
    give_up_after = None
    if args.give_up_after is not None:
        from fedlora.client.coordinator_watch import parse_duration
        from fedlora.client.site_agent import SiteError

        try:
            give_up_after = parse_duration(args.give_up_after)
        except ValueError as exc:
            raise SiteError(f"--give-up-after: {exc}") from None
    return run_site(SiteSettings(
        superlink=args.coordinator, data_path=args.data_path.expanduser().resolve(), state_dir=args.state_dir.expanduser().resolve(),
        model_path=model, no_privacy_limit=args.no_privacy_limit, lora_rank=args.lora_rank,
        root_cert=args.root_cert and args.root_cert.resolve(), key=args.key and args.key.resolve(),
        insecure=args.insecure, runtime_port=args.port,
        allow_app=args.allow_app, allow_apps_file=args.allow_apps and args.allow_apps.expanduser().resolve(),
        peer_keys=args.peer_keys and args.peer_keys.expanduser().resolve(),
        **{p.field: getattr(args, p.field) for p in SITE_POLICY}, give_up_after=give_up_after,
    ))


def run_app_hash_cmd(args: argparse.Namespace) -> int:
    from fedlora.app_hash import app_dir_hash, installed_app_dir

    print(app_dir_hash(args.app_dir.resolve() if args.app_dir else installed_app_dir()))
    return 0


def run_run_cmd(args: argparse.Namespace) -> int:
    from fedlora.config import ConfigError
    from fedlora.server.run_submission import resolved_config, submit

    if args.config and args.resume:
        raise ConfigError("give either --config FILE (a new run) or --resume RUN_DIR, not both")
    config = resolved_config(args.config, dict(parse_override(item) for item in args.set), args.resume)
    code = submit(config, _home(args), stream=not args.detach)
    adapter = Path(config.run.output_dir) / "adapter" / "adapter_model.safetensors"
    if not args.detach and code == 0 and adapter.is_file():
        return _show_finished_run(config, args.coordinator_dir)
    return code


def _show_finished_run(config: Config, coordinator_dir: Path | None) -> int:
    """After a run: the summary table, the sites that did not deliver (by the operator's
    names), the report; exit 3 if the run ended before its planned rounds."""
    from fedlora.run_outcome import EXIT_ENDED_EARLY, ended_early, metrics_rows
    from fedlora.server import site_names
    from fedlora.server.progress import summary_table
    from fedlora.server.run_report import write_report

    rows = metrics_rows(config.run.output_dir)
    if rows:
        print(summary_table(rows), flush=True)
        run_dir = Path(config.run.output_dir)
        nodes = [s["node"] for row in rows for s in row.get("sites", [])]
        labels = site_names.record_run_labels(run_dir, coordinator_dir.resolve() if coordinator_dir else None, nodes)
        for line in site_names.problem_lines_by_label(rows, labels):
            print(f"[fedlora] {line}", flush=True)
        print(f"[fedlora] report: {write_report(config.run.output_dir)}", flush=True)
    if (message := ended_early(rows, config.federation.rounds, config.run.output_dir)) is not None:
        for line in message.splitlines():
            print(f"[fedlora] {line}", file=sys.stderr)
        return EXIT_ENDED_EARLY
    print(f"[fedlora] run finished: {config.run.output_dir}")
    return 0


def run_certs_cmd(args: argparse.Namespace) -> int:
    from fedlora.server.certificates import create_certificates

    paths = create_certificates(args.out.resolve(), args.host or ["localhost", "127.0.0.1"], args.days)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    print("Give sites ca.pem only; keep ca.key offline.")
    return 0


def run_site_key_cmd(args: argparse.Namespace) -> int:
    from fedlora.client.site_keys import create_site_key

    private, public = create_site_key(args.out.resolve(), args.name)
    print(f"private key (stays at the site): {private}\npublic key (for `fedlora register-site`): {public}")
    return 0


def run_register_cmd(args: argparse.Namespace) -> int:
    from fedlora.server import site_names
    from fedlora.server.coordinator_service import register_site

    name = args.name or (site_names.key_comment(args.public_key) if args.public_key.is_file() else None)
    node_id = register_site(_home(args), args.public_key, name)
    if args.coordinator_dir and name:
        site_names.record(args.coordinator_dir.resolve(), node_id, name)
    print(f"registered {args.public_key}{f' as {name}' if name else ''}: node id {node_id}")
    return 0


def run_unregister_cmd(args: argparse.Namespace) -> int:
    from fedlora.server.coordinator_service import unregister_site

    from fedlora.server import site_names

    unregister_site(_home(args), args.node_id)
    if args.coordinator_dir:
        site_names.forget(args.coordinator_dir.resolve(), args.node_id)
    print(f"unregistered node {args.node_id}")
    return 0


def run_sites_cmd(args: argparse.Namespace) -> int:
    from fedlora.server.coordinator_service import list_sites

    from fedlora.server import site_names

    names = site_names.load(args.coordinator_dir.resolve()) if args.coordinator_dir else {}
    for node in list_sites(_home(args)):
        name = names.get(int(node["node-id"]), "-")
        print(f"{node['node-id']:>22}  {name:<16}  {node['status']:<12}  online since {node['online-at']}")
    return 0


def run_sample_data_cmd(args: argparse.Namespace) -> int:
    from fedlora.simulations.sample_sites import LABELS, write_site_files

    for path in write_site_files(args.out.resolve(), args.sites, args.notes):
        print(path)
    print(f"labels (data.labels): {LABELS}")
    return 0


def run_export_cmd(args: argparse.Namespace) -> int:
    from fedlora.server.dossier_check import verify_dossier
    from fedlora.server.model_export import export_run

    out = export_run(args.run_dir, args.out.expanduser().resolve(), args.merge, args.model_path)
    print(f"{'merged model' if args.merge else 'adapter'} written to {out}")
    print(f"dossier: {out / 'dossier.html'} ({verify_dossier(out).line})")
    return 0


def run_verify_dossier_cmd(args: argparse.Namespace) -> int:
    """Exit 0 valid, 1 invalid, 2 bad input (a DossierInputError, one line)."""
    from fedlora.server.dossier_check import DossierInputError, read_trusted_keys, verify_dossier

    try:
        trusted = set().union(*(read_trusted_keys(p) for p in args.trusted_keys)) if args.trusted_keys else None
        result = verify_dossier(args.dir, trusted)
    except DossierInputError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    print(result.line)
    for problem in result.problems[1:]:
        print(f"  also: {problem}", file=sys.stderr)
    return 0 if result.valid else 1


DEPLOYMENT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "coordinator": run_coordinator_cmd, "client": run_client_cmd, "run": run_run_cmd, "app-hash": run_app_hash_cmd,
    "certs": run_certs_cmd,
    "site-key": run_site_key_cmd, "register-site": run_register_cmd, "unregister-site": run_unregister_cmd,
    "sites": run_sites_cmd, "sample-data": run_sample_data_cmd, "export": run_export_cmd,
    "verify-dossier": run_verify_dossier_cmd,
}
