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

The entries form a hash chain with a head signed by the site's node key where the
client floor lends it (privacy/trail_chain.py): each entry's `seq` and `prev` bind it to
the one written before it, whatever run or list it joined. A ledger written before the
chain existed (format 1) keeps its entries as a legacy prefix, which the first chained
entry's `prev` hashes. A broken chain is refused for every write and by the budget
guard (`require_intact_trail`), with the entry that broke it named.
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
from fedlora.privacy.trail_chain import (TrailCheck, TrailSigner, check_heads, digest, fingerprint, key_blob, make_heads,
                                         prefix_hash, trail_signer)

if TYPE_CHECKING:  # the accountant (Opacus, torch) loads when an epsilon is asked for, not to read a ledger
    from fedlora.privacy.accounting import History

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = ".privacy-ledger.lock"
FORMAT = 2  # 2: entries chained (seq, prev) under a head


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
    seq: int | None = None  # the entry's place in the site's hash chain (None: written before it)
    prev: str | None = None  # the hash of the entry before it (privacy/trail_chain.py)

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
    seq: int | None = None  # as in Mechanism
    prev: str | None = None


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


Entry = Mechanism | Declined
LISTS = ("mechanisms", "declined")


def _chained_record(run: RunLedger, list_name: str, entry: Entry) -> dict:
    """What an entry's hash covers: the entry and where it stands (its run, that run's
    accountant and delta, its list), so that moving it elsewhere changes it too."""
    return {"run": run.run, "accountant": run.accountant, "delta": run.delta, "list": list_name, "entry": asdict(entry)}


def _describe(run: RunLedger, list_name: str, entry: Entry) -> str:
    what = entry.kind if isinstance(entry, Mechanism) else f"declined {entry.message}"
    return f"run {run.run}, round {entry.round}, {what}"


@dataclass
class SiteLedger:
    path: Path
    runs: list[RunLedger] = field(default_factory=list)
    max_epsilon: float = math.inf  # the limit in force at the last write
    heads: dict = field(default_factory=dict)  # "head" and "signed_head" (privacy/trail_chain.py)
    signer: TrailSigner | None = None  # else the key the client floor lent for this state dir, if any
    intact: bool = field(default=False, repr=False)  # the chain was verified and only appended to since

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
            heads = {k: raw[k] for k in ("head", "signed_head") if raw.get(k) is not None}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh: an unreadable ledger would silently reset the budget.
            raise LedgerError(f"privacy ledger {path}: unreadable ({exc}); fix or restore it before training") from None
        return cls(path, runs, math.inf if limit is None else float(limit), heads)

    def save(self) -> None:
        """Atomic replace: write a temporary file, fsync it, rename it over the ledger."""
        limit = None if math.isinf(self.max_epsilon) else self.max_epsilon
        chained = self._chained()
        last = digest(_chained_record(*chained[-1])) if chained else prefix_hash([])
        signer = self.signer or trail_signer(self.path.parent)
        self.heads = make_heads(LEDGER_FILE, len(chained), last, self.heads.get("signed_head"), signer, utc_now(),
                                max_epsilon=limit)
        data = {"format": FORMAT, "max_epsilon": limit, "runs": [asdict(r) for r in self.runs], **self.heads}
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
        self.require_intact_trail()  # appending to a broken chain would re-sign over the break
        located = self._located()
        chained = self._chained(located)
        entry.seq = chained[-1][2].seq + 1 if chained else 0
        entry.prev = digest(_chained_record(*chained[-1])) if chained else prefix_hash(
            [_chained_record(*x) for x in located if x[2].seq is None])
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

    def _located(self) -> list[tuple[RunLedger, str, Entry]]:
        return [(r, name, e) for r in self.runs for name in LISTS for e in getattr(r, name)]

    def _chained(self, located: list[tuple[RunLedger, str, Entry]] | None = None) -> list[tuple[RunLedger, str, Entry]]:
        """The chained entries in chain order (the ledger keeps them per run and list)."""
        return sorted((x for x in (located or self._located()) if x[2].seq is not None), key=lambda x: x[2].seq)

    def check_trail(self) -> TrailCheck:
        """The chain and its heads, checked: the first entry that breaks them is named."""
        located = self._located()
        legacy = [x for x in located if x[2].seq is None]
        chained = [x for x in located if x[2].seq is not None]
        by_seq = {x[2].seq: x for x in chained if isinstance(x[2].seq, int)}

        def name(k: int) -> str:
            return f"entry {k} ({_describe(*by_seq[k])})" if k in by_seq else f"entry {k}"

        def broken(problem: str) -> TrailCheck:
            return TrailCheck(self.path, len(chained), len(legacy), 0, None, f"{self.path}: {problem}")

        if len(by_seq) != len(chained):
            return broken("entries share a number or are not numbered in whole numbers")
        # Each list in the order written: the legacy entries first, then rising numbers.
        for run in self.runs:
            for list_name in LISTS:
                before = None
                for entry in getattr(run, list_name):
                    if entry.seq is None and before is not None:
                        return broken(f"an entry without a chain link ({_describe(run, list_name, entry)}) follows {name(before)}")
                    if entry.seq is not None:
                        if before is not None and entry.seq < before:
                            return broken(f"{name(entry.seq)} is out of order: it is listed after {name(before)}")
                        before = entry.seq
        # Runs in the order they began: those with legacy entries, then the others by their first entry.
        firsts = [min(e.seq for n in LISTS for e in getattr(r, n)) for r in self.runs
                  if r.mechanisms or r.declined if all(e.seq is not None for n in LISTS for e in getattr(r, n))]
        for earlier, later in zip(firsts, firsts[1:]):
            if later < earlier:
                return broken(f"the run of {name(later)} is out of order: it is listed after the run of {name(earlier)}")
        hashes, expected = [], prefix_hash([_chained_record(*x) for x in legacy])
        for k in range(len(chained)):
            if k not in by_seq:
                after = min((s for s in by_seq if s > k), default=None)
                return broken(f"{name(k)} is missing (deleted)" + (f": {name(after)} comes next" if after is not None else ""))
            if by_seq[k][2].prev != expected:
                return broken(f"{name(k - 1)} was changed: {name(k)} holds another hash for it" if k else
                              f"the {len(legacy)} entries written before the chain began were changed: "
                              f"{name(0)} holds another hash for them")
            expected = digest(_chained_record(*by_seq[k]))
            hashes.append(expected)
        limit = None if math.isinf(self.max_epsilon) else self.max_epsilon
        return check_heads(self.path, self.heads, hashes, len(legacy), name, {"max_epsilon": limit})

    def require_intact_trail(self) -> None:
        """Raise LedgerError, naming the entry, unless the chain holds and, where the site's
        own key is at hand (a pinned signer), its signed head is by that key: anyone can
        rewrite the entries and sign a fresh head with a key of their own (checked once per
        load: this object only appends to it afterwards)."""
        if self.intact:
            return
        check = self.check_trail()
        if check.problem is not None:
            raise LedgerError(f"privacy ledger {check.problem}; the site uses no ledger whose chain is broken "
                              "(restore it from a backup)")
        signer = self.signer or trail_signer(self.path.parent)
        own = signer.public_line() if signer is not None and signer.pinned else None
        if own is not None and check.signer is not None and key_blob(check.signer) != key_blob(own):
            raise LedgerError(f"privacy ledger {self.path}: its signed head is by key {fingerprint(check.signer)}, not this "
                              f"site's node key {fingerprint(own)}; the site uses no ledger another key signed "
                              "(restore it from a backup)")
        self.intact = True

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
def open_ledger(state_dir: str | Path, signer: TrailSigner | None = None) -> Iterator[SiteLedger]:
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
        ledger = SiteLedger.load(state_dir)
        ledger.signer = signer
        yield ledger
