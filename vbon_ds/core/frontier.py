"""Reward-KL frontier math: standard errors over prompts, win rates against BoN(n), the Pareto front.

Pure functions on tensors and floats (no I/O, no DeepSpeed); `vbon evaluate` builds its table from them.
Answers to one prompt are correlated, so a mean over prompts x answers gets the standard error of the mean
of per-prompt means: std(per-prompt means) / sqrt(#prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from vbon_ds.core.bon import log_binom, sorted_ref_rewards


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error over prompts of `values` [P] or [P, K] (K answers per prompt).

    Each prompt's answers are averaged first; the standard error is the sample standard deviation of the
    P prompt means over sqrt(P) (nan for a single prompt). float64.
    """
    per_prompt = values.double().reshape(values.shape[0], -1).mean(1)
    if per_prompt.numel() == 0:
        raise ValueError("mean_and_se needs at least one prompt")
    mean = per_prompt.mean().item()
    if per_prompt.numel() < 2:
        return mean, math.nan
    return mean, (per_prompt.std(unbiased=True) / math.sqrt(per_prompt.numel())).item()


def win_rate_vs_bon(rewards: Tensor, ref_rewards: Tensor, n: int) -> Tensor:
    """Per answer: P(its reward beats the best of n answers drawn without replacement from the prompt's M
    cached reference answers), ties counting half; unbiased for the win rate against BoN(n) of pi_ref.

    With lt = #{ref < r} and le = #{ref <= r}: P(max < r) = C(lt, n) / C(M, n) and P(max <= r) =
    C(le, n) / C(M, n), so the win rate is (C(lt, n) + C(le, n)) / (2 C(M, n)); n = 1 is the win rate
    against one reference answer. `rewards` [B] or [B, K], `ref_rewards` [B, M] (any order); float64.
    """
    refs = sorted_ref_rewards(ref_rewards, n, extra=0)
    values = rewards.double().reshape(refs.shape[0], -1).contiguous()
    lt = torch.searchsorted(refs, values, side="left").double()
    le = torch.searchsorted(refs, values, side="right").double()
    log_total = log_binom(refs.new_tensor(refs.shape[-1]), n)
    win = (torch.exp(log_binom(lt, n) - log_total) + torch.exp(log_binom(le, n) - log_total)) / 2
    return win.reshape(rewards.shape)


def expected_bon_other_reward(ref_rewards: Tensor, other: Tensor, n: int) -> Tensor:
    """Unbiased estimate of E[other(y*)] where y* is BoN(n)'s choice by `ref_rewards` among n of the M
    cached answers (drawn without replacement, ties broken uniformly): the evaluation-reward value of the
    training reward's BoN. `ref_rewards` and `other` [B, M], aligned per answer; returns [B] float64.

    Sorted by the selecting reward, the answer at rank i (1-based) is the max of a random n-subset with
    probability C(i-1, n-1) / C(M, n); a uniform tie-break spreads that weight evenly over a tie group.
    """
    if ref_rewards.shape != other.shape or ref_rewards.dim() != 2:
        raise ValueError(f"ref_rewards and other must both be [B, M], got {ref_rewards.shape}, {other.shape}")
    sorted_ref_rewards(ref_rewards, n, extra=0)  # checks n and M
    order = torch.sort(ref_rewards.double(), dim=-1, stable=True)
    ranked, values = order.values, other.double().gather(-1, order.indices)
    m = ranked.shape[-1]
    rank = torch.arange(1, m + 1, dtype=torch.float64)
    weights = torch.exp(log_binom(rank - 1, n - 1) - log_binom(rank.new_tensor(m), n)).expand_as(ranked)
    # Each answer gets the mean weight of its tie group [lo, hi) of the selecting reward.
    cumulative = torch.nn.functional.pad(weights.cumsum(-1), (1, 0))
    lo = torch.searchsorted(ranked, ranked, side="left")
    hi = torch.searchsorted(ranked, ranked, side="right")
    spread = (cumulative.gather(-1, hi) - cumulative.gather(-1, lo)) / (hi - lo).double()
    return (spread * values).sum(-1)


def pareto_front(rewards: Sequence[float], kls: Sequence[float]) -> list[bool]:
    """Which points are on the reward-KL Pareto front (maximise reward, minimise KL): a point is on it when
    no other point has reward >= its reward and KL <= its KL with at least one of the two strict."""
    if len(rewards) != len(kls):
        raise ValueError(f"{len(rewards)} rewards for {len(kls)} KL values")
    points = list(zip(rewards, kls, strict=True))
    return [not any(r2 >= r and k2 <= k and (r2 > r or k2 < k) for r2, k2 in points) for r, k in points]
