"""fedlora: what coordinator and sites share (config schema, base model + LoRA, adapter records, text data) and the CLI."""
