"""`python -m fedlora.simulations.bench_accounting`: what a site's privacy accounting costs per
round, with and without the memo of Opacus's one-step RDP terms, measured in one run.

A site's ledger grows by two mechanisms a round (its DP-SGD steps and its noisy
evaluation release), and the site asks for the epsilon of its whole history a few
times a round (the budget guard before training, the ledger after it, the evaluation).
The PRV accountant bounds its discretisation domain with RDP, and Opacus evaluates the
RDP of every (sample rate, noise multiplier, order) in pure Python on every query, for
every history entry. Both variants run the same query sequence from cold caches; the
epsilons must agree exactly.
"""

from __future__ import annotations

import argparse
import time

from fedlora.privacy import accounting


def site_queries(rounds: int, sigma: float, rate: float, steps: int, eval_sigma: float) -> list[accounting.History]:
    """The histories a site asks about over `rounds` rounds, in order (3 queries a round)."""
    history: accounting.History = [(eval_sigma, 1.0, 3)]  # round 0's evaluation (3 released sums)
    queries = [list(history)]
    for _ in range(rounds):
        queries.append(history + [(sigma, rate, steps)])  # the budget guard, before training
        history = history + [(sigma, rate, steps)]
        queries.append(list(history))  # the ledger, after training
        history = history + [(eval_sigma, 1.0, 3)]
        queries.append(list(history))  # the evaluation release
    return queries


def run_queries(queries: list[accounting.History], delta: float, memo: bool) -> tuple[float, list[float]]:
    accounting.clear_caches()
    accounting.set_rdp_memo(memo)
    start = time.perf_counter()
    epsilons = [accounting.epsilon_of(h, delta) for h in queries]
    return time.perf_counter() - start, epsilons


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench_accounting", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    # A site of a 3,000-note, 3-round default run (its ledger): sigma 0.724 at q 0.151, 4 steps
    # a round; its evaluation releases 3 sums at sigma 13.05.
    queries = site_queries(args.rounds, 0.7243, 0.1513, 4, 13.05)
    before, eps_before = run_queries(queries, args.delta, memo=False)
    after, eps_after = run_queries(queries, args.delta, memo=True)
    accounting.set_rdp_memo(True)
    assert eps_before == eps_after, "the memo changed an epsilon"
    n = len(queries)
    print(f"{n} epsilon queries of a site over {args.rounds} rounds (PRV, delta {args.delta:g}); final epsilon {eps_after[-1]:.4f}")
    print(f"without the RDP memo: {before:6.2f} s ({before / n * 1000:6.0f} ms per query)")
    print(f"with the RDP memo:    {after:6.2f} s ({after / n * 1000:6.0f} ms per query), {before / after:.1f}x faster; epsilons identical")


if __name__ == "__main__":
    main()
