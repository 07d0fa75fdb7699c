"""The site's budget guard: train only if the epsilon after this round stays within
the site's own limit. Pure arithmetic over the ledger; the client acts on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accounting import History
from privacy.site_ledger import SiteLedger


@dataclass
class BudgetDecision:
    allowed: bool
    epsilon_spent: float  # before this round, over every run in the ledger
    epsilon_after: float  # if this round's planned steps were taken
    limit: float


def check_budget(ledger: SiteLedger, planned: History, delta: float, accountant: str, limit: float) -> BudgetDecision:
    """Would `planned` mechanisms keep the site's cumulative epsilon <= `limit`?"""
    spent = ledger.epsilon(delta, accountant)
    after = ledger.epsilon(delta, accountant, extra=planned)
    return BudgetDecision(allowed=math.isinf(limit) or after <= limit, epsilon_spent=spent, epsilon_after=after, limit=limit)
