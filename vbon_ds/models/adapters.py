"""Which weights train: all of them, the top K transformer layers, or LoRA adapters (layer 3, no DeepSpeed).

    apply_trainable_subset(model, cfg.model, seed)   # in place, right after loading a trainable model
    merge_lora(model, state_dict)                    # LoRA folded into the base weights (HF export)

`model.trainable_layers = K` freezes the input embeddings and every transformer block but the top K; the
final norm and whatever sits outside the trunk (an untied lm head, a critic's score head) still train. This
is what the vBoN authors' trlx setup did for Pythia-2.8B (`num_layers_unfrozen`). Frozen bottom layers also
need no activations for backward. A head tied to the input embeddings is the embedding matrix: frozen.

`model.lora_rank = r` adds LoRA adapters (peft) to the actor and freezes every base weight, so the actor
with its adapters switched off is exactly the starting model: the reference, without a second copy of the
weights (engines/lora.py). With both set, adapters go into the top K layers only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from vbon_ds.config import ModelConfig
from vbon_ds.errors import VbonError

ADAPTER = "default"  # peft's adapter name; one adapter per model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF causal LM or classifier (GPT-NeoX and LLaMA `layers`, GPT-2 `h`)."""
    trunk = getattr(model, "base_model", model)
    lists = [m for m in trunk.children() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise VbonError(
            f"model.trainable_layers: cannot find the transformer blocks of {type(model).__name__} "
            "(expected one list of layers in its base model)"
        )
    return lists[0]


def _final_norm(model: nn.Module) -> nn.Module:
    trunk = getattr(model, "base_model", model)
    for name in ("final_layer_norm", "ln_f", "norm"):
        if isinstance(getattr(trunk, name, None), nn.Module):
            return getattr(trunk, name)
    raise VbonError(f"model.trainable_layers: cannot find the final norm of {type(model).__name__}")


def freeze_bottom_layers(model: nn.Module, k: int) -> None:
    """Freeze the trunk (embeddings, blocks) except its top `k` blocks and final norm; heads keep training."""
    blocks = decoder_blocks(model)
    if not 1 <= k <= len(blocks):
        raise VbonError(f"model.trainable_layers: {k} is out of range (the model has {len(blocks)} layers)")
    getattr(model, "base_model", model).requires_grad_(False)
    for block in blocks[len(blocks) - k :]:
        block.requires_grad_(True)
    _final_norm(model).requires_grad_(True)


def add_lora(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """LoRA adapters of rank cfg.lora_rank in place (top cfg.trainable_layers layers when set); only the
    adapters train. `seed` makes the adapters' initialisation identical on every rank."""
    from peft import LoraConfig, inject_adapter_in_model

    n_layers = len(decoder_blocks(model))
    k = cfg.trainable_layers
    if k > n_layers:
        raise VbonError(f"model.trainable_layers: {k} is out of range (the model has {n_layers} layers)")
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,  # dropout is off everywhere: PPO compares log-probs of the same tokens
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores [in, out]
        target_modules=list(cfg.lora_target_modules) or None,
        layers_to_transform=list(range(n_layers - k, n_layers)) if k else None,
    )
    if lora.target_modules is None:  # peft's default for the architecture (query_key_value for GPT-NeoX)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if model_type not in defaults:
            raise VbonError(
                f"model.lora_target_modules: peft has no default for {model_type!r}; name the modules"
            )
        lora.target_modules = defaults[model_type]
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(lora, model, adapter_name=ADAPTER)
        except ValueError as err:  # e.g. target modules that match nothing
            raise VbonError(f"model.lora_target_modules: {str(err).splitlines()[0]}") from None
    for module in lora_layers(model).values():
        module.enable_adapters(True)  # also makes the adapter weights (and only them) trainable


def apply_trainable_subset(model: nn.Module, cfg: ModelConfig, seed: int, *, lora: bool) -> None:
    """The trainable-weight choice of `cfg` for one model: LoRA (when `lora` and cfg.lora_rank), else the
    top cfg.trainable_layers layers, else everything (no-op)."""
    if lora and cfg.lora_rank:
        add_lora(model, cfg, seed)
    elif cfg.trainable_layers:
        freeze_bottom_layers(model, cfg.trainable_layers)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules peft wrapped with adapters, by name (empty without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, adapters_on: bool = True
) -> dict[str, torch.Tensor]:
    """`state_dict` of `model` (or of some of its blocks) with each LoRA layer in it folded into its base
    weight (W + scale * B @ A; W alone with `adapters_on` False: the reference) and the adapter keys gone:
    the keys and shapes of the plain model. Unchanged without LoRA."""
    merged = dict(state_dict)
    for name, module in lora_layers(model).items():
        if f"{name}.lora_A.{ADAPTER}.weight" not in merged:  # a block of the model without this layer
            continue
        lora_a, lora_b = (
            merged.pop(f"{name}.lora_A.{ADAPTER}.weight"),
            merged.pop(f"{name}.lora_B.{ADAPTER}.weight"),
        )
        prefix = f"{name}.base_layer."
        for key in [k for k in merged if k.startswith(prefix)]:
            merged[f"{name}.{key[len(prefix) :]}"] = merged.pop(key)
        if not adapters_on:
            continue
        delta = (lora_b.float() @ lora_a.float()) * module.scaling[ADAPTER]
        if module.fan_in_fan_out:  # GPT-2's Conv1D stores weights as [in, out]
            delta = delta.T
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
