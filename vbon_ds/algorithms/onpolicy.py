"""On-policy experience as plain functions of their inputs: rollout, score, logprobs, advantages; and the
losses of the on-policy algorithms (the clipped policy gradient, PPO's value loss). Engines are used only
through their methods (generate, response_logprobs, values), so tests drive every phase with small fake
engines and no DeepSpeed. Which algorithm uses what: registry.py; the update that runs the losses: step.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from vbon_ds.algorithms import objective, sampler_mismatch
from vbon_ds.algorithms.objective import objective_reward
from vbon_ds.algorithms.rollout import ScoredRollout, encode_prompts, sample_and_score
from vbon_ds.algorithms.sampler_mismatch import WEIGHTS, old_logprobs_from_sampling
from vbon_ds.config import ExperimentConfig
from vbon_ds.core import losses
from vbon_ds.data.prompts import PromptSet
from vbon_ds.data.refcache import RefCache
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines
from vbon_ds.engines.policy import Rollout

if TYPE_CHECKING:  # offline.py imports this module
    from vbon_ds.algorithms.offline import ReferenceLogProbs


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
class TrainingInputs:
    """What every algorithm's experience function reads besides the step's prompts and generator."""

    engines: Engines
    cfg: ExperimentConfig
    prompts: PromptSet
    cache: RefCache | None
    """The reference cache (None: a kl_rl run without one)."""
    reference_logps: ReferenceLogProbs
    """The offline algorithms' reference log-probs of cached answers, computed once each."""
    beta: float
    """The KL coefficient of the on-policy objective (objective.objective_beta)."""


@dataclass
class Experience:
    """What the update trains on: token rows by role ("answers" for RL, "chosen"/"rejected" for pairs) and
    per-item tensors, [B] per item or [B, R] per token of the first role's answers."""

    batches: dict[str, TokenBatch]
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, float]] = field(default_factory=list)
    """A few (prompt, answer, reward) triples to show in TensorBoard (on-policy only)."""

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


def rollout(engines: Engines, cfg: ExperimentConfig, prompts: Sequence[str]) -> ScoredRollout:
    """The actor answers each entry of `prompts` once and the reward scores the answers (the actor is its
    own sampler: it records the sampled tokens' log-probs when they will be the old log-probs)."""
    return sample_and_score(
        engines.sampler("actor"),
        engines.scorer,
        engines.tokenizer,
        prompts,
        cfg.generation,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        record_logprobs=old_logprobs_from_sampling(cfg, engines.actor.dtype, engines.actor.dtype),
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
    credited = objective_reward(cfg, rewards, sorted_ref_rewards, ended_with_eos)
    log_f = objective.log_f(cfg, rewards, sorted_ref_rewards, ended_with_eos, credited)
    return Scores(rewards, credited, log_f)


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
    sampler: torch.Tensor | None = None
    """The sampler's recorded log-probs when `actor` is a forward's instead (the loss corrects for them)."""


@torch.no_grad()
def logprobs(
    engines: Engines, cfg: ExperimentConfig, batch: TokenBatch, sampled: Rollout | None = None
) -> LogProbs:
    """Actor and reference log-probs of the sampled tokens, the actor's entropy and the critic's values;
    the actor's are the ones `sampled` recorded when they serve as old log-probs (no forward; the entropy
    as sampler_mismatch.recorded_entropy), else a forward's, with the recorded ones kept as `sampler`."""
    temperature, size = cfg.generation.temperature, cfg.train.micro_batch_size
    recorded = None if sampled is None else sampled.sampled_logprobs
    use_recorded = sampler_mismatch.recording_is_old_policy(cfg, engines.actor, sampled)
    if use_recorded:
        actor, entropy = recorded, sampler_mismatch.recorded_entropy(sampled)
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
    return LogProbs(actor, reference, entropy, values, sampler=None if use_recorded else recorded)


AdvantageEstimator = Callable[
    [ExperimentConfig, float, torch.Tensor, Scores, LogProbs, torch.Tensor], dict[str, torch.Tensor]
]
"""(cfg, beta, per-token KL [B, R], scores, log-probs, response mask) -> the tensors the update trains on."""


def gae_advantages(
    cfg: ExperimentConfig, beta: float, kl: torch.Tensor, scores: Scores, logps: LogProbs, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PPO: per-token GAE advantages and returns against the critic's values (losses.ppo_advantages)."""
    advantage, returns = losses.ppo_advantages(
        scores.objective_rewards, kl, logps.values, mask, beta,
        cfg.algo.gamma, cfg.algo.lam, cfg.algo.whiten_advantages,
    )  # fmt: skip
    return {"advantages": advantage, "returns": returns, "values": logps.values}


def leave_one_out_advantages(
    cfg: ExperimentConfig, beta: float, kl: torch.Tensor, scores: Scores, logps: LogProbs, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """RLOO: one advantage per answer against the mean of its prompt's other K - 1 answers
    (losses.rloo_advantages), the same at every token."""
    per_answer = losses.rloo_advantages(
        scores.objective_rewards, kl, mask, beta, cfg.algo.samples_per_prompt, cfg.algo.whiten_advantages
    )
    return {"advantages": per_answer.unsqueeze(1) * mask}


def advantages(
    cfg: ExperimentConfig,
    beta: float,
    batch: TokenBatch,
    scores: Scores,
    logps: LogProbs,
    estimator: AdvantageEstimator,
) -> Experience:
    """The experience of scored answers: the estimator's advantages (KL shaping inside) and the stats."""
    mask = batch.response_mask
    kl = losses.kl_penalty(logps.actor, logps.reference)
    tensors = {"logprobs": logps.actor, **estimator(cfg, beta, kl, scores, logps, mask)}
    stats = {
        "train/reward": scores.rewards.mean().item(),
        "train/objective_reward": scores.objective_rewards.mean().item(),
        "train/kl": losses.masked_sum(logps.actor - logps.reference, mask, dim=1).mean().item(),
        "train/entropy": losses.masked_mean(logps.entropy, mask).item(),
        "train/response_length": mask.sum(1).float().mean().item(),
    }
    if scores.log_f is not None:
        stats["train/log_F"] = scores.log_f.mean().item()
    if logps.sampler is not None:
        tensors[WEIGHTS], mismatch = sampler_mismatch.correction(cfg, logps.actor, logps.sampler, mask)
        stats.update(mismatch)
    return Experience({"answers": batch}, tensors, stats)


# ---------------------------------------------------------------- experience of a step

SHOWN_SAMPLES = 4
"""(prompt, answer, reward) triples of a step that TensorBoard shows."""


def rollout_experience(
    inputs: TrainingInputs, prompt_index: list[int], estimator: AdvantageEstimator
) -> Experience:
    """rollout -> score -> logprobs -> advantages for this rank's prompts, K answers each (raises
    NonFiniteReward)."""
    cfg, engines = inputs.cfg, inputs.engines
    index = [i for i in prompt_index for _ in range(cfg.algo.samples_per_prompt)]
    prompts = [inputs.prompts.texts[i] for i in index]
    t0 = time.perf_counter()
    sampled = rollout(engines, cfg, prompts)
    t_rollout = time.perf_counter() - t0
    names = [f"prompt {i} ({inputs.prompts.ids[i]!r})" for i in index]
    batch = TokenBatch.of(sampled.rollout)
    rewards = sampled.rewards.to(batch.sequences.device)
    ended_with_eos = sampled.rollout.ended_with_eos
    scores = score(cfg, rewards, sorted_ref_rewards(inputs, index), names, ended_with_eos)
    logps = logprobs(engines, cfg, batch, sampled.rollout)
    exp = advantages(cfg, inputs.beta, batch, scores, logps, estimator)
    exp.stats["train/eos_fraction"] = ended_with_eos.float().mean().item()
    exp.stats["time/rollout"] = t_rollout
    exp.stats["time/logprobs"] = time.perf_counter() - t0 - t_rollout
    shown = slice(0, SHOWN_SAMPLES)
    exp.samples = list(
        zip(prompts[shown], sampled.responses[shown], scores.rewards[shown].tolist(), strict=True)
    )
    return exp


def sorted_ref_rewards(inputs: TrainingInputs, index: list[int]) -> torch.Tensor | None:
    """The cached reference rewards of each answer's prompt, [B, M] ascending (None without a cache)."""
    if inputs.cache is None:
        return None
    return inputs.cache.rewards_for([inputs.prompts.ids[i] for i in index]).to(distributed.device())


def ppo_experience(inputs: TrainingInputs, prompt_index: list[int], generator: torch.Generator) -> Experience:
    """Rollouts with GAE advantages against the critic (`generator` unused: sampling draws from the
    ranks' own RNG streams)."""
    return rollout_experience(inputs, prompt_index, gae_advantages)


def rloo_experience(
    inputs: TrainingInputs, prompt_index: list[int], generator: torch.Generator
) -> Experience:
    """Rollouts with leave-one-out advantages (`generator` unused, as for ppo_experience)."""
    return rollout_experience(inputs, prompt_index, leave_one_out_advantages)


# ---------------------------------------------------------------- losses


class Loss(NamedTuple):
    """One engine's loss on a micro-batch, as the update (step.py) runs it."""

    loss: torch.Tensor
    stats: dict[str, float]
    graph: torch.Tensor
    """A tensor of the loss's graph before anything that can turn non-finite (the engine's forward
    output): a non-finite loss is replaced by 0 * graph, a zero gradient that still runs every collective."""


LossFn = Callable[[Engines, ExperimentConfig, Experience], Loss]
"""An algorithm's loss of one engine on a micro-batch: forward, loss and its stats; no backward."""


def policy_gradient_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """The clipped policy-gradient surrogate on the actor (PPO and RLOO), weighted per token by WEIGHTS."""
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
        t.get(WEIGHTS),
    )
    stats = {
        "train/loss": loss.item(),
        "train/clip_frac": pg_stats["clip_frac"].item(),
        "train/approx_kl": pg_stats["approx_kl"].item(),
    }
    return Loss(loss, stats, new_logp)


def value_loss(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
    """PPO's clipped value loss on the critic (the critic has its own optimizer: no scale to set)."""
    rows, t = micro.batches["answers"], micro.tensors
    values = engines.critic.values(rows.sequences, rows.attention_mask, rows.prompt_length)
    loss, v_stats = losses.value_loss(
        values, t["values"], t["returns"], rows.response_mask, cfg.algo.value_clip_range
    )
    stats = {"train/value_loss": loss.item(), "train/vf_clip_frac": v_stats["vf_clip_frac"].item()}
    return Loss(loss, stats, values)
