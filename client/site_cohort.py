"""The site's minimum cohort (policy `min-records`): with fewer privacy units in its data
than this, the site declines every run, naming the key.

Small cohorts make every release riskier, so many governance boards set a floor. The
count is the site's own: all its rows (before the run's train/validation split, whose
fraction the coordinator chooses and could move the count with), as units of the site's
own `privacy-unit` (rows, or distinct values of its own `user-column`). Whether the site
declines is then one fixed bit of its data, the same for every request: no choice of
task, labels, split or seed steps it (docs/privacy.md, "A minimum cohort").
"""

from __future__ import annotations

from fedlora.client.site_data import site_rows
from fedlora.client.site_policy import SitePolicy
from fedlora.config import Config


def cohort_units(rows: list[dict], policy: SitePolicy) -> int:
    """Privacy units in `rows` under the site's own policy: rows, or distinct non-empty users."""
    if policy.privacy_unit != "user":
        return len(rows)
    return len({str(row.get(policy.user_column)) for row in rows if str(row.get(policy.user_column) or "").strip()})


def below_min_records(config: Config, node_config: dict, policy: SitePolicy) -> bool:
    """Whether the site's data holds fewer units than its `min-records` (read only when one is set)."""
    if policy.min_records <= 0:
        return False
    rows, _, _ = site_rows(config, node_config)
    return cohort_units(rows, policy) < policy.min_records
