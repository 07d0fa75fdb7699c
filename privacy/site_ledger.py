"""A site's privacy ledger: every DP-SGD mechanism it applied, on its own disk.

One JSON file, `STATE_DIR/privacy-ledger.json`, holds per federation run the
accountant, delta and the mechanism history `(noise_multiplier, sample_rate,
steps)` with the round and time of each entry, plus the rounds the site declined.
Flower starts a fresh ClientApp process for every message, so the ledger, not
memory, is the site's truth. Writes go to a temporary file that is fsync'd and
renamed over the ledger: a crash leaves the old ledger or the new one, never half
of one. A lock file serialises sites' processes between the budget check and the
entry, so two trainings cannot both spend the last of a budget.

The site's cumulative epsilon composes every mechanism of every run in its ledger
with Opacus's accountant (privacy/accounting.py).
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.atomic_file import write_atomic

if TYPE_CHECKING:  # the accountant (Opacus, torch) loads when an epsilon is asked for, not to read a ledger
    from fedlora.privacy.accounting import History

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = ".privacy-ledger.lock"
FORMAT = 1


class LedgerError(RuntimeError):
    """The ledger cannot be read or written; the site must not train without it."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Mechanism:
    """What touched the site's data once: a round of local DP-SGD (`steps` Poisson-
    sampled Gaussian steps), an evaluation (Gaussian noise on `steps` released sums of
    sensitivity 1, sample rate 1), or a distributed DP-SGD step (kind "distributed": a
    Poisson-sampled Skellam release whose noise the sites add together under secure
    aggregation; `l2`/`l1` are its sensitivities and `trust` the assumption it rests on,
    privacy/skellam.py)."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    unit: str = "example"  # the privacy unit: "example" or "user"
    time: str = field(default_factory=utc_now)
    kind: str = "train"  # or "evaluation", "distributed"
    l2: float | None = None
    l1: float | None = None
    trust: str | None = None

    @property
    def entry(self) -> tuple:
        """The accountant's history entry."""
        base = (self.noise_multiplier, self.sample_rate, self.steps)
        return base if self.l2 is None else (*base, self.l2, self.l1)


@dataclass
class Declined:
    """A message the site refused: its limit would have been exceeded ("privacy
    budget"), or the run asked for more than its policy allows ("site policy: KEY")."""

    round: int
    epsilon_spent: float | None
    epsilon_would_be: float | None
    limit: float
    time: str = field(default_factory=utc_now)
    reason: str = "privacy budget"
    message: str = "train"  # the message type declined: query, train or evaluate


@dataclass
class RunLedger:
    run: str  # the federation run (the coordinator's run directory)
    accountant: str
    delta: float
    mechanisms: list[Mechanism] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)

    @property
    def history(self) -> History:
        return [m.entry for m in self.mechanisms]

    @property
    def epsilon(self) -> float:
        from fedlora.privacy.accounting import epsilon_of

        return epsilon_of(self.history, self.delta, self.accountant)


@dataclass
class SiteLedger:
    path: Path
    runs: list[RunLedger] = field(default_factory=list)
    max_epsilon: float = math.inf  # the limit in force at the last write

    @classmethod
    def load(cls, state_dir: str | Path) -> SiteLedger:
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            runs = [
                RunLedger(
                    r["run"], r["accountant"], float(r["delta"]),
                    [Mechanism(**m) for m in r["mechanisms"]], [Declined(**d) for d in r.get("declined", [])],
                )
                for r in raw["runs"]
            ]
            limit = raw.get("max_epsilon")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh: an unreadable ledger would silently reset the budget.
            raise LedgerError(f"privacy ledger {path}: unreadable ({exc}); fix or restore it before training") from None
        return cls(path, runs, math.inf if limit is None else float(limit))

    def save(self) -> None:
        """Atomic replace: write a temporary file, fsync it, rename it over the ledger."""
        data = {
            "format": FORMAT,
            "max_epsilon": None if math.isinf(self.max_epsilon) else self.max_epsilon,
            "runs": [asdict(r) for r in self.runs],
        }
        try:
            write_atomic(self.path, json.dumps(data, indent=1), durable=True)
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path}: cannot write ({exc})") from None

    def run(self, run: str, accountant: str, delta: float) -> RunLedger:
        """This run's section, created on first use. A run keeps its accountant and delta."""
        for r in self.runs:
            if r.run == run:
                if (r.accountant, r.delta) != (accountant, delta):
                    raise LedgerError(
                        f"privacy ledger {self.path}: run {run} was accounted with {r.accountant} at delta {r.delta}, "
                        f"now {accountant} at delta {delta}"
                    )
                return r
        self.runs.append(RunLedger(run, accountant, delta))
        return self.runs[-1]

    def record(self, run: str, accountant: str, delta: float, entry: Mechanism | Declined, limit: float) -> None:
        """Append one entry to `run` and write the ledger (before anything leaves the site)."""
        if isinstance(entry, Declined):
            # A decline spends nothing: it joins the run's section whatever that run asked for
            # (a run declined for its delta must not turn into a ledger error).
            section = next((r for r in self.runs if r.run == run), None) or self.run(run, accountant, delta)
            section.declined.append(entry)
        else:
            section = self.run(run, accountant, delta)
            section.mechanisms.append(entry)
        self.max_epsilon = limit
        self.save()
        if isinstance(entry, Mechanism):
            self.warm_report(section)

    def warm_report(self, section: RunLedger) -> None:
        """The report's epsilons for the entry just recorded to `section` (its run's, the
        site's after it, the site's total), kept beside the ledger so that `fedlora
        privacy` needs no accountant (privacy/epsilon_cache.py)."""
        from fedlora.privacy.epsilon_cache import EpsilonCache

        cache, latest = EpsilonCache(self.path.parent), self.runs[-1]
        before = [h for r in self.runs[: self.runs.index(section)] for h in r.history]
        cache.epsilon(section.history, section.delta, section.accountant)
        cache.epsilon(before + section.history, self.guard_delta(latest.delta), latest.accountant)
        cache.epsilon(self.history(), self.guard_delta(latest.delta), latest.accountant)
        cache.save()

    def run_epsilon(self, run: str) -> float:
        """What `run` alone has spent at this site (its own section, at its own delta), from
        the report's cache that `record` keeps warm; 0 for a run with no entries."""
        from fedlora.privacy.epsilon_cache import EpsilonCache

        section = next((r for r in self.runs if r.run == run and r.mechanisms), None)
        if section is None:
            return 0.0
        return EpsilonCache(self.path.parent).epsilon(section.history, section.delta, section.accountant)

    def history(self) -> History:
        """Every mechanism of every run, in order: they all touched this site's data."""
        return [h for r in self.runs for h in r.history]

    def guard_delta(self, delta: float) -> float:
        """The delta the site's total is stated at: the smallest of `delta` and every run's.
        A larger delta makes the same history look cheaper; a coordinator choosing one
        must not thereby unlock budget that the site spent at a smaller delta."""
        return min([delta] + [r.delta for r in self.runs if r.mechanisms])

    def epsilon(self, delta: float, accountant: str, extra: History = ()) -> float:
        """The site's cumulative epsilon over all runs (plus `extra`, planned), at the
        smaller of `delta` and every delta in the ledger."""
        from fedlora.privacy.accounting import epsilon_of

        return epsilon_of(self.history() + list(extra), self.guard_delta(delta), accountant)


@contextmanager
def open_ledger(state_dir: str | Path) -> Iterator[SiteLedger]:
    """The site's ledger under an exclusive lock, held until the block ends (check,
    train, record), so concurrent processes of one site cannot overspend its budget."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = (state_dir / LOCK_FILE).open("a")
    except OSError as exc:
        raise LedgerError(f"state dir {state_dir}: not writable ({exc})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield SiteLedger.load(state_dir)
