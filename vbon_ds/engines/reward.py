"""`RewardScorer`: one float per (prompt, response) text pair, from a rule function or a reward model.

    scores = scorer.score(prompt_texts, response_texts, ended_with_eos=rollout.ended_with_eos)  # [B] fp32

The reward model sees prompt + response re-tokenized with its own tokenizer, so policy and reward model may
use different vocabularies. Scoring with a model is a collective under ZeRO-3: call it on every rank; ranks
with fewer pairs run padding batches so the per-layer gathers stay matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.rewards import RewardFn


class RewardScorer:
    """Exactly one of `function` or (`model`, `tokenizer`) is set."""

    def __init__(
        self,
        *,
        function: RewardFn | None = None,
        model: DeepSpeedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        missing_eos_score: float | None = None,
    ) -> None:
        if (function is None) == (model is None or tokenizer is None):
            raise ValueError("give either a reward function or a reward model with its tokenizer")
        self.function = function
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.missing_eos_score = missing_eos_score

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        ended_with_eos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B] float32 rewards; responses that did not end with EOS get `missing_eos_score` when it is set."""
        if self.function is not None:
            scores = torch.tensor(self.function(list(prompts), list(responses)), dtype=torch.float32)
        else:
            scores = self._model_scores([p + r for p, r in zip(prompts, responses, strict=True)])
        if self.missing_eos_score is not None and ended_with_eos is not None:
            scores = scores.masked_fill(~ended_with_eos.cpu().bool(), self.missing_eos_score)
        return scores

    @torch.no_grad()
    def _model_scores(self, texts: list[str]) -> torch.Tensor:
        n_batches = distributed.all_reduce_max(-(-len(texts) // self.batch_size))
        scores = []
        for i in range(n_batches):
            batch = texts[i * self.batch_size : (i + 1) * self.batch_size]
            if batch:
                scores.append(self._forward(batch))
            else:  # this rank ran out of pairs: a dummy forward keeps the ZeRO-3 gathers in step
                self._forward([self.tokenizer.pad_token])
        return torch.cat(scores) if scores else torch.zeros(0)

    def _forward(self, texts: list[str]) -> torch.Tensor:
        # Right padding: positions need no correction, and the classifier pools at the last non-pad token.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        dev = distributed.device()
        logits = self.model.ds(
            input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev)
        ).logits
        return logits[:, 0].float().cpu()
