"""The offline baselines: BoN-SFT, DPO, IPO and BoNBoN train on the reference cache, not on rollouts.

Per step, for each prompt and each of algo.subsets_per_prompt draws: a random N-subset of the M cached
answers, its best and its worst answer (a tie goes to the earlier in the random subset order, a uniform
choice). BoN-SFT imitates the best; DPO and IPO prefer the best to the worst; BoNBoN mixes SFT and IPO.
The reference log-prob of a cached answer is computed once, by the reference engine, and kept (in memory and
in checkpoints, so a resumed run sees the very same numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vbon_ds.algorithms.onpolicy import Experience, Loss, TrainingInputs, answer_batch, policy_logprobs
from vbon_ds.config import ExperimentConfig
from vbon_ds.core import losses
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines

AnswerKey = tuple[str, int]
"""(prompt id, index of the answer among the prompt's M cached answers in draw order)."""


@dataclass
class Pair:
    """The best and worst answer of one N-subset of a prompt's cached answers."""

    prompt_index: int
    chosen: int
    rejected: int
    chosen_reward: float
    rejected_reward: float


def choose_pairs(
    rewards: Sequence[Sequence[float]], prompt_index: Sequence[int], n: int, generator: torch.Generator
) -> list[Pair]:
    """One (best, worst) pair per entry of `prompt_index` from a random n-subset of that prompt's rewards
    (`rewards[j]`: the M cached rewards of entry j, draw order)."""
    pairs = []
    for j, index in enumerate(prompt_index):
        subset = torch.randperm(len(rewards[j]), generator=generator)[:n].tolist()
        best = max(subset, key=lambda i: rewards[j][i])  # first of the tied maxima in random order
        worst = min(subset, key=lambda i: rewards[j][i])
        pairs.append(Pair(index, best, worst, rewards[j][best], rewards[j][worst]))
    return pairs


class ReferenceLogProbs:
    """Sequence log-probs of cached answers under the reference policy, computed once per answer."""

    def __init__(self) -> None:
        self.values: dict[AnswerKey, float] = {}

    def lookup(
        self,
        engines: Engines,
        cfg: ExperimentConfig,
        keys: list[AnswerKey],
        prompts: list[str],
        answers: list[list[int]],
    ) -> torch.Tensor:
        """[len(keys)] float32 log pi_ref of each answer, computing the ones not seen before.

        Collective under ZeRO-3: every rank runs the same number of reference forwards (ranks with fewer
        new answers repeat one of theirs and drop the result).
        """
        first_row: dict[AnswerKey, int] = {}
        for j, key in enumerate(keys):
            if key not in self.values:
                first_row.setdefault(key, j)
        todo = list(first_row.values())
        size = cfg.train.micro_batch_size
        calls = distributed.all_reduce_max(-(-len(todo) // size))
        padded = todo + [0] * (calls * size - len(todo))
        for call in range(calls):
            rows = padded[call * size : (call + 1) * size]
            batch = answer_batch(
                engines.tokenizer,
                [prompts[j] for j in rows],
                [answers[j] for j in rows],
                cfg.data.max_prompt_tokens,
            )
            token_logp = policy_logprobs(engines.reference, batch, cfg.generation.temperature, size)
            sums = losses.masked_sum(token_logp, batch.response_mask, dim=1).tolist()
            for offset, j in enumerate(rows):
                if call * size + offset < len(todo):
                    self.values[keys[j]] = sums[offset]
        return torch.tensor([self.values[key] for key in keys], dtype=torch.float32)

    def state_dict(self) -> list[tuple[str, int, float]]:
        """(prompt id, answer index, log-prob) triples: plain JSON for the checkpoint (floats round-trip)."""
        return [(prompt_id, index, value) for (prompt_id, index), value in self.values.items()]

    def load_state_dict(self, triples: list[tuple[str, int, float]]) -> None:
        self.values = {(prompt_id, int(index)): float(value) for prompt_id, index, value in triples}


PAIR_ROLES = ("chosen", "rejected")
"""The answers a pair loss trains on: the best and the worst of each N-subset."""


@torch.no_grad()
def cached_experience(
    inputs: TrainingInputs, prompt_index: list[int], generator: torch.Generator, roles: Sequence[str]
) -> Experience:
    """Pairs of cached answers to this rank's prompts, their token rows and reference log-probs, for the
    `roles` the loss trains on ("chosen" alone, or PAIR_ROLES)."""
    cfg, engines, reference_logps = inputs.cfg, inputs.engines, inputs.reference_logps
    index = [i for i in prompt_index for _ in range(cfg.algo.subsets_per_prompt)]
    records = [inputs.cache.record(inputs.prompts.ids[i]) for i in index]
    pairs = choose_pairs([r.rewards for r in records], index, cfg.vbon.n, generator)
    prompt_texts = [inputs.prompts.texts[i] for i in index]
    answers = {"chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs]}
    batches, tensors = {}, {}
    for role in roles:
        ids = [record.token_ids[a] for record, a in zip(records, answers[role], strict=True)]
        keys = [(record.prompt_id, a) for record, a in zip(records, answers[role], strict=True)]
        batches[role] = answer_batch(engines.tokenizer, prompt_texts, ids, cfg.data.max_prompt_tokens)
        tensors[f"ref_{role}"] = reference_logps.lookup(engines, cfg, keys, prompt_texts, ids).to(
            batches[role].sequences.device
        )
    stats = {
        "train/chosen_reward": sum(p.chosen_reward for p in pairs) / len(pairs),
        "train/rejected_reward": sum(p.rejected_reward for p in pairs) / len(pairs),
        "train/response_length": batches["chosen"].response_mask.sum(1).float().mean().item(),
    }
    return Experience(batches, tensors, stats)


def best_answer_experience(
    inputs: TrainingInputs, prompt_index: list[int], generator: torch.Generator
) -> Experience:
    """The best of each N-subset of cached answers (BoN-SFT)."""
    return cached_experience(inputs, prompt_index, generator, ("chosen",))


def pair_experience(
    inputs: TrainingInputs, prompt_index: list[int], generator: torch.Generator
) -> Experience:
    """The best and the worst of each N-subset of cached answers (the pair losses)."""
    return cached_experience(inputs, prompt_index, generator, PAIR_ROLES)


# ---------------------------------------------------------------- losses


def ipo_beta(cfg: ExperimentConfig) -> float:
    """algo.ipo_beta, or BoNBoN's coefficient for best-vs-worst of N pairs when it is null."""
    return cfg.algo.ipo_beta if cfg.algo.ipo_beta is not None else losses.ipo_target_beta(cfg.vbon.n)


def _sequence_logp(
    engines: Engines, cfg: ExperimentConfig, rows: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's per-token [B, R] and per-answer [B] log-probs of `rows` (a TokenBatch)."""
    token_logp = engines.actor.response_logprobs(
        rows.sequences, rows.attention_mask, rows.prompt_length, cfg.generation.temperature
    )
    return token_logp, losses.masked_sum(token_logp, rows.response_mask, dim=1)


def _chosen_stats(chosen_tokens: torch.Tensor, chosen: torch.Tensor, micro: Experience) -> dict[str, float]:
    mask = micro.batches["chosen"].response_mask
    return {
        "train/chosen_nll": losses.masked_mean(-chosen_tokens.detach(), mask).item(),
        "train/chosen_log_ratio": (chosen.detach() - micro.tensors["ref_chosen"]).mean().item(),
    }


def bon_sft_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """BoN-SFT: the negative log-likelihood of the best answers (losses.sft_nll)."""
    chosen_tokens, chosen = _sequence_logp(engines, cfg, micro.batches["chosen"])
    stats = _chosen_stats(chosen_tokens, chosen, micro)
    loss = losses.sft_nll(chosen_tokens, micro.batches["chosen"].response_mask, cfg.generation.max_new_tokens)
    stats["train/loss"] = loss.item()
    return Loss(loss, stats, chosen_tokens)


PairFormula = Callable[[ExperimentConfig, tuple[torch.Tensor, ...]], torch.Tensor]
"""(cfg, (chosen, rejected, ref_chosen, ref_rejected) sequence log-probs) -> the pair loss."""


def _pair_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience, formula: PairFormula) -> Loss:
    """A loss on (best, worst) pairs, with the implicit reward margin and accuracy as stats."""
    chosen_tokens, chosen = _sequence_logp(engines, cfg, micro.batches["chosen"])
    stats = _chosen_stats(chosen_tokens, chosen, micro)
    _, rejected = _sequence_logp(engines, cfg, micro.batches["rejected"])
    pair = (chosen, rejected, micro.tensors["ref_chosen"], micro.tensors["ref_rejected"])
    loss = formula(cfg, pair)
    margin = losses.pair_margin(*(t.detach() for t in pair))
    stats["train/reward_margin"] = margin.mean().item()
    stats["train/reward_accuracy"] = (margin > 0).float().mean().item()
    stats["train/loss"] = loss.item()
    return Loss(loss, stats, chosen_tokens)


def dpo_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """DPO with algo.dpo_beta (losses.dpo_loss)."""
    return _pair_loss(engines, cfg, micro, lambda c, pair: losses.dpo_loss(*pair, c.algo.dpo_beta))


def ipo_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """IPO with `ipo_beta` (losses.ipo_loss)."""
    return _pair_loss(engines, cfg, micro, lambda c, pair: losses.ipo_loss(*pair, ipo_beta(c)))


def bonbon_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """BoNBoN: algo.bonbon_alpha x SFT + (1 - alpha) x IPO with `ipo_beta` (losses.bonbon_loss)."""
    return _pair_loss(
        engines, cfg, micro, lambda c, pair: losses.bonbon_loss(*pair, c.algo.bonbon_alpha, ipo_beta(c))
    )
