"""Layer 4: everything about DeepSpeed engines. Submodules import deepspeed inside the functions that use
it, so importing the package, or most of it, does not load DeepSpeed; `checkpoint.py` is the exception (it
imports the DeepSpeed classes its weights-only loader allows at the top), and so loads it for the modules
that import it (tests/test_docs.py keeps this list true).

distributed (process group, collectives) -> builders (engines from the config) -> policy / critic / reward
(what the trainer calls), checkpoint (save, resume, HF export) and weights (a checkpoint's weights into an
inference engine). ds_config fills the JSON templates; build builds the engines a job asks for;
run_settings records what a checkpoint's weights depend on; memory_plan is `vbon plan`'s arithmetic;
lm_head holds the kernels' ZeRO-3 helpers for the fused log-prob path; base wraps one model in one engine;
lora is the reference as the LoRA actor with its adapters off.
"""
