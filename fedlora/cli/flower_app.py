"""The Flower App's components (pyproject.toml `[tool.flwr.app.components]`).

One app bundle serves both engines: a deployed site's node config names its own
`data-path`, and a virtual node of `flwr run .`'s simulation has a `partition-id`,
for which the simulation's data source is composed in here (the client floor does not
import the simulation floor). A site's ClientApp process imports this module for every
message: neither component loads torch before a run or a training step needs it.
"""

from fedlora.server.server_app import app as server_app
from fedlora.simulations.virtual_sites import simulated_site_app

client_app = simulated_site_app()

__all__ = ["client_app", "server_app"]
