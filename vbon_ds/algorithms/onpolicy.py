"""The phases of a training step as plain functions of their inputs: rollout, score, logprobs, advantages,
update. Engines are used only through their methods (generate, response_logprobs, values, backward, step),
so tests drive every phase with small fake engines and no DeepSpeed. The step itself is in train.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vbon_ds.algorithms.rollout import ScoredRollout, encode_prompts, sample_and_score
from vbon_ds.batching import BatchSizes
from vbon_ds.config import ExperimentConfig
from vbon_ds.core import bon, losses
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines
from vbon_ds.engines.policy import Rollout


@dataclass
class TokenBatch:
    """Prompt + answer token rows the forward passes run on: prompts left-padded to P tokens, answers
    right-padded to R tokens; `response_mask` [B, R] marks the answer tokens."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int

    @classmethod
    def of(cls, rollout: object) -> TokenBatch:
        """The token rows of a rollout (or of anything with these four attributes)."""
        return cls(rollout.sequences, rollout.attention_mask, rollout.response_mask, rollout.prompt_length)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def rows(self, index: torch.Tensor) -> TokenBatch:
        """The rows in `index`, with the response padding no row of them needs trimmed off."""
        width = int(self.response_mask[index].sum(1).max().clamp(min=1))
        end = self.prompt_length + width
        return TokenBatch(
            self.sequences[index, :end],
            self.attention_mask[index, :end],
            self.response_mask[index, :width],
            self.prompt_length,
        )


def answer_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[Sequence[int]],
    max_prompt_tokens: int,
) -> TokenBatch:
    """Rows of given answers (token ids, e.g. from the reference cache) after their prompts."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    width = max(1, max(len(a) for a in answers))
    responses = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=prompt_ids.dtype)
    response_mask = torch.zeros((len(answers), width), dtype=prompt_mask.dtype)
    for row, ids in enumerate(answers):
        responses[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
        response_mask[row, : len(ids)] = 1
    dev = prompt_ids.device
    return TokenBatch(
        sequences=torch.cat([prompt_ids, responses.to(dev)], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.to(dev)], dim=1),
        response_mask=response_mask.to(dev),
        prompt_length=prompt_ids.shape[1],
    )


@dataclass
class Experience:
    """What the update trains on: token rows by role ("answers" for RL, "chosen"/"rejected" for pairs) and
    per-item tensors, [B] per item or [B, R] per token of the first role's answers."""

    batches: dict[str, TokenBatch]
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.batches.values())))

    def micro_batch(self, index: torch.Tensor) -> Experience:
        """The items in `index`, response padding trimmed (per-token tensors to the first role's width)."""
        batches = {role: batch.rows(index) for role, batch in self.batches.items()}
        width = next(iter(batches.values())).response_mask.shape[1]
        tensors = {
            name: value[index, :width] if value.dim() == 2 else value[index]
            for name, value in self.tensors.items()
        }
        return Experience(batches, tensors)


# ---------------------------------------------------------------- rollout and score


def old_logprobs_from_sampling(cfg: ExperimentConfig, actor_dtype: torch.dtype) -> bool:
    """Whether the actor's log-probs of its rollout come from sampling instead of another forward. In fp32
    the two agree to rounding (KV-cached vs full forward); in bf16 they differ by more than PPO's ratio
    should see, so auto recomputes them there."""
    if cfg.algo.old_logprobs == "auto":
        return actor_dtype == torch.float32
    return cfg.algo.old_logprobs == "sampling"


def rollout(engines: Engines, cfg: ExperimentConfig, prompts: Sequence[str]) -> ScoredRollout:
    """The actor answers each entry of `prompts` once and the reward scores the answers."""
    return sample_and_score(
        engines.actor,
        engines.scorer,
        engines.tokenizer,
        prompts,
        cfg.generation,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        record_logprobs=old_logprobs_from_sampling(cfg, engines.actor.dtype),
    )


class NonFiniteReward(Exception):
    """A rollout produced a NaN or infinite reward; the message names the prompts."""


@dataclass
class Scores:
    """The rewards of one step's answers, all [B]."""

    rewards: torch.Tensor
    """Raw r(x, y) from the reward model or function."""
    objective_rewards: torch.Tensor
    """What the objective credits: log F_hat(r) (vbon), the exact BoN ratio (vbon_exact) or r (kl_rl)."""
    log_f: torch.Tensor | None
    """log F_hat(r) against the cached reference rewards; None when the run has no cache (kl_rl)."""


def objective_reward(
    cfg: ExperimentConfig,
    rewards: torch.Tensor,
    sorted_ref_rewards: torch.Tensor | None,
    ended_with_eos: torch.Tensor,
) -> torch.Tensor:
    """The scalar each answer is credited with: raw r (kl_rl, reward.missing_eos_score already in it) or a
    vBoN reward from the cached rewards (with missing_eos_score set, cut-off answers get the lowest one)."""
    if cfg.vbon.objective == "kl_rl":
        return rewards
    estimator = "bound" if cfg.vbon.objective == "vbon" else "exact"
    cut_off = ended_with_eos if cfg.reward.missing_eos_score is not None else None
    return bon.vbon_reward(
        rewards, sorted_ref_rewards, cfg.vbon.n, estimator, ended_with_eos=cut_off, presorted=True
    )


def score(
    cfg: ExperimentConfig,
    rewards: torch.Tensor,
    sorted_ref_rewards: torch.Tensor | None,
    prompt_names: Sequence[str],
    ended_with_eos: torch.Tensor,
) -> Scores:
    """Check the rewards once, then the objective reward and log F_hat (computed once: for vbon they are
    the same tensor). `sorted_ref_rewards` [B, M] ascending per row, as the cache stores them;
    `prompt_names[j]` names answer j's prompt in the error; `ended_with_eos` [B] bool."""
    bad = list(
        dict.fromkeys(prompt_names[j] for j in (~torch.isfinite(rewards)).nonzero().flatten().tolist())
    )
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteReward(f"reward is not finite for {', '.join(bad[:5])}{more}")
    objective = objective_reward(cfg, rewards, sorted_ref_rewards, ended_with_eos)
    if sorted_ref_rewards is None:
        log_f = None
    elif cfg.vbon.objective == "vbon":
        log_f = objective
    else:
        cut_off = ended_with_eos if cfg.reward.missing_eos_score is not None else None
        log_f = bon.log_cdf_of_answers(rewards, sorted_ref_rewards, cut_off, presorted=True)
    return Scores(rewards, objective, log_f)


# ---------------------------------------------------------------- logprobs and advantages


def forward_in_micro_batches(fn: Callable[[TokenBatch], object], batch: TokenBatch, size: int) -> object:
    """fn(rows) per micro-batch of `size` rows, concatenated (tuples elementwise): a forward over a whole
    batch without its whole activation memory. Rows keep the batch's full width, so results line up."""
    outs = [
        fn(TokenBatch(*(t[i : i + size] for t in batch_tensors(batch)), batch.prompt_length))
        for i in range(0, len(batch), size)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


def batch_tensors(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.sequences, batch.attention_mask, batch.response_mask


def policy_logprobs(
    policy: object, batch: TokenBatch, temperature: float, size: int, with_entropy: bool = False
) -> object:
    """Per-token log-probs [B, R] of the answers under softmax(logits / temperature) of `policy`, in
    micro-batches of `size` rows ((logprobs, entropy) with `with_entropy`)."""
    return forward_in_micro_batches(
        lambda rows: policy.response_logprobs(
            rows.sequences, rows.attention_mask, rows.prompt_length, temperature, with_entropy
        ),
        batch,
        size,
    )


@dataclass
class LogProbs:
    """Per-token [B, R] tensors of one step's answers (0 at padding)."""

    actor: torch.Tensor
    reference: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None = None
    """The critic's value before each token (PPO only)."""


@torch.no_grad()
def logprobs(
    engines: Engines, cfg: ExperimentConfig, batch: TokenBatch, sampled: Rollout | None = None
) -> LogProbs:
    """Actor and reference log-probs of the sampled tokens, the actor's entropy and the critic's values;
    the actor's are the ones `sampled` recorded during generation when it has them (no forward)."""
    temperature, size = cfg.generation.temperature, cfg.train.micro_batch_size
    if sampled is not None and sampled.sampled_logprobs is not None:
        actor, entropy = sampled.sampled_logprobs, sampled.sampled_entropy
    else:
        actor, entropy = policy_logprobs(engines.actor, batch, temperature, size, with_entropy=True)
    reference = policy_logprobs(engines.reference, batch, temperature, size)
    values = None
    if engines.critic is not None:
        values = forward_in_micro_batches(
            lambda rows: engines.critic.values(rows.sequences, rows.attention_mask, rows.prompt_length),
            batch,
            cfg.train.micro_batch_size,
        )
    return LogProbs(actor, reference, entropy, values)


def advantages(
    cfg: ExperimentConfig, beta: float, batch: TokenBatch, scores: Scores, logps: LogProbs
) -> Experience:
    """The algorithm's advantages (losses.ppo_advantages or losses.rloo_advantages) and the step's stats."""
    mask = batch.response_mask
    kl = losses.kl_penalty(logps.actor, logps.reference)
    tensors = {"logprobs": logps.actor}
    if cfg.algo.name == "ppo":
        tensors["advantages"], tensors["returns"] = losses.ppo_advantages(
            scores.objective_rewards, kl, logps.values, mask, beta,
            cfg.algo.gamma, cfg.algo.lam, cfg.algo.whiten_advantages,
        )  # fmt: skip
        tensors["values"] = logps.values
    else:
        per_answer = losses.rloo_advantages(
            scores.objective_rewards, kl, mask, beta, cfg.algo.samples_per_prompt, cfg.algo.whiten_advantages
        )
        tensors["advantages"] = per_answer.unsqueeze(1) * mask  # the same advantage at every token
    stats = {
        "train/reward": scores.rewards.mean().item(),
        "train/objective_reward": scores.objective_rewards.mean().item(),
        "train/kl": losses.masked_sum(logps.actor - logps.reference, mask, dim=1).mean().item(),
        "train/entropy": losses.masked_mean(logps.entropy, mask).item(),
        "train/response_length": mask.sum(1).float().mean().item(),
    }
    if scores.log_f is not None:
        stats["train/log_F"] = scores.log_f.mean().item()
    return Experience({"answers": batch}, tensors, stats)


# ---------------------------------------------------------------- update


MicroStep = Callable[[Experience], tuple[dict[str, float], bool]]
"""One forward/backward on a micro-batch: (stats, whether the loss was finite on every rank)."""


def update(
    exp: Experience,
    sizes: BatchSizes,
    epochs: int,
    generator: torch.Generator,
    micro_step: MicroStep,
) -> dict[str, float]:
    """`epochs` passes over the experience in a random order, each split into minibatches (one optimizer step
    each) of micro-batches (one forward/backward each); returns the mean of each stat and the number of
    micro-batches whose loss was not finite (their gradient was zeroed)."""
    per_rank_minibatch = sizes.minibatch_samples // sizes.world_size
    totals: dict[str, list[float]] = {}
    skipped = 0
    for _ in range(epochs):
        order = torch.randperm(len(exp), generator=generator)
        for mb_start in range(0, order.numel(), per_rank_minibatch):
            minibatch = order[mb_start : mb_start + per_rank_minibatch]
            for mu_start in range(0, minibatch.numel(), sizes.micro_batch_per_rank):
                index = minibatch[mu_start : mu_start + sizes.micro_batch_per_rank]
                stats, ok = micro_step(exp.micro_batch(index))
                skipped += not ok
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
    out = {key: float(np.mean(values)) for key, values in totals.items()}
    out["train/skipped_micro_batches"] = float(skipped)
    return out


def all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank (a collective)."""
    return not any_rank(not bool(torch.isfinite(value).all()))


def any_rank(flag: bool) -> bool:
    return distributed.all_reduce_max(int(flag)) > 0


def backward_and_step(engine: object, loss: torch.Tensor, like: torch.Tensor) -> bool:
    """Backward and (at an accumulation boundary) optimizer step; False when the loss was not finite on some
    rank. Every rank must take part in backward/step (ZeRO collectives): a bad loss becomes a zero gradient
    through `like`, a tensor of the same graph."""
    ok = all_finite(loss)
    engine.backward(loss if ok else 0.0 * like.nan_to_num().sum())
    engine.step()
    return ok


def ppo_micro_step(engines: Engines, cfg: ExperimentConfig) -> MicroStep:
    """The clipped policy-gradient step on the actor (and the clipped value step on the critic, PPO)."""

    def step(micro: Experience) -> tuple[dict[str, float], bool]:
        rows, t = micro.batches["answers"], micro.tensors
        new_logp = engines.actor.response_logprobs(
            rows.sequences, rows.attention_mask, rows.prompt_length, cfg.generation.temperature
        )
        loss, pg_stats = losses.ppo_policy_loss(
            new_logp,
            t["logprobs"],
            t["advantages"],
            rows.response_mask,
            cfg.algo.clip_range,
            cfg.generation.max_new_tokens,
        )
        ok = backward_and_step(engines.actor, loss, new_logp)
        stats = {
            "train/loss": loss.item(),
            "train/clip_frac": pg_stats["clip_frac"].item(),
            "train/approx_kl": pg_stats["approx_kl"].item(),
        }
        if engines.critic is not None:
            values = engines.critic.values(rows.sequences, rows.attention_mask, rows.prompt_length)
            v_loss, v_stats = losses.value_loss(
                values, t["values"], t["returns"], rows.response_mask, cfg.algo.value_clip_range
            )
            ok = backward_and_step(engines.critic, v_loss, values) and ok
            stats["train/value_loss"] = v_loss.item()
            stats["train/vf_clip_frac"] = v_stats["vf_clip_frac"].item()
        return stats, ok

    return step


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each stat averaged over the ranks (every rank must call it with the same keys)."""
    gathered = distributed.all_gather_object(stats)
    return {key: float(np.mean([g[key] for g in gathered])) for key in stats}
