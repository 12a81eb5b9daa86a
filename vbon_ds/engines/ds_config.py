"""DeepSpeed JSON configs: locate a template in ds_configs/ and fill its "auto" values from the experiment.

Pure dict work (no deepspeed import), in the spirit of Hugging Face's HfTrainerDeepSpeedConfig: the JSON
keeps the engine knobs, the experiment config owns batch sizes, learning rate and precision.

The ZeRO stage also depends on the world: in a world of one, partitioning saves no memory and costs hooks
on every module, reduce-scatters and a global `F.linear` replacement (ZeRO-3), so a one-process run uses
stage 0 unless the JSON offloads to CPU (offload is then the point) or deepspeed.force_stage is set.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any

from vbon_ds.batching import BatchSizes
from vbon_ds.config import ConfigError, ExperimentConfig


def ds_config_dir() -> Path:
    """Where the named templates live. The repository's top-level ds_configs/ is their one source: an
    installed package carries it as `vbon_ds/ds_configs` (setup.py maps it there), and a source checkout or
    an editable install, which has no such folder inside the package, reads the top-level one itself."""
    packaged = importlib.resources.files("vbon_ds") / "ds_configs"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "ds_configs"


log = logging.getLogger(__name__)

CPU_REDUCE_BUCKET = 50_000_000
"""Gradient elements per reduce on CPU (200 MB in fp32): gloo pays a fixed cost per call, and the GPU
default hidden^2 (330k for SmolLM2-135M) meant about 240 reduce-scatters per micro-batch."""


def load_ds_template(name_or_path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON by name in ds_configs/ (zero2, zero3, zero3_offload) or by file path."""
    path = Path(name_or_path)
    templates = ds_config_dir()
    if not path.is_file():
        path = templates / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in templates.glob("*.json")))
        raise ConfigError(
            f"deepspeed.config: {name_or_path!r} is neither a file nor a known config ({known})"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None


def _fill(node: dict[str, Any], key: str, value: Any) -> None:
    """Replace node[key] when it is "auto"; leave explicit values from the JSON alone."""
    if node.get(key) == "auto":
        node[key] = value


def precision(cfg: ExperimentConfig, on_gpu: bool, bf16_supported: bool) -> str:
    """The dtype engines run in: config's model.dtype, or bfloat16 on a capable GPU, else float32."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if on_gpu and bf16_supported else "float32"


def fill_ds_config(
    template: dict[str, Any],
    cfg: ExperimentConfig,
    sizes: BatchSizes,
    *,
    on_gpu: bool,
    bf16_supported: bool = False,
    lr: float | None = None,
    hidden_size: int | None = None,
    trainable: bool = True,
) -> dict[str, Any]:
    """A complete DeepSpeed config for one engine: every "auto" resolved, nothing else changed.

    `trainable=False` gives the inference-only variant for the frozen reference and reward models
    (no optimizer, and parameter offload to CPU when deepspeed.reference_offload is set). With
    `sizes.world_size == 1` the ZeRO section becomes {"stage": 0} unless something is offloaded or
    deepspeed.force_stage is set.
    """
    ds = copy.deepcopy(template)
    _fill(ds, "train_micro_batch_size_per_gpu", sizes.micro_batch_per_rank)
    _fill(ds, "gradient_accumulation_steps", sizes.gradient_accumulation_steps)
    _fill(
        ds,
        "train_batch_size",
        sizes.micro_batch_per_rank * sizes.gradient_accumulation_steps * sizes.world_size,
    )
    _fill(ds, "gradient_clipping", cfg.train.max_grad_norm)

    dtype = precision(cfg, on_gpu, bf16_supported)
    for section, wanted in (("bf16", "bfloat16"), ("fp16", "float16")):
        if section in ds:
            _fill(ds[section], "enabled", dtype == wanted)

    zero = ds.get("zero_optimization", {})
    if not on_gpu:
        _fill(zero, "reduce_bucket_size", max(CPU_REDUCE_BUCKET, (hidden_size or 0) ** 2))
    if hidden_size is not None:
        _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    else:
        for key, default in (
            ("reduce_bucket_size", int(5e8)),
            ("stage3_prefetch_bucket_size", int(5e7)),
            ("stage3_param_persistence_threshold", int(1e5)),
        ):
            _fill(zero, key, default)

    if trainable:
        params = ds.get("optimizer", {}).get("params", {})
        _fill(params, "lr", cfg.train.lr if lr is None else lr)
        _fill(params, "betas", list(cfg.train.adam_betas))
        _fill(params, "weight_decay", cfg.train.weight_decay)
        # DeepSpeed's own Adams are JIT-compiled (about a minute on a fresh node): torch's AdamW is as good on
        # CPU at our sizes, and for LoRA's few weights on a GPU too.
        _fill(params, "torch_adam", not on_gpu or cfg.model.lora_rank > 0)
    else:
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        zero.pop("offload_optimizer", None)
        if cfg.deepspeed.reference_offload and zero.get("stage") == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    stage = zero.get("stage", 0)
    if stage and sizes.world_size == 1 and not cfg.deepspeed.force_stage and not _offloads(zero):
        _say_once(f"world of one: ZeRO stage {stage} -> 0 (nothing to partition)")
        ds["zero_optimization"] = {"stage": 0}

    unresolved = _find_auto(ds)
    if unresolved:
        raise ConfigError(
            f"deepspeed.config: no value to fill for {', '.join(unresolved)} (set it in the JSON)"
        )
    return ds


def _offloads(zero: dict[str, Any]) -> bool:
    """Parameters or optimizer states live on CPU or NVMe: ZeRO's memory saving is wanted even alone."""
    return any(
        zero.get(key, {}).get("device", "none") != "none" for key in ("offload_param", "offload_optimizer")
    )


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)  # once per process, not once per engine


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
