"""Which engine samples (transformers `generate` or vLLM) and in what precision its logits are computed.

Both engines draw from softmax(logits / T) of the same weights; what can differ is the precision of the
logits, so that (not the engine's name) is what the reference cache's fingerprint records.
"""

from __future__ import annotations

import importlib.util

import torch

from vbon_ds.config import ExperimentConfig, GenerationConfig

VLLM_INSTALL = "pip install -e '.[vllm]' (on a CPU machine: launch/setup_env.sh vllm)"
"""How to get vLLM, named by every error about it."""


def vllm_installed() -> bool:
    """Whether the `vllm` package is importable here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def resolved_engine(gen: GenerationConfig) -> str:
    """`generation.engine` with auto resolved: vllm on a GPU where it is installed, else hf. On CPU vLLM pays
    off only for long generation jobs (its engine starts in 5-20 s), so auto stays with hf there."""
    if gen.engine != "auto":
        return gen.engine
    return "vllm" if torch.cuda.is_available() and vllm_installed() else "hf"


def model_precision(dtype: str) -> str:
    """`model.dtype` resolved: auto is bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def sampling_precision(cfg: ExperimentConfig) -> str:
    """The dtype the sampler computes the policy's logits in."""
    gen = cfg.generation
    if resolved_engine(gen) == "vllm" and gen.vllm_dtype != "auto":
        return gen.vllm_dtype
    return model_precision(cfg.model.dtype)
