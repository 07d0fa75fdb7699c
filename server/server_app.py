"""The ServerApp. Under `flwr run .` its settings are the run config (fedlora's
dotted keys); `fedlora simulate` builds one bound to an already-resolved Config.
The round loop (torch, PEFT) is imported when a run starts: this module is also
imported by every site's ClientApp process, through the Flower App's components."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import Config, from_flat
from fedlora.flower_env import quiet_flower_notices

if TYPE_CHECKING:
    from fedlora.server.run_directory import RunDirectory


def make_server_app(config: Config, on_done: Callable[[RunDirectory, list[dict[str, Any]]], None] | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedlora.server.federation import run_federation

        run_dir, rows = run_federation(grid, config)
        if on_done is not None:
            on_done(run_dir, rows)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedlora.server.federation import run_federation

    quiet_flower_notices()  # `fedlora run` streams this process's output: Flower's DEBUG lines stay out

    config = from_flat(dict(context.run_config), where="run config")
    run_federation(grid, config)
