"""Picks the row kernels (Triton or chunked torch) for a device; config or an env var can force either."""

import functools
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "VBON_LOGPROB_BACKEND"

_configured = "auto"


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown log-prob backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Force the backend ('torch' or 'triton') for later calls; 'auto' hands the choice back to the env var.

    A value set here wins over `VBON_LOGPROB_BACKEND`, which in turn wins over the automatic choice.
    """
    global _configured
    _configured = _check(name, "set_backend")


def get_backend() -> str:
    """The requested backend name: set_backend's value, else the env var's, else 'auto'."""
    if _configured != "auto":
        return _configured
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@functools.cache
def _triton_rows() -> ModuleType | None:
    try:
        from vbon_ds.kernels import triton_rows
    except ImportError:
        return None
    return triton_rows


def backend_for(device: torch.device) -> ModuleType:
    """The module with `forward_rows` / `backward_rows` to run on `device`."""
    name = get_backend()
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_rows() is not None else "torch"
    if name == "torch":
        from vbon_ds.kernels import torch_rows

        return torch_rows
    # Checked before importing triton: an import without the variable would stick for the whole process.
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "log-prob backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    module = _triton_rows()
    if module is None:
        raise RuntimeError("log-prob backend 'triton' was forced but triton cannot be imported")
    return module
