"""`AdapterReference`: the reference policy as the LoRA actor with its adapters switched off.

With LoRA every base weight of the actor stays frozen, so switching the adapters off gives back the starting
model exactly: pi_ref without a second copy of the weights and without a second engine. It offers the
two calls the jobs make on a reference `PolicyEngine`, log-probs and generation, and the two properties
that say where its weights are (`weights_engine`, `adapters_on`: what the vLLM weight push reads). It
holds no state of its own, so there is nothing to checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vbon_ds.engines.policy import PolicyEngine
from vbon_ds.models.adapters import lora_layers


class AdapterReference:
    """The frozen reference view of a LoRA `actor` (same engine, adapters off for the call)."""

    def __init__(self, actor: PolicyEngine) -> None:
        self.actor = actor
        self._layers = list(lora_layers(actor.module).values())

    @property
    def weights_engine(self) -> PolicyEngine:
        """The engine that holds this policy's weights (`PolicyEngine.weights_engine`): the actor."""
        return self.actor

    @property
    def adapters_on(self) -> bool:
        """Whether the adapters are part of this policy (`PolicyEngine.adapters_on`): never."""
        return False

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        for layer in self._layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._layers:
                layer.enable_adapters(True)

    def response_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        """`PolicyEngine.response_logprobs` of the base model (adapters off)."""
        with self.adapters_off():
            return self.actor.response_logprobs(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`PolicyEngine.generate` from the base model (adapters off)."""
        with self.adapters_off():
            return self.actor.generate(*args, **kwargs)
