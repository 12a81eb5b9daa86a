"""Sampling answers for a list of prompts and scoring them: shared by refcache, train and evaluate.

Under ZeRO-3 `generate` and model scoring are collectives, so every rank must make the same number of
calls: callers hand each rank the same number of prompts (`shard_evenly` pads with repeats).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from vbon_ds.config import GenerationConfig
from vbon_ds.data.tldr import fit_prompts
from vbon_ds.engines import distributed
from vbon_ds.engines.lora import AdapterReference
from vbon_ds.engines.policy import PolicyEngine, Rollout
from vbon_ds.engines.reward import RewardScorer
from vbon_ds.engines.vllm_sampler import VllmSampler


def shard_evenly(items: Sequence[int], rank: int, world: int) -> tuple[list[int], int]:
    """This rank's slice of `items` (round robin) padded with repeats to the same length on every rank.

    Returns (slice, number of real items in it): the padded tail is work done only to keep collectives
    matched, and its results are dropped.
    """
    mine = list(items[rank::world])
    per_rank = -(-len(items) // world)
    real = len(mine)
    if not mine:
        mine = [items[0]] if items else []
    while len(mine) < per_rank:
        mine.append(mine[len(mine) % real if real else 0])
    return mine, real


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of the prompts fitted to `max_tokens` (`tldr.fit_prompts`: a TL;DR post loses
    its end); any other long prompt loses its start, never the end next to the answer. Every path that turns
    prompts into ids (rollouts, the cache, offline rows, evaluation) comes here."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    fitted = fit_prompts(texts, tokenizer, max_tokens)
    enc = tokenizer(fitted, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    dev = distributed.device()
    return enc.input_ids.to(dev), enc.attention_mask.to(dev)


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout from several generate calls: prompts left-padded, answers right-padded to common widths."""
    if len(parts) == 1:
        return parts[0]
    prompt_len = max(p.prompt_length for p in parts)
    response_len = max(p.responses.shape[1] for p in parts)
    fields: dict[str, list[torch.Tensor]] = {
        "seq": [],
        "mask": [],
        "resp_mask": [],
        "logp": [],
        "entropy": [],
    }
    for part in parts:
        left = prompt_len - part.prompt_length
        right = response_len - part.responses.shape[1]
        prompt_ids = torch.nn.functional.pad(part.sequences[:, : part.prompt_length], (left, 0), value=pad_id)
        responses = torch.nn.functional.pad(part.responses, (0, right), value=pad_id)
        prompt_mask = torch.nn.functional.pad(
            part.attention_mask[:, : part.prompt_length], (left, 0), value=0
        )
        response_mask = torch.nn.functional.pad(part.response_mask, (0, right), value=0)
        if part.sampled_logprobs is not None:
            fields["logp"].append(torch.nn.functional.pad(part.sampled_logprobs, (0, right)))
        if part.sampled_entropy is not None:  # a vLLM sampler records no entropy
            fields["entropy"].append(torch.nn.functional.pad(part.sampled_entropy, (0, right)))
        fields["seq"].append(torch.cat([prompt_ids, responses], dim=1))
        fields["mask"].append(torch.cat([prompt_mask, response_mask], dim=1))
        fields["resp_mask"].append(response_mask)
    return Rollout(
        sequences=torch.cat(fields["seq"]),
        attention_mask=torch.cat(fields["mask"]),
        response_mask=torch.cat(fields["resp_mask"]),
        prompt_length=prompt_len,
        ended_with_eos=torch.cat([p.ended_with_eos for p in parts]),
        sampled_logprobs=torch.cat(fields["logp"]) if len(fields["logp"]) == len(parts) else None,
        sampled_entropy=torch.cat(fields["entropy"]) if len(fields["entropy"]) == len(parts) else None,
        sampler_dtype=parts[0].sampler_dtype if len(fields["logp"]) == len(parts) else None,
    )


def response_texts(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """The sampled answers as text (EOS and padding removed)."""
    ids = rollout.responses.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)


def response_token_ids(rollout: Rollout) -> list[list[int]]:
    """Each answer's token ids up to and including its EOS (for the reference cache)."""
    lengths = rollout.response_mask.sum(1).tolist()
    return [row[:n] for row, n in zip(rollout.responses.cpu().tolist(), lengths, strict=True)]


@dataclass
class ScoredRollout:
    """Answers to a batch of prompts, their texts and their raw rewards."""

    rollout: Rollout
    responses: list[str]
    rewards: torch.Tensor
    """[B] float32 raw rewards r(x, y) (missing_eos_score applied; scored with EOS where an answer has it)."""


def sample_and_score(
    policy: PolicyEngine | AdapterReference | VllmSampler,
    scorer: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    gen: GenerationConfig,
    *,
    max_prompt_tokens: int,
    temperature: float | None = None,
    record_logprobs: bool = False,
) -> ScoredRollout:
    """One answer per entry of `prompts` (repeat a prompt to get several), in generate calls of
    gen.batch_size prompts, scored by the reward model or function. A TL;DR query longer than
    `max_prompt_tokens` loses the end of its post, cut at a newline (`tldr.fit_prompts`), for both.
    `record_logprobs`: keep the sampled tokens' log-probs (PolicyEngine.generate)."""
    prompts = fit_prompts(prompts, tokenizer, max_prompt_tokens)
    # vLLM schedules its own batches (`batches_internally`); generate runs gen.batch_size answers at a time.
    per_call = len(prompts) if getattr(policy, "batches_internally", False) else gen.batch_size
    parts = []
    for start in range(0, len(prompts), per_call):
        ids, mask = encode_prompts(tokenizer, prompts[start : start + per_call], max_prompt_tokens)
        parts.append(
            policy.generate(
                ids,
                mask,
                temperature=gen.temperature if temperature is None else temperature,
                top_p=gen.top_p,
                top_k=gen.top_k,
                max_new_tokens=gen.max_new_tokens,
                min_new_tokens=gen.min_new_tokens,
                gather_params=gen.gather_params,
                record_logprobs=record_logprobs,
            )
        )
    rollout = concat_rollouts(parts, tokenizer.pad_token_id)
    responses = response_texts(tokenizer, rollout)
    rewards = scorer.score(list(prompts), responses, ended_with_eos=rollout.ended_with_eos)
    return ScoredRollout(rollout=rollout, responses=responses, rewards=rewards)
