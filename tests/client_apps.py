"""ClientApps for simulation tests: the real client's handlers, with `train` replaced
by a test's own (which usually calls the real one and then misbehaves)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp


def client_app_with_train(train: Callable[[Message, Context], Message]) -> ClientApp:
    app = ClientApp()
    app.train()(train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from client.client_app import evaluate as real_evaluate

        return real_evaluate(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from client.client_app import query as real_query

        return real_query(msg, context)

    return app
