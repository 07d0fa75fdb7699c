"""The client agent: ClientApp, local data, local training, the base-model cache."""
