"""Policy-gradient losses and estimators on masked per-token tensors (pure functions, no I/O).

Per-token tensors are [batch, response_len] with right-padded responses; `mask` is a 0/1 (or bool)
tensor of the same shape. Padded positions change nothing: inputs are selected out with `torch.where`
before any arithmetic, never multiplied by 0, so NaN or inf garbage there cannot leak into a result or,
through a backward pass, into a gradient.

Policy losses are per answer: each answer's sum over its tokens, divided by a constant (the run's
generation.max_new_tokens), averaged over answers. A mean over all tokens of a micro-batch would weigh an
answer by its share of the micro-batch's tokens, which tilts the optimum towards short answers
(docs/math.md section 4).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


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


def answer_mean(x: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
    """Mean over answers (rows) of each answer's sum of `x` over its valid tokens, divided by `max_tokens`.

    The divisor is a constant, not the answer's length or the micro-batch's token count, so the loss is an
    unbiased per-answer objective (Dr. GRPO, Liu et al. 2025) whatever the lengths in the micro-batch.
    """
    return masked_sum(x, mask, dim=-1).mean() / max_tokens


def kl_penalty(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k1 estimate log pi - log pi_ref of KL(pi || pi_ref), from tokens sampled from pi.

    Summed over an answer it is an unbiased estimate of the sequence KL, and as a reward its policy gradient
    is the gradient of that KL. k2 and k3 (Schulman 2020) are not offered: as fixed rewards their policy
    gradients are not grad KL (docs/math.md section 4). Elementwise; mask the result downstream.
    """
    return logp - ref_logp


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


def whiten(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit (population) variance over every element of `x` (e.g. one advantage per answer)."""
    return masked_whiten(x, torch.ones_like(x), eps=eps)


def leave_one_out(scores: Tensor, k: int) -> Tensor:
    """Each score minus the mean of the other k - 1 scores of its prompt (REINFORCE leave-one-out baseline).

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


def rloo_advantages(
    objective_rewards: Tensor, kl: Tensor, mask: Tensor, beta: float | Tensor, k: int, whiten_advantages: bool
) -> Tensor:
    """RLOO: one advantage per answer [B], to be broadcast over its tokens.

    The sequence reward is the per-token KL-shaped reward summed over the answer (`shape_rewards`), i.e.
    objective reward - beta * summed KL; the advantage is its leave-one-out difference over the k answers
    of each prompt, whitened over the answers (not over tokens, which would weight long answers more).
    """
    sequence_rewards = shape_rewards(objective_rewards, kl, mask, beta).sum(-1)
    advantages = leave_one_out(sequence_rewards, k)
    return whiten(advantages) if whiten_advantages else advantages


def ppo_advantages(
    objective_rewards: Tensor,
    kl: Tensor,
    values: Tensor,
    mask: Tensor,
    beta: float,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
) -> tuple[Tensor, Tensor]:
    """PPO: per-token advantages and returns [B, T] by GAE on the KL-shaped per-token rewards.

    Advantages are whitened over the valid tokens of the batch when asked; the returns (value targets) never.
    """
    advantages, returns = gae(shape_rewards(objective_rewards, kl, mask, beta), values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    max_tokens: int,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, summed over each answer's tokens / `max_tokens`, mean over answers
    (`answer_mean`); returns (loss, stats).

    `advantages` is per token [B, T] or per sequence [B] (broadcast over its tokens). `weights` [B, T], if
    given, multiply each token's surrogate (`truncated_importance_weights`: tokens drawn by another sampler
    than `old_logp`'s policy). Stats (detached, token means): `approx_kl` (k3 estimate of KL(old || new))
    and `clip_frac` (share of tokens where the clip is active).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = _zero_pad(advantages.expand_as(logp), mask)
    log_ratio = _zero_pad(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    surrogate = torch.maximum(unclipped, clipped)
    if weights is not None:
        surrogate = surrogate * weights
    loss = answer_mean(surrogate, mask, max_tokens)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
        }
    return loss, stats


def truncated_importance_weights(logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token min(pi / mu, cap) = min(exp(logp - sampler_logp), cap), detached, 0 at padding: tokens drawn
    from a sampler mu reweighted towards pi, the policy whose gradient the loss takes (truncated importance
    sampling, Yao et al. 2025). Uncapped, E_mu[(pi / mu) f] = E_pi[f]; the cap bounds the variance at the
    cost of a bias where pi / mu > cap (docs/math.md section 4)."""
    ratio = torch.exp(_zero_pad(logp - sampler_logp, mask)).clamp(max=cap)
    return _zero_pad(ratio, mask).detach()


def sampler_kl(sampler_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Token mean of log mu - log pi over tokens drawn from the sampler mu: the k1 estimate of the
    per-token KL(mu || pi) (unbiased per token, since the tokens come from mu)."""
    return masked_mean(sampler_logp - logp, mask)


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


def sft_nll(logp: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
    """Supervised fine-tuning loss: each answer's negative log-likelihood / `max_tokens`, mean over answers.

    Its optimum is the data distribution itself; a mean over tokens would favour short answers.
    """
    return answer_mean(-logp, mask, max_tokens)


def pair_margin(
    chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor
) -> Tensor:
    """Implicit-reward margin per pair: log(pi / pi_ref) of the chosen minus that of the rejected answer."""
    return (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)


def dpo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> Tensor:
    """DPO loss -log sigmoid(beta * margin), mean over pairs; inputs are sequence log-probs [B]."""
    margin = pair_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> Tensor:
    """IPO loss (margin - 1/(2 beta))^2, mean over pairs (Azar et al. 2023); the pair term of BoNBoN."""
    margin = pair_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()


def ipo_target_beta(n: int) -> float:
    """BoNBoN's IPO coefficient for best-vs-worst of n pairs: 1 / (2 (n - 1) H_{n-1}) (docs/math.md).

    Under pi_BoN (no ties) the expected log-ratio margin of the best over the worst of n reference samples is
    (n - 1) H_{n-1}, with H the harmonic number; IPO drives the margin to 1 / (2 beta), so this beta makes
    the fixed point the BoN distribution's own margin.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 for a best-vs-worst pair, got {n}")
    return 1.0 / (2.0 * (n - 1) * sum(1.0 / k for k in range(1, n)))


def bonbon_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    """BoNBoN (Gui et al. 2024): alpha * SFT(best) + (1 - alpha) * IPO(best, worst), mean over pairs.

    As in the authors' code the SFT term is the negative sequence log-likelihood of the best answer (summed
    over its tokens, not averaged), so `alpha` weighs nats per answer against the squared IPO margin.
    """
    sft = -chosen_logp.mean()
    return alpha * sft + (1.0 - alpha) * ipo_loss(
        chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta
    )
