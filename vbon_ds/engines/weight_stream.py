"""A policy engine's weights as its Hugging Face checkpoint names them, one block at a time (for vLLM).

    for name, tensor in checkpoint_weights(actor, changed_only=True):
        ...  # e.g. vLLM's load_weights, which takes checkpoint names and fuses q/k/v itself

Blocks: every numbered module (a transformer layer, "model.layers.3") is one block, every other parameter
(embeddings, final norm, lm head) one of its own. Under ZeRO-3 a block's parameters are gathered on every
rank (a collective: call on all ranks) while its tensors are copied out, then released: never a full extra
copy of the model beside the consumer's own. A whole block always goes together, so a consumer that fuses
a block's matrices (q, k, v) never sees half of one.

LoRA layers give their merged weight W + scale * B @ A (`models/adapters.merge_lora`), or W alone for the
reference view with the adapters off. `changed_only` skips the blocks without a trainable parameter (frozen
bottom layers with `model.trainable_layers`; with LoRA, the blocks without adapters).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from vbon_ds.engines.lora import AdapterReference
from vbon_ds.engines.policy import PolicyEngine
from vbon_ds.models.adapters import lora_layers, merge_lora

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _blocks(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Parameters grouped by block, in the model's order."""
    blocks: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        match = _BLOCK.match(name)
        blocks.setdefault(match.group(1) if match else name, []).append((name, param))
    return blocks


def checkpoint_weights(
    source: PolicyEngine | AdapterReference, *, changed_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight of `source`, block by block (see the module docstring)."""
    import deepspeed

    engine = source.weights_engine
    model = engine.module
    has_lora = bool(lora_layers(model))
    for params in _blocks(model).values():
        if changed_only and not any(p.requires_grad for _, p in params):
            continue
        gather = (
            deepspeed.zero.GatheredParameters([p for _, p in params])
            if engine.zero3
            else contextlib.nullcontext()
        )
        with gather, torch.no_grad():
            state = {name: param.detach().clone() for name, param in params}
        if has_lora:
            state = merge_lora(model, state, adapters_on=source.adapters_on)
        yield from state.items()
