"""Layer 4: everything DeepSpeed. Submodules import deepspeed lazily so the package imports without it."""
