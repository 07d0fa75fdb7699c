"""The `fedlora` command line. Each command's module is imported only when run."""

from __future__ import annotations

import argparse
import sys

from fedlora.config import ConfigError, load_config, parse_override

SIMULATE_HELP = """\
Run a whole federation on this machine: virtual sites (Flower's simulation
engine) each fine-tune a LoRA adapter on their share of the data under DP-SGD,
and the coordinator aggregates them round by round. With no arguments it runs
the built-in default: the pretrained all-MiniLM-L6-v2 learning to route
synthetic clinical triage notes to departments. Results go to the run
directory: config.toml, metrics.jsonl, labels.json, adapter/, checkpoints/.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning under differential privacy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="run a federation of virtual sites on this machine", description=SIMULATE_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--config", metavar="FILE", help="TOML run configuration (keys as in ARCHITECTURE.md); defaults otherwise")
    sim.add_argument("--clients", type=int, metavar="N", help="number of virtual sites (simulation.clients)")
    sim.add_argument("--rounds", type=int, metavar="R", help="federated rounds (federation.rounds)")
    sim.add_argument("--output", metavar="DIR", help="run directory (run.output_dir); an existing run is never overwritten")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.lr=0.01 --set strategy.name=fedavg (repeatable)")
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(item) for item in args.set)
    for key, value in (("simulation.clients", args.clients), ("federation.rounds", args.rounds), ("run.output_dir", args.output)):
        if value is not None:
            overrides[key] = value
    config = load_config(args.config, overrides)

    from simulations.runner import simulate

    simulate(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedlora.base_model import ModelError
    from fedlora.text_data import DataError
    from server.federation import FederationError

    try:
        if args.command == "simulate":
            return run_simulate(args)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except FederationError as exc:
        print(f"fedlora: run stopped: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
