"""Reward-KL frontier math: standard errors over prompts, paired differences, win rates against BoN(n),
the Pareto front with dominance outside one standard error, and how often each method is on it.

Pure functions on tensors and floats (no I/O, no DeepSpeed); `vbon evaluate` builds its table from them.
Answers to one prompt are correlated, so a mean over prompts x answers gets the standard error of the mean
of per-prompt means: std(per-prompt means) / sqrt(#prompts).

DOMINANCE_RULE states the rule the front uses (`dominates`); the report prints it under its table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vbon_ds.core.bon import log_binom, sorted_ref_rewards

DOMINANCE_RULE = (
    "A dominates B when r_A - r_B > SE(r_A - r_B) and KL_B - KL_A > SE(KL_B - KL_A): differences and "
    "standard errors paired over the prompts both were measured on (the standard deviation of the "
    "per-prompt differences over sqrt(#prompts)); rows not measured on the same prompts use the unpaired "
    "SE sqrt(SE_A^2 + SE_B^2); a difference with no SE (one prompt) never counts. A row is on the front "
    "when no other row dominates it."
)


def prompt_means(values: Tensor) -> Tensor:
    """Per-prompt means [P] (float64) of `values` [P] or [P, K] (K answers per prompt)."""
    return values.double().reshape(values.shape[0], -1).mean(1)


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error over prompts of `values` [P] or [P, K] (K answers per prompt).

    Each prompt's answers are averaged first; the standard error is the sample standard deviation of the
    P prompt means over sqrt(P) (nan for a single prompt). float64.
    """
    per_prompt = prompt_means(values)
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


@dataclass(frozen=True)
class Point:
    """One point of the reward-KL plane: mean reward and KL with their standard errors (None: unknown,
    taken as 0), and the per-prompt means behind them keyed by prompt id (empty: not recorded)."""

    reward: float
    kl: float
    reward_se: float | None = None
    kl_se: float | None = None
    prompt_rewards: Mapping[str, float] = field(default_factory=dict)
    prompt_kls: Mapping[str, float] = field(default_factory=dict)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float]:
    """Mean and standard error over prompts of a_p - b_p, for per-prompt means of two methods measured on
    the same prompts (keyed by prompt id); nan standard error for a single prompt."""
    if a.keys() != b.keys() or not a:
        raise ValueError(f"paired_difference needs the same prompts on both sides ({len(a)} and {len(b)})")
    ids = list(a)
    return mean_and_se(
        torch.tensor([a[i] for i in ids], dtype=torch.float64)
        - torch.tensor([b[i] for i in ids], dtype=torch.float64)
    )


def _difference(
    mean_a: float,
    mean_b: float,
    se_a: float | None,
    se_b: float | None,
    a: Mapping[str, float],
    b: Mapping[str, float],
) -> tuple[float, float]:
    """a - b and its standard error: paired when both sides carry per-prompt values of the same prompts."""
    if a and a.keys() == b.keys():
        return paired_difference(a, b)
    return mean_a - mean_b, math.hypot(se_a or 0.0, se_b or 0.0)


def reward_difference(a: Point, b: Point) -> tuple[float, float]:
    """r_A - r_B and its standard error (paired over shared prompts where recorded)."""
    return _difference(a.reward, b.reward, a.reward_se, b.reward_se, a.prompt_rewards, b.prompt_rewards)


def kl_difference(a: Point, b: Point) -> tuple[float, float]:
    """KL_A - KL_B and its standard error (paired over shared prompts where recorded)."""
    return _difference(a.kl, b.kl, a.kl_se, b.kl_se, a.prompt_kls, b.prompt_kls)


def dominates(a: Point, b: Point) -> bool:
    """Whether `a` has more reward and less KL than `b`, both by more than one standard error of the
    difference (DOMINANCE_RULE); a nan standard error makes the comparison False."""
    reward_gain, reward_se = reward_difference(a, b)
    kl_saving, kl_se = kl_difference(b, a)
    return reward_gain > reward_se and kl_saving > kl_se


def significant_front(points: Sequence[Point]) -> list[bool]:
    """Which points no other point dominates (DOMINANCE_RULE)."""
    return [
        not any(dominates(other, p) for j, other in enumerate(points) if j != i) for i, p in enumerate(points)
    ]


def front_counts(methods: Sequence[str], on_front: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """Per method, in order of first appearance: (its points on the front, its points)."""
    if len(methods) != len(on_front):
        raise ValueError(f"{len(methods)} methods for {len(on_front)} front flags")
    counts: dict[str, tuple[int, int]] = {}
    for method, on in zip(methods, on_front, strict=True):
        hits, total = counts.get(method, (0, 0))
        counts[method] = (hits + int(on), total + 1)
    return counts
