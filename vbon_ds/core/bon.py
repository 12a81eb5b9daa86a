"""Best-of-N math: the exact BoN distribution, the reference-reward CDF estimator and vBoN rewards.

Pure functions on tensors (no I/O, no DeepSpeed). Notation and derivations: docs/math.md.
F_<(v) = P_ref[r < v], F_<=(v) = P_ref[r <= v], and for N samples with ties broken uniformly

    pi_BoN(y) = pi_ref(y) * (F_<=^N - F_<^N) / (F_<= - F_<)   evaluated at v = r(y).
"""

import math
import numbers

import torch
from torch import Tensor

ESTIMATORS = ("bound", "exact")


def _check_n(n: int, minimum: int = 1) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"n must be an integer >= {minimum}, got {n!r}")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_bon_ratio(log_b: Tensor, t: Tensor, n: int) -> Tensor:
    """log((b^n - a^n) / (b - a)) for 0 <= a <= b, from log b and t = log(a / b) <= 0.

    (b^n - a^n) / (b - a) = b^(n-1) * sum_{k<n} (a/b)^k; the geometric sum is taken in closed form,
    with its limit n where a = b, so the result is finite whenever b > 0.
    """
    geometric = _log1mexp(n * t) - _log1mexp(t)
    return (n - 1) * log_b + torch.where(t < 0, geometric, math.log(n))


def vbon_beta(n: int) -> float:
    """The KL coefficient beta = 1/(N-1) that turns vBoN into KL-regularised RL (N >= 2)."""
    _check_n(n, minimum=2)
    return 1.0 / (n - 1)


def bon_kl_bound(n: int) -> float:
    """Upper bound on KL(pi_BoN || pi_ref): log N - (N-1)/N (Beirami et al. 2024); tight without ties."""
    _check_n(n)
    return math.log(n) - (n - 1) / n


def bon_kl_from_samples(ref_rewards: Tensor, n: int) -> Tensor:
    """KL(pi_BoN || pi_ref) of BoN(n) with ties broken uniformly, for the reward distribution that M
    reference rewards per prompt show: a value shared by k >= 2 of them is an atom of mass k/M, a value
    seen once stands for a tie-free stretch of mass 1/M of the CDF. `ref_rewards` [M] -> scalar, [B, M]
    -> [B]; float64.

    pi_BoN / pi_ref depends on y only through u = F(r(y)): it is N u^(N-1) on tie-free stretches and the
    constant (b^N - a^N) / (b - a) on an atom [a, b] of the CDF (`bon_log_probs`' ratio), so the KL is
    the integral over u of ratio * log(ratio). Equals `bon_kl_bound(n)` without ties, is 0 when every
    reward ties, and lies in between otherwise (tie-heavy rewards such as lexicon scores). Every sample
    taken as an atom of mass 1/M instead would bias a tie-free KL low by finite M (docs/math.md).
    """
    refs = sorted_ref_rewards(ref_rewards, n, extra=0)
    num_refs = refs.shape[-1]
    below = torch.searchsorted(refs, refs, side="left")
    at_or_below = torch.searchsorted(refs, refs, side="right")
    group_size = at_or_below - below  # how many samples share this sample's reward
    lo, hi = below.double() / num_refs, at_or_below.double() / num_refs  # F_< and F_<= there
    # Tie-free stretch [lo, hi]: with w = u^N, the integral of N u^(N-1) log(N u^(N-1)) du is
    # [w log N + (N-1)/N (w log w - w)] between lo^N and hi^N.
    w_lo, w_hi = lo**n, hi**n

    def antiderivative(w: Tensor) -> Tensor:
        return w * math.log(n) + (n - 1) / n * (torch.xlogy(w, w) - w)

    stretch = antiderivative(w_hi) - antiderivative(w_lo)
    # Atom [lo, hi]: BoN mass b^N - a^N times the log of the ratio, shared by the group's samples.
    log_ratio = _log_bon_ratio(torch.log(hi), torch.log(lo) - torch.log(hi), n)
    atom = torch.exp(log_ratio) * (hi - lo) * log_ratio / group_size
    kl = torch.where(group_size > 1, atom, stretch).sum(-1)
    return kl.reshape(ref_rewards.shape[:-1])


def bon_log_probs(ref_log_probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact log pi_BoN over a finite support, ties broken uniformly at random among the tied samples.

    `ref_log_probs` and `rewards` are 1-D over every element of the support; `ref_log_probs` is
    renormalised over it. Computed in float64 log space, so it stays finite and accurate for large n and
    tiny probabilities; n = 1 gives back pi_ref. Returns log-probabilities in the dtype of `ref_log_probs`.
    """
    _check_n(n)
    if ref_log_probs.dim() != 1 or ref_log_probs.shape != rewards.shape:
        raise ValueError(
            f"ref_log_probs and rewards must be 1-D of the same length, got {tuple(ref_log_probs.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    log_p = ref_log_probs.double()
    log_p = log_p - torch.logsumexp(log_p, 0)
    # Group the support by reward value: a tie group shares F_< and F_<=.
    values, group = torch.unique(rewards, sorted=True, return_inverse=True)
    num_groups = values.numel()
    # log of each group's mass, by a max-shifted scatter logsumexp (a group may have zero mass).
    group_max = torch.full((num_groups,), -math.inf, dtype=log_p.dtype, device=log_p.device)
    group_max = group_max.scatter_reduce(0, group, log_p, reduce="amax")
    shift = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))
    group_sum = torch.zeros_like(group_max).index_add(0, group, torch.exp(log_p - shift[group]))
    log_mass = torch.log(group_sum) + shift
    log_le = torch.logcumsumexp(log_mass, 0)  # log F_<= per group
    # Near the top F_<= is close to 1 and n * log F_<= magnifies its rounding; there 1 - F_> (the mass
    # above) keeps full relative accuracy, and the top group gets F_<= = 1 exactly.
    log_above = torch.cat(
        [torch.logcumsumexp(log_mass.flip(0), 0).flip(0)[1:], log_le.new_full((1,), -math.inf)]
    )
    log_le = torch.where(log_le > -math.log(2.0), _log1mexp(log_above), log_le)
    log_lt = torch.cat([log_le.new_full((1,), -math.inf), log_le[:-1]])  # log F_< per group
    # t = log(F_< / F_<=) = -log(1 + mass / F_<), from the group mass itself: a difference of the two
    # cumulative sums would lose a tiny group at the top to rounding.
    t = -torch.nn.functional.softplus(log_mass - log_lt)
    out = log_p + _log_bon_ratio(log_le, t, n)[group]
    # Zero-probability elements stay impossible (their group terms may be undefined).
    out = torch.where(torch.isneginf(log_p), log_p, out)
    return out.to(ref_log_probs.dtype)


def _sorted_refs(rewards: Tensor, ref_rewards: Tensor, presorted: bool) -> tuple[Tensor, Tensor, torch.Size]:
    """Validate shapes; return sorted references, rewards laid out for searchsorted, and the output shape."""
    if ref_rewards.dim() not in (1, 2) or ref_rewards.shape[-1] == 0:
        raise ValueError(f"ref_rewards must be [M] or [B, M] with M >= 1, got {tuple(ref_rewards.shape)}")
    dtype = torch.promote_types(rewards.dtype, ref_rewards.dtype)
    refs = ref_rewards.to(dtype) if presorted else torch.sort(ref_rewards.to(dtype), dim=-1).values
    values = rewards.to(dtype).contiguous()
    if ref_rewards.dim() == 1:
        return refs, values.reshape(-1), rewards.shape
    batch = ref_rewards.shape[0]
    if rewards.dim() not in (1, 2) or rewards.shape[0] != batch:
        raise ValueError(
            f"rewards must be [B] or [B, K] with B = {batch} rows of ref_rewards, got {tuple(rewards.shape)}"
        )
    return refs, values.reshape(batch, -1), rewards.shape


def _log_smoothed(counts: Tensor, num_refs: int, like: Tensor) -> Tensor:
    """log((1 + count) / (M + 1)) in the float dtype of `like` (at least float32)."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    work = torch.promote_types(dtype, torch.float32)
    return (torch.log1p(counts.to(work)) - math.log(num_refs + 1)).to(dtype)


def log_cdf(rewards: Tensor, ref_rewards: Tensor, *, presorted: bool = False) -> Tensor:
    """Smoothed empirical log F_hat(r) = log((1 + #{ref < r}) / (M + 1)), the paper's estimator of log F_<.

    `ref_rewards` is [M] (any shape of `rewards`) or [B, M], one row per prompt (`rewards` [B] or [B, K]).
    By sort + searchsorted, O((M + K) log M) per row. The result lies in [-log(M + 1), 0] and has the shape
    of `rewards`, in its float dtype. `presorted`: each row of `ref_rewards` is already ascending (the
    reference cache stores them so), which skips the sort.
    """
    refs, values, shape = _sorted_refs(rewards, ref_rewards, presorted)
    below = torch.searchsorted(refs, values, side="left")
    return _log_smoothed(below, refs.shape[-1], rewards).reshape(shape)


def log_cdf_ties(rewards: Tensor, ref_rewards: Tensor, *, presorted: bool = False) -> tuple[Tensor, Tensor]:
    """(log F_hat_<, log F_hat_<=), both add-one smoothed: log((1 + #{ref < r}) / (M + 1)) and the same
    with #{ref <= r}. Shapes and `presorted` as in `log_cdf`; the first is exactly `log_cdf`."""
    refs, values, shape = _sorted_refs(rewards, ref_rewards, presorted)
    below = torch.searchsorted(refs, values, side="left")
    at_or_below = torch.searchsorted(refs, values, side="right")
    num_refs = refs.shape[-1]
    return (
        _log_smoothed(below, num_refs, rewards).reshape(shape),
        _log_smoothed(at_or_below, num_refs, rewards).reshape(shape),
    )


def _below_every_reference(rewards: Tensor, ended_with_eos: Tensor | None) -> Tensor:
    """`rewards` with those of answers cut off before EOS (`ended_with_eos` False) at -inf."""
    if ended_with_eos is None:
        return rewards
    return torch.where(ended_with_eos.bool(), rewards, torch.full_like(rewards, -math.inf))


def log_cdf_of_answers(
    rewards: Tensor, ref_rewards: Tensor, ended_with_eos: Tensor | None, *, presorted: bool = False
) -> Tensor:
    """`log_cdf`, with answers cut off before EOS (`ended_with_eos` False, same shape as `rewards`) at its
    lowest value -log(M + 1), as `vbon_reward` credits them (None: every answer at its reward). The log F
    that training (train/log_F) and evaluation report."""
    return log_cdf(_below_every_reference(rewards, ended_with_eos), ref_rewards, presorted=presorted)


def vbon_reward(
    rewards: Tensor,
    ref_rewards: Tensor,
    n: int,
    estimator: str = "bound",
    ended_with_eos: Tensor | None = None,
    *,
    presorted: bool = False,
) -> Tensor:
    """Per-sample vBoN reward, to be maximised with KL coefficient beta = vbon_beta(n) = 1/(N-1).

    - "bound": log F_hat(r), the paper's estimator. Maximising E[log F] - KL/(N-1) minimises the upper
      bound KL(pi || pi_ref) - (N-1) E[log F] - log N on KL(pi || pi_BoN), using pi_BoN >= N F^(N-1) pi_ref.
    - "exact": 1/(N-1) * log(pi_BoN / pi_ref) with the tie-aware ratio built from the smoothed F_hat_< and
      F_hat_<= of `log_cdf_ties`, so the objective is -KL(pi || pi_BoN)/(N-1) itself (for the estimated F).
      It is >= bound + log(N)/(N-1), with equality when no reference reward ties r: then it only shifts
      the bound by a constant, and the two differ for rewards with ties (lexicons, pass/fail).
      Finite for every input, M = 1 and all-tied references included.
    With `ended_with_eos` (bool, the shape of `rewards`), an answer cut off before EOS gets the lowest value
    the estimator can take, as if its reward were below every reference reward: -log(M + 1) for "bound",
    -log(M + 1) + log(N)/(N-1) for "exact". (A fixed low raw reward would land mid-distribution among the
    reference rewards, and so would not be a penalty under log F.)
    Shapes and `presorted` as in `log_cdf`.
    """
    _check_n(n, minimum=2)
    if estimator == "bound":
        return log_cdf_of_answers(rewards, ref_rewards, ended_with_eos, presorted=presorted)
    rewards = _below_every_reference(rewards, ended_with_eos)
    if estimator != "exact":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    log_lt, log_le = log_cdf_ties(rewards, ref_rewards, presorted=presorted)
    return _log_bon_ratio(log_le, log_lt - log_le, n) / (n - 1)


def sorted_ref_rewards(ref_rewards: Tensor, n: int, extra: int) -> Tensor:
    """Sorted float64 reference rewards [B, M]; checks M >= n + extra."""
    _check_n(n)
    if ref_rewards.dim() not in (1, 2):
        raise ValueError(f"ref_rewards must be [M] or [B, M], got {tuple(ref_rewards.shape)}")
    num_refs = ref_rewards.shape[-1]
    if num_refs < n + extra:
        raise ValueError(
            f"ref_rewards needs M >= {n + extra} rewards per prompt for n = {n}, got M = {num_refs}"
        )
    return torch.sort(ref_rewards.double().reshape(-1, num_refs), dim=-1).values


def log_binom(top: Tensor, k: int) -> Tensor:
    """log C(top, k) for float64 tensors `top`, -inf where top < k."""
    safe = top.clamp_min(k)
    out = torch.lgamma(safe + 1) - math.lgamma(k + 1) - torch.lgamma(safe - k + 1)
    return torch.where(top >= k, out, torch.full_like(out, -math.inf))


def expected_bon_reward(ref_rewards: Tensor, n: int) -> Tensor:
    """Unbiased estimate of E[max of N reference rewards] from M >= N cached rewards per prompt.

    The average of the max over all C(M, N) subsets: sum_i C(i-1, N-1) / C(M, N) * r_(i) over the sorted
    rewards r_(1) <= ... <= r_(M). `ref_rewards` [M] -> scalar, [B, M] -> [B]; float64.
    """
    refs = sorted_ref_rewards(ref_rewards, n, extra=0)
    num_refs = refs.shape[-1]
    rank = torch.arange(1, num_refs + 1, dtype=refs.dtype, device=refs.device)
    weights = torch.exp(log_binom(rank - 1, n - 1) - log_binom(rank.new_tensor(num_refs), n))
    return (refs * weights).sum(-1).reshape(ref_rewards.shape[:-1])


def bon_win_rate(ref_rewards: Tensor, n: int) -> Tensor:
    """Unbiased estimate of P(BoN(N) sample beats one reference sample), ties counting half.

    The average over every choice of one cached reward as the opponent and N of the other M - 1 as the
    BoN draw, so M >= N + 1. For opponent v: 1 - (C(#others <= v, N) + C(#others < v, N)) / (2 C(M-1, N)).
    Equals N / (N + 1) when no rewards tie. `ref_rewards` [M] -> scalar, [B, M] -> [B]; float64.
    """
    refs = sorted_ref_rewards(ref_rewards, n, extra=1)
    num_refs = refs.shape[-1]
    below = torch.searchsorted(refs, refs, side="left").double()
    others_at_or_below = torch.searchsorted(refs, refs, side="right").double() - 1
    # P(max of N others <= v) and P(max of N others < v): the share of N-subsets of the M - 1 others.
    log_total = log_binom(refs.new_tensor(num_refs - 1), n)
    max_at_most = torch.exp(log_binom(others_at_or_below, n) - log_total)
    max_below = torch.exp(log_binom(below, n) - log_total)
    return (1 - (max_at_most + max_below) / 2).mean(-1).reshape(ref_rewards.shape[:-1])
