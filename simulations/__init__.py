"""The single-machine runner, data partitioners and the built-in default dataset."""
