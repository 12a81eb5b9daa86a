"""Shared pytest setup: keep tests on CPU, deterministic and single-threaded enough for 2 cores."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
