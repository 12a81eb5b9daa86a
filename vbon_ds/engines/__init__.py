"""Layer 4: everything DeepSpeed. Submodules import deepspeed lazily so the package imports without it.

distributed (process group, collectives) -> builders (engines from the config) -> policy / critic / reward
(what the trainer calls), checkpoint (save, resume, HF export) and weights (a checkpoint's weights into an
inference engine). ds_config fills the JSON templates;
lm_head holds the kernels' ZeRO-3 helpers for the fused log-prob path.
"""
