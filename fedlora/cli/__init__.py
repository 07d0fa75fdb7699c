"""The `fedlora` command line: the top of the house.

fedlora.cli is the composition root. It and the Flower App's components
(fedlora/cli/flower_app.py) are the only modules that wire the floors together
(server, client, simulations, strategies, privacy); the rest of the `fedlora`
package is the shared core and imports no floor (tests/test_layering.py). Each
command's module is imported only when run, so the commands that need no model stay
fast."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedlora.config import ConfigError, load_config, parse_override
from fedlora.cli.deployment import DEPLOYMENT_COMMANDS, add_deployment_commands

SIMULATE_HELP = """\
Run a whole federation on this machine: virtual sites (Flower's simulation
engine) each fine-tune a LoRA adapter on their share of the data under DP-SGD,
and the coordinator aggregates them round by round. With no arguments it runs
the built-in default: the pretrained all-MiniLM-L6-v2 learning to route
synthetic clinical triage notes to departments. Results go to the run
directory: config.toml, metrics.jsonl, labels.json, adapter/, checkpoints/.
The simulation engine runs in a private network namespace whose only interface
is loopback, so no other machine can reach it (Linux user namespaces; see
--allow-network, simulation.isolate_network and simulation.ray_address).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning under differential privacy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="run a federation of virtual sites on this machine", description=SIMULATE_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--config", metavar="FILE", help="TOML run configuration (keys as in docs/architecture.md and the README); defaults otherwise")
    sim.add_argument("--clients", type=int, metavar="N", help="number of virtual sites (simulation.clients)")
    sim.add_argument("--rounds", type=int, metavar="R", help="federated rounds (federation.rounds)")
    sim.add_argument("--output", metavar="DIR", help="run directory (run.output_dir); an existing run is never overwritten")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.lr=0.01 --set strategy.name=fedavg (repeatable)")
    sim.add_argument("--allow-network", action="store_true",
                     help="where a private network namespace is unavailable (not Linux, user namespaces disabled), run the "
                          "simulation engine on this machine's network anyway and name the ports it opens (default: refuse)")
    cmp = commands.add_parser(
        "compare", help="run the default task with each strategy, with and without DP, IID and non-IID, over seeds",
        description="Run `fedlora simulate` once per (strategy, DP on/off, IID/non-IID, seed) and write a Markdown table "
                    "(final accuracy as mean ± standard deviation over the seeds, bytes up per site per round, seconds "
                    "per round, wall seconds per run) to OUTPUT/table.md; every run's figures go to OUTPUT/results.json.")
    cmp.add_argument("--strategies", default="", metavar="A,B", help="comma-separated strategy names (default: all)")
    cmp.add_argument("--output", default="runs/compare", metavar="DIR", help="folder for the runs and table.md")
    cmp.add_argument("--seeds", type=int, default=1, metavar="N", help="runs per cell, with run.seed = 0 .. N-1 (default 1)")
    cmp.add_argument("--dp", choices=("both", "yes", "no"), default="both", help="DP on, off, or both (default both)")
    cmp.add_argument("--partitions", default="", metavar="A,B", help="non-IID (Dirichlet 0.5), IID, or both (default)")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override applied to every run")
    cmp.add_argument("--allow-network", action="store_true",
                     help="as for simulate: where network isolation is unavailable, run every simulation on this machine's network")
    cmp.add_argument("--epsilons", default="", metavar="E1,E2,...",
                     help="the privacy-utility curve instead: one run per epsilon per site and seed ('inf' = no DP), "
                          "fedavg on non-IID sites unless --set says otherwise, each scored on fresh held-out notes; "
                          "writes OUTPUT/curve.md and OUTPUT/curve.html (table and plot, with the no-DP line). "
                          "Example: --epsilons 1,2,4,8,inf")
    cmp.add_argument("--no-dp-lr", type=float, default=None, metavar="LR",
                     help="with --epsilons: the SGD rate of the 'inf' point, which trains without clipping (the DP "
                          "points' train.lr is for clipped gradients and diverges unclipped; default 0.5, the best "
                          "measured on the default task)")
    aud = commands.add_parser(
        "audit", help="empirical privacy audit: canaries inserted once each, membership AUC with and without noise",
        description="Insert canaries (random words with a random label) once each into the simulation's sites, train "
                    "the federation twice at the same compute, under the run's DP plan and with no noise (clipping "
                    "kept), and report each training's membership AUC (members against canaries never inserted) with "
                    "a 95%% bootstrap interval. Writes OUTPUT/audit.json and OUTPUT/audit.html (score histograms, ROC). "
                    "An audit is a lower bound on leakage; the accounted epsilon is the upper bound (docs/privacy.md). "
                    "Trains in this process, as the recipe study does: no engine starts, nothing listens.")
    aud.add_argument("--config", metavar="FILE", help="TOML run configuration (the default task otherwise); "
                                                      "simulation.dataset may name your own data file")
    aud.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    aud.add_argument("--canaries", type=int, default=200, metavar="N", help="canaries, half of them inserted (default 200)")
    aud.add_argument("--output", default="runs/audit", metavar="DIR", help="folder for audit.json and audit.html (default runs/audit)")
    add_deployment_commands(commands)
    priv = commands.add_parser(
        "privacy", help="show a site's privacy ledger: runs, rounds, epsilon spent, budget left",
        description="Read the privacy ledger in a site's state dir (node config `state-dir`; a virtual site's is "
                    "RUN_DIR/sites/<partition-id>) and show every DP-SGD mechanism the site applied, per run, with the "
                    "epsilon spent (Opacus accountant, composed over rounds and runs) and the budget left.")
    priv.add_argument("state_dir", metavar="STATE_DIR", help="the site's state directory")
    priv.add_argument("--json", action="store_true",
                      help="print one JSON object: per run accountant, delta, epsilon, history [[noise_multiplier, sample_rate, steps], ...]")
    priv.add_argument("--recompute", action="store_true",
                      help="recompute every epsilon with the accountant (seconds), ignoring the figures the site kept "
                           "beside its ledger when it recorded each entry")
    priv.add_argument("--verify", action="store_true",
                      help="check the hash chains and signed heads of the ledger and the audit log instead: one line, "
                           "exit 0 if they hold, 1 naming the file and the first entry that breaks them")
    priv.add_argument("--public-key", type=Path, metavar="FILE",
                      help="with --verify: the site's OpenSSH public key (its .pub); every signed head must be by it")
    report = commands.add_parser(
        "report", help="write RUN_DIR/report.html: plots of a run's rounds, privacy and participation",
        description="Write RUN_DIR/report.html, one self-contained page (inline SVG plots, no external URL) with "
                    "accuracy or perplexity and loss per round, each site's epsilon per round against the run's target, "
                    "sites trained / failed / declined per round, failures by reason, bytes on the wire, the resolved "
                    "config and the final adapter's location. `simulate` and `run` write it at the end of every run.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.toml, metrics.jsonl)")
    bench = commands.add_parser("bench", help="measure training costs on this machine",
                                description="Benchmarks that print a readable table, or JSON with --json.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    dp = benches.add_parser(
        "dp", help="step time and peak memory of plain LoRA vs DP-SGD (Opacus and the fast LoRA path)",
        description="Train the same model on the same batch with plain LoRA, DP-SGD via Opacus's hooks and DP-SGD via "
                    "the fast LoRA path, interleaved in one run, and report each one's median step time and peak "
                    "memory. Presets are random-init Llama-style models built from configs (nothing is downloaded): "
                    "tiny, llama-160m, llama-1.1b; 'default' is the embedded pretrained MiniLM on the default triage "
                    "task (classification, 6 departments, a batch of real notes).")
    dp.add_argument("--model", default="default", metavar="PRESET_OR_PATH",
                    help="default, tiny, llama-160m, llama-1.1b, or a local Hugging Face folder (default: default)")
    dp.add_argument("--batch", type=int, default=64, metavar="B", help="sequences per batch (default: 64)")
    dp.add_argument("--seq", type=int, default=64, metavar="T", help="tokens per sequence, at most for 'default' (default: 64)")
    dp.add_argument("--rank", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    dp.add_argument("--targets", default="qv", metavar="MODULES", help="LoRA targets: qv, auto, mlp_out or comma-separated names (default: qv)")
    dp.add_argument("--task", default="auto", choices=("auto", "classification", "causal-lm"),
                    help="auto: classification for 'default', causal-lm otherwise")
    dp.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: cpu)")
    dp.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="base model dtype; adapters stay fp32 (default: fp32)")
    dp.add_argument("--dp-impl", default="both", choices=("both", "fast", "opacus"), help="DP paths to measure (default: both)")
    dp.add_argument("--checkpointing", action="store_true", help="activation checkpointing (reentrant, as Opacus needs)")
    dp.add_argument("--steps", type=int, default=10, metavar="N", help="timed rounds, one step of each variant per round (default: 10)")
    dp.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds first (default: 1)")
    dp.add_argument("--json", action="store_true", help="print one JSON object (plain_ms, dp_ms, ratio, plain_peak_mb, dp_peak_mb, device, ...)")
    sim_bench = benches.add_parser(
        "simulation", help="client updates per second, peak memory and base-model loads for N virtual clients",
        description="Run `fedlora simulate` (DP on) with N virtual clients on a tiny BERT built from a config, once "
                    "with fedlora's one-base-model-per-worker cache and once reloading the base model on every client "
                    "call (the FlowerTune baseline), and report client updates per second, the peak resident memory of "
                    "the whole simulation (driver, Ray and its workers) and the number of base-model loads.")
    sim_bench.add_argument("--clients", type=int, required=True, metavar="N", help="virtual clients")
    sim_bench.add_argument("--rounds", type=int, default=2, metavar="R", help="rounds (default: 2)")
    sim_bench.add_argument("--per-round", type=int, default=10, metavar="K",
                           help="clients sampled per round, federation.clients_per_round (default: 10; 0 = all)")
    sim_bench.add_argument("--model", default="tiny", choices=("tiny", "default"),
                           help="tiny: a 2-layer BERT built from a config; default: the embedded MiniLM (default: tiny)")
    sim_bench.add_argument("--modes", default="cached,reload", metavar="A,B", help="cached, reload or both (default: both)")
    sim_bench.add_argument("--json", action="store_true", help="print a JSON list, one object per mode")
    local_bench = benches.add_parser(
        "local-training", help="one site's round (DP-SGD steps + evaluation) with LoRA on every layer vs the top k",
        description="One site of the default task (the embedded MiniLM, real triage notes) runs its rounds three ways, "
                    "interleaved in one process: LoRA on query/value of every layer; on the top k layers only "
                    "(lora.top_layers), through the whole model; and on the top k with the frozen lower layers kept per "
                    "example (train.cache_frozen_layers). Prints train and evaluation seconds per round.")
    local_bench.add_argument("--notes", type=int, default=1200, metavar="N", help="the site's notes, 20%% held for evaluation (default: 1200)")
    local_bench.add_argument("--rounds", type=int, default=4, metavar="R", help="rounds, the first fills the kept states (default: 4)")
    local_bench.add_argument("--steps", type=int, default=4, metavar="S", help="DP-SGD steps per round (default: 4)")
    local_bench.add_argument("--batch", type=int, default=64, metavar="B", help="expected batch (default: 64)")
    local_bench.add_argument("--seq", type=int, default=64, metavar="T", help="model.max_length (default: 64)")
    local_bench.add_argument("--top", type=int, default=2, metavar="K", help="lora.top_layers of the two top-k variants (default: 2)")
    local_bench.add_argument("--json", action="store_true", help="print a JSON list, one object per variant")
    deploy_bench = benches.add_parser(
        "deployment", help="a deployed site's per-round overhead: process start, model load, adapter load vs training",
        description="Flower runs every ClientApp message in a fresh process. Start fresh processes that do what a "
                    "site's train call does on the default model and task, and time process start + imports, the "
                    "base-model load, the adapter load, data loading and the local DP-SGD training (medians).")
    deploy_bench.add_argument("--repeats", type=int, default=3, metavar="N", help="fresh processes (default: 3)")
    deploy_bench.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    import json

    if args.bench == "deployment":
        from fedlora.simulations.bench_deployment import bench_deployment
        from fedlora.simulations.bench_deployment import format_table as deployment_table

        if args.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        result = bench_deployment(args.repeats, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(result, indent=1) if args.json else deployment_table(result))
        return 0
    if args.bench == "local-training":
        from fedlora.simulations.bench_local_training import LocalBenchOptions, bench_local_training
        from fedlora.simulations.bench_local_training import format_table as local_table

        if min(args.notes, args.rounds, args.steps, args.batch, args.seq, args.top) < 1 or args.notes < 10:
            raise ConfigError("--notes must be >= 10 and --rounds, --steps, --batch, --seq, --top >= 1")
        options = LocalBenchOptions(args.notes, args.rounds, args.steps, args.batch, args.seq, args.top)
        results = bench_local_training(options, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(results, indent=1) if args.json else local_table(results, options))
        return 0
    if args.bench == "simulation":
        from fedlora.simulations.bench_simulation import SimulationBenchOptions, bench_simulation
        from fedlora.simulations.bench_simulation import format_table as simulation_table

        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if not modes or set(modes) - {"cached", "reload"}:
            raise ConfigError(f"--modes: expected cached, reload or both, got {args.modes!r}")
        if args.clients < 2 or args.rounds < 1 or args.per_round < 0:
            raise ConfigError("--clients must be >= 2, --rounds >= 1 and --per-round >= 0")
        results = bench_simulation(SimulationBenchOptions(args.clients, args.rounds, args.per_round, modes=modes, model=args.model),
                                   progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(results, indent=1) if args.json else simulation_table(results))
        return 0

    from fedlora.simulations.bench_dp import BenchOptions, bench_dp, format_table

    options = BenchOptions(model=args.model, batch=args.batch, seq=args.seq, rank=args.rank, targets=args.targets,
                           task=args.task, device=args.device, dtype=args.dtype, dp_impl=args.dp_impl,
                           checkpointing=args.checkpointing, steps=args.steps, warmup=args.warmup)
    result = bench_dp(options)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def run_privacy(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    # Said at once: a missing folder needs no ledger.
    if not Path(args.state_dir).is_dir():
        raise ConfigError(f"{args.state_dir}: no privacy ledger here (no such folder; a site's state dir is its node config `state-dir`)")
    from fedlora.privacy.ledger_report import ledger_summary, ledger_table
    from fedlora.privacy.site_ledger import LedgerError

    if args.public_key is not None and not args.verify:
        raise ConfigError("--public-key goes with --verify")
    if args.verify:
        from fedlora.privacy.trail_verify import verify_site_trail

        try:
            verdict = verify_site_trail(args.state_dir, args.public_key)
        except LedgerError as exc:
            raise ConfigError(str(exc)) from None
        print(verdict.line, file=sys.stdout if verdict.intact else sys.stderr)
        return 0 if verdict.intact else 1
    try:
        summary = ledger_summary(args.state_dir, recompute=args.recompute)
    except LedgerError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(summary, indent=1) if args.json else ledger_table(summary))
    return 0


def plan_network(args: argparse.Namespace) -> None:
    """Once for all of compare's runs: refuse now if their engines cannot be isolated
    (unless --allow-network, then the runs are told to run open), and say which."""
    from fedlora.simulations.engine_network import OPEN, plan_runs

    plan = plan_runs(load_config(None, dict(parse_override(item) for item in args.set)), args.allow_network)
    plan.announce()
    if plan.mode == OPEN and args.allow_network:
        args.set.append("simulation.isolate_network=false")


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.simulations.compare_strategies import compare, known_partitions, known_strategies

    for item in args.set:
        parse_override(item)  # fail now, not in every run
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {args.seeds}")
    if args.no_dp_lr is not None and not args.epsilons:
        raise ConfigError("--no-dp-lr: only with --epsilons (it sets the curve's no-DP point)")
    if args.epsilons:
        from fedlora.simulations.privacy_utility import CURVE_FILE, NO_DP_LR, curve, parse_epsilons

        try:
            epsilons, partitions = parse_epsilons(args.epsilons), known_partitions(args.partitions or "non-IID")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(partitions) != 1:
            raise ConfigError("--epsilons: choose one of --partitions non-IID or IID for the curve")
        no_dp_lr = NO_DP_LR if args.no_dp_lr is None else args.no_dp_lr
        if not (no_dp_lr > 0 and math.isfinite(no_dp_lr)):
            raise ConfigError(f"--no-dp-lr: must be a finite number > 0, got {args.no_dp_lr}")
        plan_network(args)
        print(curve(Path(args.output), epsilons, args.set, args.seeds, partitions[0], no_dp_lr))
        print(f"curve: {Path(args.output) / CURVE_FILE}")
        return 0
    try:
        strategies, partitions = known_strategies(args.strategies), known_partitions(args.partitions)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    plan_network(args)
    print(compare(Path(args.output), strategies, args.set, args.seeds, args.dp, partitions))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from fedlora.simulations.privacy_audit import HTML_FILE, JSON_FILE, run_audit as audit, summary_line

    config = load_config(args.config, dict(parse_override(item) for item in args.set))
    output = Path(args.output)
    if (output / JSON_FILE).exists():
        raise ConfigError(f"--output {output}: holds an audit already ({JSON_FILE}); an audit never overwrites")
    try:
        result = audit(config, output, args.canaries, progress=lambda line: print(line, flush=True))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(summary_line(result))
    print(f"audit: {output / HTML_FILE}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from fedlora.server.run_report import write_report

    print(write_report(args.run_dir))
    return 0


def simulate_argv(args: argparse.Namespace) -> list[str]:
    """The `simulate` command line that `args` was parsed from (for the engine child)."""
    argv = ["simulate"]
    for flag, value in (("--config", args.config), ("--clients", args.clients), ("--rounds", args.rounds), ("--output", args.output)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv + (["--allow-network"] if args.allow_network else [])


def run_simulate(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(item) for item in args.set)
    for key, value in (("simulation.clients", args.clients), ("federation.rounds", args.rounds), ("run.output_dir", args.output)):
        if value is not None:
            overrides[key] = value
    config = load_config(args.config, overrides)

    from fedlora.simulations.engine_network import CHILD, SUPERVISOR, engine_role, place_engine, supervise_engine

    role = engine_role()
    if role == SUPERVISOR:  # this process stays light and stops the whole tree on Ctrl-C
        return supervise_engine(simulate_argv(args), config, args.allow_network)
    # The engine: placed before anything starts a thread (a private network can be entered only single-threaded).
    placement = place_engine(config, args.allow_network) if role == CHILD else None

    from fedlora.run_outcome import EXIT_ENDED_EARLY, ended_early
    from fedlora.simulations.runner import simulate

    run_dir, rows = simulate(config, announce=placement.announce if placement else None)  # it writes the report too
    if (message := ended_early(rows, config.federation.rounds, run_dir.path)) is not None:
        for line in message.splitlines():
            print(f"fedlora: {line}", file=sys.stderr)
        return EXIT_ENDED_EARLY
    return 0


# (module, class): errors shown as one line (exit 2); FederationError stops a run (exit 1).
ONE_LINE_ERRORS = [("fedlora.config", "ConfigError"), ("fedlora.text_data", "DataError"), ("fedlora.base_model", "ModelError"),
                   ("fedlora.client.site_agent", "SiteError"), ("fedlora.app_hash", "AppHashError"),
                   ("fedlora.server.coordinator_service", "CoordinatorError"), ("builtins", "FileExistsError")]
RUN_STOPPED_ERRORS = [("fedlora.server.message_exchange", "FederationError")]


def _loaded(errors: list[tuple[str, str]]) -> tuple[type[BaseException], ...]:
    """The classes among `errors` whose modules are imported. An exception raised here is
    an instance of a class whose module was imported, so the others cannot match, and
    importing them would cost seconds (several pull in torch and PEFT)."""
    return tuple(getattr(sys.modules[module], name) for module, name in errors if module in sys.modules)


# A reader that went away (`fedlora privacy DIR | head`) ends the command quietly, as it
# ends `cat`: 128 + SIGPIPE, no traceback.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be caught, not at interpreter exit
    except BrokenPipeError:
        import os

        # Python flushes stdout again at exit: point it at /dev/null so that flush succeeds.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return run_simulate(args)
        if args.command == "compare":
            return run_compare(args)
        if args.command == "audit":
            return run_audit(args)
        if args.command == "privacy":
            return run_privacy(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command in DEPLOYMENT_COMMANDS:
            return DEPLOYMENT_COMMANDS[args.command](args)
    except Exception as exc:  # pylint: disable=broad-except
        if isinstance(exc, _loaded(ONE_LINE_ERRORS)):
            print(f"fedlora: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, _loaded(RUN_STOPPED_ERRORS)):
            print(f"fedlora: run stopped: {exc}", file=sys.stderr)
            return 1
        raise
    return 1
