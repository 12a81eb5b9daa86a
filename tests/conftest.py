"""Shared pytest setup: CPU-friendly defaults, and the Triton interpreter where there is no GPU."""

import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Must be set before triton is first imported: then the Triton kernel tests run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
