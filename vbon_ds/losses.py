"""Policy-gradient losses and estimators on masked per-token tensors (pure functions, no I/O).

Per-token tensors are [batch, response_len] with right-padded responses; `mask` is a 0/1 (or bool)
tensor of the same shape. Padded positions change nothing: inputs are selected out with `torch.where`
before any arithmetic, never multiplied by 0, so NaN or inf garbage there cannot leak into a result or,
through a backward pass, into a gradient.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def _valid(mask: Tensor) -> Tensor:
    return mask.bool()


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(_valid(mask), x, torch.zeros_like(x))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over the valid positions (all of them, or along `dim`)."""
    kept = _zero_pad(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the valid positions (all of them, or along `dim`); 0 where nothing is valid."""
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to zero mean and unit (population) variance over the valid positions; 0 at padding.

    With `shift_mean=False` the mean is added back, which keeps the sign of a uniform advantage.
    """
    x = _zero_pad(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_pad(whitened, mask)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman 2020).

    With log ratio l = logp - ref_logp: k1 = l (unbiased), k2 = l^2 / 2 (low variance, biased),
    k3 = exp(-l) - 1 + l (unbiased and >= 0). Elementwise; mask the result downstream.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def last_token_mask(mask: Tensor) -> Tensor:
    """Bool tensor marking the last valid position of each row (none in an all-padding row)."""
    valid = _valid(mask)
    count = valid.sum(-1, keepdim=True)
    return valid & (valid.cumsum(-1) == count)


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Per-token rewards: -beta * kl at every valid token, plus the sequence score at the last valid one.

    `scores` [B], `kl` and `mask` [B, T], `beta` a float or a [B, 1] tensor (one coefficient per row);
    padded positions get 0. Every row needs a valid token.
    """
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(
            f"need scores [B] and kl, mask [B, T]; got scores {tuple(scores.shape)}, kl {tuple(kl.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if not _valid(mask).any(-1).all():
        raise ValueError("mask has a row with no valid token: its score would be dropped")
    rewards = -beta * _zero_pad(kl, mask)
    # The sequence-level score arrives with the last token, as in the paper's PPO setup.
    return rewards + torch.where(last_token_mask(mask), scores.unsqueeze(-1).to(rewards.dtype), 0.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns).

    The value after the last valid token is 0 (the episode ends there). Padded positions are 0 in both
    outputs. returns = advantages + values are the regression targets of the value model.
    """
    valid = _valid(mask)
    rewards, values = _zero_pad(rewards, mask), _zero_pad(values, mask)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    # Right-to-left recursion A_t = delta_t + gamma * lam * A_{t+1}; padding carries zeros through.
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(
            valid[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta)
        )
        next_value = values[:, t]
        reversed_advantages.append(next_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = _zero_pad(advantages + values, mask)
    return advantages, returns


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages: each score minus the mean of the other k - 1 for its prompt.

    `scores` is [B, k] or flat [B * k] with each prompt's k samples contiguous (repeat_interleave order);
    the result has the same shape.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 samples per prompt for a leave-one-out baseline, got {k}")
    if scores.dim() not in (1, 2) or scores.shape[-1] % k or (scores.dim() == 2 and scores.shape[1] != k):
        raise ValueError(f"scores must be [B, k] or [B * k] with k = {k}, got {tuple(scores.shape)}")
    grouped = scores.reshape(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(scores.shape)


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, averaged over valid tokens; returns (loss, stats).

    `advantages` is per token [B, T] or per sequence [B] (broadcast over its tokens). Stats (detached):
    `approx_kl` (k3 estimate of KL(old || new)), `clip_frac` (share of tokens where the clip is active),
    `ratio` (mean probability ratio).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = _zero_pad(advantages.expand_as(logp), mask)
    log_ratio = _zero_pad(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) over valid tokens; returns (loss, stats).

    V_clip keeps V within clip_range of the rollout-time values. Stats: `vf_clip_frac` (detached).
    """
    values, old_values, returns = (_zero_pad(x, mask) for x in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def sft_nll(logp: Tensor, mask: Tensor) -> Tensor:
    """Supervised fine-tuning loss: mean negative log-likelihood over valid tokens."""
    return masked_mean(-logp, mask)


def _pair_margin(
    chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor
) -> Tensor:
    # Difference of the implicit rewards log(pi / pi_ref) of chosen and rejected, per pair.
    return (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)


def dpo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> Tensor:
    """DPO loss -log sigmoid(beta * margin), mean over pairs; inputs are sequence log-probs [B]."""
    margin = _pair_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> Tensor:
    """IPO loss (margin - 1/(2 beta))^2, mean over pairs (Azar et al. 2023); the pair term of BoNBoN."""
    margin = _pair_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()
