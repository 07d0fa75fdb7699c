"""Code the test modules share, one module per concept: a site's data file
(`site_data`), one message through a site's real ClientApp (`site_messages`), one
ClientApp `train` call, also as a fresh process (`site_process`), deployed-style sites
and secure rounds in process (`in_process`), test ClientApps run against the real
coordinator (`client_apps`), a real deployment on 127.0.0.1 and the process helpers
that drive it (`deployment`), a run directory as the coordinator writes it
(`run_dirs`), a filled site ledger (`ledgers`) and a tiny causal LM's config and rows
(`causal_lm`). Test modules import from here and never from one another
(tests/test_layering.py); fixtures defined here are imported by name where they are
used."""

import pkgutil

import pytest

# Failing asserts in these helpers explain themselves as they did in the test modules.
pytest.register_assert_rewrite(*(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)))
