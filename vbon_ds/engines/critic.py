"""`CriticEngine`: the PPO value model - a decoder sequence classifier read at every response position.

values = critic.values(rollout.sequences, rollout.attention_mask, rollout.prompt_length)  # [B, R]
critic.backward(value_loss); critic.step()
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel, position_ids, probe_batch, require_repeatable
from vbon_ds.errors import VbonError


class TokenValueModel(torch.nn.Module):
    """A decoder classifier's trunk and 1-output `score` head applied at every position (not pooled)."""

    def __init__(self, classifier: PreTrainedModel) -> None:
        super().__init__()
        if not isinstance(getattr(classifier, "score", None), torch.nn.Module):
            raise VbonError(
                f"critic: {type(classifier).__name__} has no per-token `score` head (only decoder "
                "classifiers have one); set model.critic_init=actor"
            )
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.classifier, input_ids, attention_mask)


def token_scores(
    classifier: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, T] a decoder classifier's 1-output `score` head at every position (no KV cache is built)."""
    hidden = classifier.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return classifier.score(hidden)[..., 0]


class CriticEngine(DeepSpeedModel):
    """A trainable `TokenValueModel` engine."""

    def __init__(self, ds_engine: object, hf_ds_config: object, *, trainable: bool) -> None:
        super().__init__(ds_engine, hf_ds_config, trainable=trainable)
        if trainable:  # value clipping compares a training forward with the rollout's values
            ids, mask = probe_batch(distributed.device())
            with torch.no_grad():
                first, second = [self.ds(ids, mask) for _ in range(2)]
            require_repeatable(first, second, "critic")

    def values(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
    ) -> torch.Tensor:
        """[B, R] float32 value of the state before each response token (0 where the response mask is 0)."""
        scores = self.ds(sequences, attention_mask).float()
        # Like the log-probs: the state before response token t is position P - 1 + t.
        return scores[:, prompt_length - 1 : -1] * attention_mask[:, prompt_length:]
