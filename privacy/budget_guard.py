"""The site's budget guard: train only if the epsilon after this round stays within
the site's own limit, on a ledger whose hash chain holds (privacy/trail_chain.py: an
edited, deleted or reordered entry could hide spent budget). Arithmetic over the ledger;
the client acts on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.privacy.site_ledger import SiteLedger

if TYPE_CHECKING:
    from fedlora.privacy.accounting import History


@dataclass
class BudgetDecision:
    allowed: bool
    epsilon_after: float  # if this round's planned steps were taken, over every run in the ledger
    limit: float
    epsilon_spent: float | None = None  # before this round; computed only for a refusal


def check_budget(ledger: SiteLedger, planned: History, delta: float, accountant: str, limit: float) -> BudgetDecision:
    """Would `planned` mechanisms keep the site's cumulative epsilon <= `limit`? Raises
    LedgerError (one line naming the file and the entry) if the ledger's chain is broken."""
    ledger.require_intact_trail()
    after = ledger.epsilon(delta, accountant, extra=planned)
    if math.isinf(limit) or after <= limit:
        return BudgetDecision(True, after, limit)
    return BudgetDecision(False, after, limit, epsilon_spent=ledger.epsilon(delta, accountant))
