"""`python -m fedlora.simulations.bench_secure_aggregation`: what secure aggregation costs
a round on this machine, measured in one run.

1. The protocol's own work (privacy/secure_aggregation.py, in process), per site and at
   the coordinator, for N sites and an adapter of V trained values (default: the demo's),
   with one site dropping after masking, and the bytes each site sends per step.
2. Deployed: each of the four extra exchanges runs the ClientApp in a fresh process;
   a fresh process that imports the site's ClientApp and answers one step is timed.
3. `--simulation`: `fedlora simulate` (3 sites, 1 round, the default model) with and
   without secure aggregation; the seconds of the training round from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.privacy import secure_aggregation as sa
from fedlora.privacy import secure_aggregation_records as records


def demo_trained_values() -> int:
    """Trained values of the default demo's adapter (LoRA on the default model + the head)."""
    from fedlora.adapter_state import adapter_of
    from fedlora.base_model import build_peft_model
    from fedlora.config import load_config
    from fedlora.simulations.triage_notes import DEPARTMENTS

    config = load_config(None, {"data.labels": sorted(DEPARTMENTS)})
    model = build_peft_model(config.model, config.lora, num_labels=len(config.data.labels), seed=0)
    return sum(t.numel() for t in adapter_of(model).values())


def protocol(sites: int, values: int) -> dict[str, float]:
    """One aggregation among `sites`, the last one dropping after masking; seconds per step
    (per site: the mean over sites) and bytes per site per step."""
    context = os.urandom(32)
    node_keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(sites)]
    ids = list(range(1, sites + 1))
    trusted = {sa.node_key_bytes(k.public_key()) for k in node_keys}
    threshold = sites // 2 + 1
    spec = sa.QuantizationSpec(1.0, records.LEVELS, sites, records.MAX_WEIGHT)
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}

    def timed(name: str, fn, per_site: bool = True):
        start = time.perf_counter()
        result = fn()
        out[name] = (time.perf_counter() - start) / (sites if per_site else 1)
        return result

    advertised = timed("site_keys_s", lambda: [sa.advertise(i, context, k) for i, k in zip(ids, node_keys)])
    states, keys = [s for s, _ in advertised], [k for _, k in advertised]
    roster, _ = timed("coordinator_roster_s", lambda: sa.collect_keys(keys, trusted, context), per_site=False)

    def share_all():
        for s in states:
            sa.accept_roster(s, roster, trusted, threshold)
        return [sa.share_keys(s, threshold) for s in states]

    shares = timed("site_shares_s", share_all)
    inbox = {v: {u: shares[u - 1][v] for u in ids if u != v} for v in ids}
    updates = [rng.normal(0, 0.01, values) for _ in ids]
    masked = timed("site_mask_s", lambda: {s.site: sa.masked_input(s, np.concatenate([
        sa.quantize(x, 64, spec, rng), np.array([64], dtype=np.uint64)]), set(ids), spec.modulus_bits)
        for s, x in zip(states, updates)})
    survivors = set(ids[:-1])
    masked.pop(ids[-1])
    signatures = timed("site_sign_s", lambda: {s.site: sa.sign_survivors(s, survivors, node_keys[s.site - 1])
                                              for s in states[:-1]})
    revealed = timed("site_reveal_s", lambda: {s.site: sa.reveal(s, inbox[s.site], survivors, threshold, signatures)
                                              for s in states[:-1]})
    total = timed("coordinator_unmask_s", lambda: sa.unmask(roster, masked, revealed, set(ids), threshold,
                                                            spec.modulus_bits, context), per_site=False)
    mean = sa.dequantize(total[:-1], int(total[-1]), spec)
    out["max_error"] = float(np.abs(mean - np.mean(updates[:-1], axis=0)).max())
    key_bytes = sum(len(v) for v in records.keys_reply(keys[0]).values())
    share_bytes = sum(len(b) for b in shares[0].values())
    reveal_bytes = sum(len(v[2]) + 16 for v in revealed[1].values())
    out.update({"bytes_keys": key_bytes, "bytes_shares": share_bytes, "bytes_masked": 8 * (values + 1),
                "bytes_plain_fp32": 4 * values, "bytes_signature": len(signatures[1]), "bytes_reveal": reveal_bytes})
    return out


PROCESS_STEP = """
import time, sys
t0 = time.time()
import fedlora.cli.flower_app  # what a site's ClientApp process imports before it handles a message
from cryptography.hazmat.primitives.asymmetric import ec
from fedlora.privacy import secure_aggregation as sa
sa.advertise(1, b"c" * 32, ec.generate_private_key(ec.SECP384R1()))
print(time.time() - float(sys.argv[1]))
"""


def process_step(repeats: int, checkout: Path | None = None) -> float:
    """Median seconds of a fresh process that imports the site's ClientApp (from `checkout`,
    default: the installed fedlora) and answers one step."""
    times = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", PROCESS_STEP, str(time.time())], capture_output=True, text=True,
                              check=True, cwd=checkout)
        times.append(float(proc.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def simulated_round(secure: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "1", "--output", str(out),
               "--set", "simulation.cpus_per_client=1", "--set", f"federation.secure_aggregation={str(secure).lower()}"]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows[1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="5,20", help="site counts (default 5,20)")
    parser.add_argument("--values", type=int, default=0, help="trained values per site (default: the demo adapter's)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes for the deployed step (default 3)")
    parser.add_argument("--simulation", action="store_true", help="also time a simulated round with and without it")
    parser.add_argument("--compare-checkout", type=Path, metavar="DIR",
                        help="also time the deployed step with the fedlora source tree in DIR (e.g. an older commit)")
    args = parser.parse_args()
    values = args.values or demo_trained_values()
    print(f"trained values per site: {values:,}")
    for n in map(int, args.sites.split(",")):
        r = protocol(n, values)
        print(f"\n{n} sites, one dropping after masking (max error of the mean {r['max_error']:.1e}):")
        print(f"  per site: keys {r['site_keys_s'] * 1e3:.1f} ms, shares {r['site_shares_s'] * 1e3:.1f} ms, "
              f"quantize+mask {r['site_mask_s'] * 1e3:.1f} ms, sign {r['site_sign_s'] * 1e3:.1f} ms, "
              f"reveal {r['site_reveal_s'] * 1e3:.1f} ms")
        print(f"  coordinator: roster {r['coordinator_roster_s'] * 1e3:.1f} ms, unmask {r['coordinator_unmask_s'] * 1e3:.1f} ms")
        print(f"  bytes up per site: keys {r['bytes_keys']}, shares {r['bytes_shares']:,}, masked input "
              f"{r['bytes_masked']:,} (plain fp32 tensors: {r['bytes_plain_fp32']:,}), signature {r['bytes_signature']}, "
              f"reveal {r['bytes_reveal']:,}")
    step = process_step(args.repeats)
    if args.compare_checkout:
        other = process_step(args.repeats, args.compare_checkout.resolve())
        print(f"\ndeployed step with the tree in {args.compare_checkout}: {other:.1f} s")
    print(f"\ndeployed: a fresh ClientApp process answering one step: {step:.1f} s (median of {args.repeats}); "
          f"four extra exchanges a round: about {4 * step:.0f} s of process starts per site, in parallel across sites")
    if args.simulation:
        plain, secure = simulated_round(False), simulated_round(True)
        print(f"simulation (3 sites, default model, 1 round): round 1 took {plain:.1f} s plain, {secure:.1f} s secure")


if __name__ == "__main__":
    main()
