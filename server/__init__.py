"""The coordinator: ServerApp, round loop, run directory, checkpoints."""
