"""`RewardScorer`: one float per (prompt, response) text pair, from a rule function or a reward model.

    scores = scorer.score(prompt_texts, response_texts, ended_with_eos=rollout.ended_with_eos)  # [B] fp32

The reward model sees prompt + response re-tokenized with its own tokenizer, so policy and reward model may
use different vocabularies. An answer that ended with EOS is scored with the reward tokenizer's EOS appended,
as reward models like the TL;DR ones were trained (text + EOS, score read at the EOS); a decoder classifier
is read at the last attended token, found from the attention mask and not from pad ids, so a pad token that
equals EOS (Pythia's tokenizers have no pad of their own) cannot hide that EOS.

Scoring with a model is a collective under ZeRO-3: call it on every rank; ranks with fewer pairs run padding
batches so the per-layer gathers stay matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vbon_ds.data.rewards import RewardFn
from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.engines.critic import token_scores


class LastTokenReward(torch.nn.Module):
    """A reward classifier read at each row's last attended token (rows right-padded): [B] scores.

    Hugging Face's decoder classifiers pool at the last token that is not `pad_token_id`; when pad == EOS
    that skips the EOS the model was trained to be read at. Here a decoder classifier (one with a `score`
    head) is read where the attention mask ends instead; other classifiers (encoders pool at their first
    token) run as they are.
    """

    def __init__(self, classifier: PreTrainedModel) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(getattr(self.classifier, "score", None), torch.nn.Module):
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        scores = token_scores(self.classifier, input_ids, attention_mask)
        last = attention_mask.sum(1).clamp(min=1) - 1
        return scores.gather(1, last[:, None])[:, 0]


def reward_inputs(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], ended_with_eos: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of `texts`, with the tokenizer's EOS appended to the texts of answers that
    ended with EOS; too long a text loses its start (the tokenizer's model_max_length)."""
    enc = tokenizer(list(texts), truncation=True)
    eos, limit = tokenizer.eos_token_id, tokenizer.model_max_length
    rows = []
    for ids, ended in zip(enc.input_ids, ended_with_eos, strict=True):
        if ended and eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos][-limit:]
        rows.append(ids)
    tokenizer.padding_side = "right"
    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    return batch.input_ids, batch.attention_mask


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
            ended = [False] * len(responses) if ended_with_eos is None else ended_with_eos.tolist()
            texts = [p + r for p, r in zip(prompts, responses, strict=True)]
            scores = self._model_scores(texts, [bool(e) for e in ended])
        if self.missing_eos_score is not None and ended_with_eos is not None:
            scores = scores.masked_fill(~ended_with_eos.cpu().bool(), self.missing_eos_score)
        return scores

    @torch.no_grad()
    def _model_scores(self, texts: list[str], ended: list[bool]) -> torch.Tensor:
        n_batches = distributed.all_reduce_max(-(-len(texts) // self.batch_size))
        scores = []
        for i in range(n_batches):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if texts[rows]:
                scores.append(self._forward(texts[rows], ended[rows]))
            else:  # this rank ran out of pairs: a dummy forward keeps the ZeRO-3 gathers in step
                self._forward([self.tokenizer.pad_token], [False])
        return torch.cat(scores) if scores else torch.zeros(0)

    def _forward(self, texts: list[str], ended: list[bool]) -> torch.Tensor:
        ids, mask = reward_inputs(self.tokenizer, texts, ended)
        dev = distributed.device()
        return self.model.ds(ids.to(dev), mask.to(dev)).float().cpu()
