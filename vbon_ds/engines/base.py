"""`DeepSpeedModel`: one Hugging Face model inside one DeepSpeed engine, trainable or frozen.

The policy, critic and reward-model wrappers build on it; the trainer sees only `backward`, `step` and
`current_lr`, never the DeepSpeed engine itself (checkpoint.py and weights.py reach `.ds`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vbon_ds.errors import VbonError


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` computes them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def probe_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids 1..8 in one row and its attention mask: valid in every vocabulary and the same on every
    rank (a ZeRO-3 forward is a collective), for the engines' start-up checks."""
    ids = torch.arange(1, 9, device=device)[None]
    return ids, torch.ones_like(ids)


def require_repeatable(first: torch.Tensor, second: torch.Tensor, what: str) -> None:
    """Two training-mode forwards of one batch must agree: PPO's ratio and value clipping compare a
    training forward with an earlier one, so any randomness left in it (a dropout builders.switch_off_dropout
    did not find) biases them. The tolerance admits non-deterministic GPU reductions, not dropout."""
    if not torch.allclose(first.float(), second.float(), rtol=1e-3, atol=1e-3 * first.abs().max().item()):
        raise VbonError(
            f"{what}: two training-mode forwards of the same tokens differ (a dropout or other randomness "
            "that vbon could not switch off); set it to 0 in the model's config.json"
        )


def _own_parameter_memory(module: torch.nn.Module) -> None:
    """Copy CPU parameters into memory of their own. transformers leaves them in the memory-mapped checkpoint
    file, at offsets that are not 64-byte aligned, and CPU matmuls on them ran 2-6x slower (SmolLM2-135M:
    17 s vs 7 s to sample 32 x 24 tokens). ZeRO stages 1-3 copy parameters into their own buffers anyway."""
    for param in module.parameters():  # tied weights are one parameter: copied once, still tied
        if param.device.type == "cpu":
            param.data = param.data.clone()


def _alone_without_zero(ds_engine: Any) -> bool:
    """One data-parallel rank, ZeRO stage 0, fp32 (a plain torch optimizer, no fp16/bf16 wrapper)."""
    return (
        ds_engine.dp_world_size == 1
        and ds_engine.zero_optimization_stage() == 0
        and not ds_engine.fp16_enabled()
        and not ds_engine.bfloat16_enabled()
    )


class DeepSpeedModel:
    """A DeepSpeed engine (`ds`) around a Hugging Face model (`module`)."""

    def __init__(self, ds_engine: Any, hf_ds_config: Any, *, trainable: bool) -> None:
        self.ds = ds_engine
        self.module = ds_engine.module
        self.trainable = trainable
        if ds_engine.zero_optimization_stage() == 0:
            _own_parameter_memory(self.module)
        if trainable and _alone_without_zero(ds_engine):
            # DeepSpeed would still flatten every gradient into one buffer, all-reduce it over this one rank
            # and copy it back at each optimizer step: a copy of the whole model's gradients for nothing.
            ds_engine.enable_backward_allreduce = False
        # transformers reads ZeRO-3 settings through a weak reference to this object (generate, save paths):
        # keep it alive exactly as long as the engine.
        self._hf_ds_config = hf_ds_config
        self.weights_version = 0
        """Counts the changes of the weights (optimizer steps, loads): samplers holding a copy compare it."""

    @property
    def zero3(self) -> bool:
        """Parameters are partitioned across ranks (ZeRO stage 3)."""
        return bool(self.ds.zero_optimization_partition_weights())

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[None]:
        """The whole model on every rank, with ZeRO-3's per-module hooks off, for the duration (read-only).

        Without the hooks each rank runs forwards on its own: no collective per layer, and ranks may run
        different numbers of forwards (generation lengths differ). A no-op below ZeRO-3.
        """
        if not self.zero3:
            yield
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.ds):
            yield

    def _require_trainable(self, what: str) -> None:
        if not self.trainable:
            raise VbonError(f"{what}: this engine is frozen (inference only)")

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (DeepSpeed scales for gradient accumulation)."""
        self._require_trainable("backward")
        self.ds.backward(loss)

    def step(self) -> None:
        """Optimizer and LR step at a gradient-accumulation boundary (DeepSpeed counts micro-batches)."""
        self._require_trainable("step")
        self.ds.step()
        self.weights_version += 1

    def current_lr(self) -> float:
        self._require_trainable("current_lr")
        return float(self.ds.get_lr()[0])
