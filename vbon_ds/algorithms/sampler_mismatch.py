"""The sampler's log-probs against the trainer's. A rollout can carry the log-probs its sampler recorded
(the actor's own generate, or a vLLM engine in another precision): whether they serve as PPO's old
log-probs, and, when a training forward gives those instead, the truncated importance weights that correct
the policy gradient for tokens drawn by a slightly different policy (docs/math.md section 4).
"""

from __future__ import annotations

import torch

from vbon_ds.config import ExperimentConfig
from vbon_ds.core import losses
from vbon_ds.engines.policy import Rollout

WEIGHTS = "sampler_is_weights"
"""The experience tensor of the per-token weights the policy-gradient loss multiplies its surrogate by."""


def old_logprobs_from_sampling(
    cfg: ExperimentConfig, actor_dtype: torch.dtype, sampler_dtype: torch.dtype | None
) -> bool:
    """Whether a rollout's recorded log-probs (when it has them) are PPO's old log-probs, instead of a
    training forward's. In fp32 the two agree to rounding (KV-cached vs full forward); a bf16 actor or
    sampler differs by more than PPO's ratio should see, so auto runs the forward there."""
    if cfg.algo.old_logprobs == "auto":
        return actor_dtype == sampler_dtype == torch.float32
    return cfg.algo.old_logprobs == "sampling"


def recording_is_old_policy(cfg: ExperimentConfig, actor: object, sampled: Rollout | None) -> bool:
    """Whether `sampled` carries recorded log-probs and they are PPO's old log-probs for `actor`."""
    if sampled is None or sampled.sampled_logprobs is None:
        return False
    return old_logprobs_from_sampling(cfg, actor.dtype, sampled.sampler_dtype)


def recorded_entropy(sampled: Rollout) -> torch.Tensor:
    """The sampler's per-token entropy [B, R]; where it gave none (vLLM), the sampled tokens' surprisal
    -log mu(y_t), whose expectation over the sampled token is that entropy (0 at padding)."""
    if sampled.sampled_entropy is not None:
        return sampled.sampled_entropy
    return -sampled.sampled_logprobs


def correction(
    cfg: ExperimentConfig, old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The truncated importance weights [B, R] of tokens the sampler drew, for the trainer's old policy,
    and the step's stats: train/sampler_kl (k1 estimate of the per-token KL(sampler || trainer)) and
    train/sampler_is_clipped (share of tokens whose weight is at algo.sampler_is_cap)."""
    cap = cfg.algo.sampler_is_cap
    weights = losses.truncated_importance_weights(old_logp, sampler_logp, mask, cap)
    stats = {
        "train/sampler_kl": losses.sampler_kl(sampler_logp, old_logp, mask).item(),
        "train/sampler_is_clipped": losses.masked_mean((weights >= cap).to(weights.dtype), mask).item(),
    }
    return weights, stats
