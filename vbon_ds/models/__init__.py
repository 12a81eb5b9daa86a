"""Layer 3, models: loading by hub id or path, LoRA / top-K adapters, content digests, tiny random
models for tests and the demo."""
