"""The Flower App's components (pyproject.toml `[tool.flwr.app.components]`).

One app bundle serves both engines: a deployed site's node config names its own
`data-path`, and a virtual node of `flwr run .`'s simulation has a `partition-id`,
for which the simulation's data source is composed in here (the client floor does not
import the simulation floor).

`server_app` is built on first access (PEP 562): a site's ClientApp process imports
this module for every message, and the coordinator's round loop (torch, PEFT) is
seconds of imports it does not need.
"""

from typing import Any

from fedlora.simulations.virtual_sites import simulated_site_app

client_app = simulated_site_app()


def __getattr__(name: str) -> Any:
    if name == "server_app":
        from fedlora.server.server_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
