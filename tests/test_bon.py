"""Exact tests of the BoN math against high-precision and brute-force references."""

import itertools
import math

import mpmath
import pytest
import torch

from vbon_ds.core.bon import (
    bon_kl_bound,
    bon_kl_from_samples,
    bon_log_probs,
    bon_win_rate,
    expected_bon_reward,
    log_cdf,
    log_cdf_ties,
    vbon_beta,
    vbon_reward,
)


def _mp_bon_log_probs(probs: list, rewards: list, n: int) -> list[float]:
    """log pi_BoN straight from the definition, in 400-digit arithmetic (enough to subtract 1e-300)."""
    with mpmath.workdps(400):
        probs = [mpmath.mpf(p) for p in probs]
        total = mpmath.fsum(probs)
        probs = [p / total for p in probs]
        out = []
        for p, r in zip(probs, rewards, strict=True):
            below = mpmath.fsum(q for q, s in zip(probs, rewards, strict=True) if s < r)
            tied = mpmath.fsum(q for q, s in zip(probs, rewards, strict=True) if s == r)
            out.append(float(mpmath.log(p * ((below + tied) ** n - below**n) / tied)))
        return out


def _random_support(size: int, num_values: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(2 * torch.randn(size, generator=gen, dtype=torch.float64), 0)
    if num_values is None:
        return log_p, torch.randn(size, generator=gen, dtype=torch.float64)
    return log_p, torch.randint(num_values, (size,), generator=gen).double()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 100_000])
@pytest.mark.parametrize("num_values", [None, 3])
def test_bon_log_probs_matches_high_precision_definition(n, num_values):
    log_p, rewards = _random_support(12, num_values, seed=n)
    got = bon_log_probs(log_p, rewards, n)
    want = torch.tensor(
        _mp_bon_log_probs(torch.exp(log_p).tolist(), rewards.tolist(), n), dtype=torch.float64
    )
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-9)
    assert torch.logsumexp(got, 0).item() == pytest.approx(0.0, abs=1e-13)


@pytest.mark.parametrize("n", [2, 1000, 100_000])
def test_bon_log_probs_tiny_probabilities(n):
    # Tiny masses at the top, bottom and inside a tie group; float64 log space must keep all of them.
    probs = ["1e-300", "0.3", "1e-250", "0.7", "1e-300", "1e-200"]
    rewards = [5.0, 1.0, 2.0, 2.0, 0.0, 6.0]
    log_p = torch.tensor([math.log(float(p)) for p in probs], dtype=torch.float64)
    got = bon_log_probs(log_p, torch.tensor(rewards), n)
    want = torch.tensor(_mp_bon_log_probs([mpmath.mpf(p) for p in probs], rewards, n), dtype=torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_bon_log_probs_n1_is_reference_and_keeps_dtype():
    log_p, rewards = _random_support(50, 5, seed=0)
    unnormalised = (log_p + 3.0).float()
    got = bon_log_probs(unnormalised, rewards, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, log_p.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bon_log_probs(log_p, rewards, 1), log_p, rtol=0, atol=1e-14)


def test_bon_log_probs_zero_probability_elements_stay_impossible():
    log_p = torch.tensor([-math.inf, math.log(0.5), -math.inf, math.log(0.5)], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0])
    got = bon_log_probs(log_p, rewards, 3)
    assert torch.isneginf(got[[0, 2]]).all()
    torch.testing.assert_close(torch.exp(got[[1, 3]]), torch.tensor([0.125, 0.875], dtype=torch.float64))


def test_bon_log_probs_matches_monte_carlo_with_ties():
    # Simulate BoN: N draws from pi_ref, keep the best, break ties uniformly among the tied draws.
    probs = torch.tensor([0.05, 0.15, 0.2, 0.1, 0.3, 0.2], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    n, trials = 3, 400_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs, trials * n, replacement=True, generator=gen).reshape(trials, n)
    keys = rewards[draws] + 0.5 * torch.rand(trials, n, generator=gen, dtype=torch.float64)
    winners = draws.gather(1, keys.argmax(1, keepdim=True)).squeeze(1)
    freq = torch.bincount(winners, minlength=len(probs)).double() / trials
    exact = torch.exp(bon_log_probs(torch.log(probs), rewards, n))
    sigma = torch.sqrt(exact * (1 - exact) / trials)
    assert (freq - exact).abs().max() < 5 * sigma.max()
    # The two tie partners share their group's BoN mass in proportion to pi_ref.
    assert exact[2] / exact[1] == pytest.approx(0.2 / 0.15, rel=1e-12)


@pytest.mark.parametrize("n", [2, 4, 16, 100])
@pytest.mark.parametrize("num_values", [None, 4])
def test_bon_kl_respects_bound(n, num_values):
    log_p, rewards = _random_support(200, num_values, seed=1)
    log_bon = bon_log_probs(log_p, rewards, n)
    kl = (torch.exp(log_bon) * (log_bon - log_p)).sum().item()
    assert 0 < kl <= bon_kl_bound(n) + 1e-12


def test_bon_kl_bound_is_tight_without_ties_on_a_fine_support():
    size, n = 20_000, 8
    log_p = torch.full((size,), -math.log(size), dtype=torch.float64)
    log_bon = bon_log_probs(log_p, torch.arange(size, dtype=torch.float64), n)
    kl = (torch.exp(log_bon) * (log_bon - log_p)).sum().item()
    assert kl == pytest.approx(bon_kl_bound(n), abs=1e-3)
    assert bon_kl_bound(1) == 0.0


def _refined_discrete_bon_kl(rewards: list[float], n: int, pieces: int) -> float:
    """KL of the discrete BoN (bon_log_probs) over M samples of mass 1/M each, where every sample whose
    reward no other sample shares is split into `pieces` distinct values: tends, as pieces grows, to the
    KL with tie-free stretches that bon_kl_from_samples computes in closed form."""
    counts = {r: rewards.count(r) for r in rewards}
    support, log_p = [], []
    for r in rewards:
        parts = pieces if counts[r] == 1 else 1
        support += [r + k * 1e-6 for k in range(parts)]  # rewards here are >= 1e-3 apart
        log_p += [-math.log(len(rewards) * parts)] * parts
    log_p = torch.tensor(log_p, dtype=torch.float64)
    log_bon = bon_log_probs(log_p, torch.tensor(support, dtype=torch.float64), n)
    return (torch.exp(log_bon) * (log_bon - log_p)).sum().item()


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_bon_kl_from_samples_is_the_bound_without_ties_and_below_it_with_ties(n):
    distinct = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kl = bon_kl_from_samples(distinct, n)
    assert kl.shape == (3,) and kl.dtype == torch.float64
    torch.testing.assert_close(kl, torch.full((3,), bon_kl_bound(n), dtype=torch.float64), rtol=0, atol=1e-12)
    # VADER-like: many answers score exactly 0, and some share the top score.
    tie_heavy = torch.tensor([[0.0] * 8 + [0.1, 0.2, 0.3, 0.4] + [0.5] * 4], dtype=torch.float64)
    if n > 1:
        assert bon_kl_from_samples(tie_heavy, n).item() < bon_kl_bound(n) - 1e-3
    assert bon_kl_from_samples(torch.full((16,), 0.3), n).item() == 0.0  # every answer ties: BoN = ref


@pytest.mark.parametrize("n", [2, 4, 8])
def test_bon_kl_from_samples_against_the_tie_aware_distribution(n):
    rewards = [0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.6, 0.7]
    got = bon_kl_from_samples(torch.tensor(rewards), n).item()
    # Every tie group an atom, each singleton a stretch: the refined discrete KL converges to it.
    refined = [_refined_discrete_bon_kl(rewards, n, pieces) for pieces in (1, 100, 1000)]
    assert abs(refined[2] - got) < abs(refined[1] - got) < abs(refined[0] - got)
    assert got == pytest.approx(refined[2], abs=1e-3)


def test_bon_kl_from_samples_by_hand_in_float64():
    # M = 4 rewards: an atom [0, 1/2] (two tied at 0) and two stretches [1/2, 3/4], [3/4, 1]; N = 3.
    # Atom: BoN mass (1/2)^3 = 1/8 at ratio (1/8) / (1/2) = 1/4. Stretch [a, b]: with w = u^3,
    # G(w) = w log 3 + (2/3)(w log w - w) between a^3 and b^3.
    def g(w: float) -> float:
        return w * math.log(3) + 2 / 3 * ((w * math.log(w) if w > 0 else 0.0) - w)

    by_hand = 1 / 8 * math.log(1 / 4) + (g(27 / 64) - g(1 / 8)) + (g(1.0) - g(27 / 64))
    got = bon_kl_from_samples(torch.tensor([0.0, 5.0, 0.0, 7.0]), 3).item()
    assert got == pytest.approx(by_hand, abs=1e-12)
    assert 0 < got < bon_kl_bound(3)


def test_bad_n_and_shapes_raise_naming_the_argument():
    log_p, rewards = _random_support(5, None, seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            bon_log_probs(log_p, rewards, bad)
    with pytest.raises(ValueError, match="ref_log_probs and rewards"):
        bon_log_probs(log_p, rewards[:4], 2)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        vbon_beta(1)
    assert vbon_beta(5) == 0.25


def _count_log_cdf(rewards: torch.Tensor, refs: torch.Tensor, strict: bool) -> torch.Tensor:
    """Direct O(K * M) count reference for a 1-D row."""
    pairs = refs.unsqueeze(0), rewards.unsqueeze(1)
    below = torch.lt(*pairs) if strict else torch.le(*pairs)
    return torch.log((1.0 + below.sum(1).double()) / (refs.numel() + 1))


REFS = torch.tensor([3.0, -1.0, 2.0, 2.0, 0.5, 2.0, 7.0])  # unsorted, with a triple tie
PROBES = torch.tensor([-5.0, -1.0, 0.0, 2.0, 2.5, 7.0, 9.0])  # outside, on, between and tied


def test_log_cdf_matches_direct_count_1d():
    got = log_cdf(PROBES, REFS)
    torch.testing.assert_close(got.double(), _count_log_cdf(PROBES, REFS, strict=True), rtol=0, atol=1e-6)
    assert got[0].item() == pytest.approx(-math.log(8), abs=1e-6)  # below every reference
    assert got[-1].item() == pytest.approx(0.0, abs=1e-6)  # above every reference
    lt, le = log_cdf_ties(PROBES.double(), REFS.double())
    torch.testing.assert_close(lt, _count_log_cdf(PROBES, REFS, strict=True))
    torch.testing.assert_close(le, _count_log_cdf(PROBES, REFS, strict=False))


def test_log_cdf_batched_shapes_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    refs = torch.randint(5, (3, 9), generator=gen).double()  # integer-valued: plenty of ties
    rewards = torch.randint(-1, 7, (3, 4), generator=gen).double()
    want = torch.stack([_count_log_cdf(rewards[b], refs[b], strict=True) for b in range(3)])
    torch.testing.assert_close(log_cdf(rewards, refs), want)
    torch.testing.assert_close(log_cdf(rewards[:, 0], refs), want[:, 0])
    assert log_cdf(rewards.T.contiguous().T, refs).shape == (3, 4)  # non-contiguous rewards
    assert log_cdf(rewards.float(), refs.float()).dtype == torch.float32
    assert log_cdf(rewards.bfloat16(), refs).dtype == torch.bfloat16
    scalar = log_cdf(torch.tensor(2.0, dtype=torch.float64), refs[0])
    assert scalar.shape == ()
    torch.testing.assert_close(scalar, _count_log_cdf(torch.tensor([2.0]), refs[0], strict=True)[0])


def test_log_cdf_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="rewards must be"):
        log_cdf(torch.zeros(4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="ref_rewards must be"):
        log_cdf(torch.zeros(4), torch.zeros(0))
    with pytest.raises(ValueError, match="ref_rewards must be"):
        log_cdf(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))


def test_vbon_reward_bound_is_log_cdf():
    torch.testing.assert_close(vbon_reward(PROBES, REFS, 4, "bound"), log_cdf(PROBES, REFS))
    with pytest.raises(ValueError, match="estimator must be"):
        vbon_reward(PROBES, REFS, 4, "tight")


@pytest.mark.parametrize("n", [2, 5, 64])
def test_vbon_exact_is_bon_log_ratio_of_the_smoothed_population(n):
    # The smoothed F_hat is the CDF of the M references plus one pseudo-sample below all of them, each
    # with mass 1/(M+1). For rewards in that population, the exact reward is log(pi_BoN/pi_ref)/(N-1) there.
    refs = REFS.double()
    support = torch.cat([refs, refs.min().reshape(1) - 1])
    uniform = torch.full_like(support, -math.log(support.numel()))
    want = (bon_log_probs(uniform, support, n) - uniform)[:-1] / (n - 1)
    torch.testing.assert_close(vbon_reward(refs, refs, n, "exact"), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 16])
def test_vbon_exact_direct_formula_and_relation_to_bound(n):
    lt, le = log_cdf_ties(PROBES.double(), REFS.double())
    a, b = torch.exp(lt), torch.exp(le)
    ratio = torch.where(a < b, (b**n - a**n) / (b - a), n * a ** (n - 1))
    got = vbon_reward(PROBES.double(), REFS.double(), n, "exact")
    torch.testing.assert_close(got, torch.log(ratio) / (n - 1))
    gap = got - vbon_reward(PROBES.double(), REFS.double(), n, "bound") - math.log(n) / (n - 1)
    tied = torch.isin(PROBES, REFS)
    assert (gap[tied] > 1e-6).all()
    torch.testing.assert_close(gap[~tied], torch.zeros_like(gap[~tied]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2, 8])
def test_vbon_reward_gives_cut_off_answers_the_lowest_value(n):
    # The cache holds cut-off reference answers at a fixed score (-1 here) among the others; a cut-off
    # answer must still get the minimum of each estimator, not the F_hat of that fixed score.
    refs = torch.tensor([[-3.0, -1.0, -1.0, 0.5, 2.0], [-1.0, 0.0, 1.0, 1.0, 4.0]], dtype=torch.float64)
    m = refs.shape[1]
    scores = torch.tensor([[-1.0, 3.0], [-1.0, 5.0]], dtype=torch.float64)
    ended = torch.tensor([[False, True], [False, False]])
    bound = vbon_reward(scores, refs, n, "bound", ended_with_eos=ended)
    exact = vbon_reward(scores, refs, n, "exact", ended_with_eos=ended)
    lowest = -math.log(m + 1)
    torch.testing.assert_close(bound[~ended], torch.full((3,), lowest, dtype=torch.float64))
    torch.testing.assert_close(
        exact[~ended], torch.full((3,), lowest + math.log(n) / (n - 1), dtype=torch.float64)
    )
    # Answers that ended with EOS keep their reward, and nothing any answer can score is lower.
    assert bound[0, 1] == 0.0 and exact[0, 1] == vbon_reward(scores, refs, n, "exact")[0, 1]
    probes = torch.linspace(-10, 10, 41, dtype=torch.float64).expand(2, -1)
    assert vbon_reward(probes, refs, n, "bound").min() >= lowest
    assert vbon_reward(probes, refs, n, "exact").min() >= lowest + math.log(n) / (n - 1) - 1e-12
    # Without the flag a cut-off answer scored -1 sits mid-distribution: above the bottom of F_hat.
    assert vbon_reward(scores, refs, n, "bound")[0, 0] > lowest


@pytest.mark.parametrize(
    "refs",
    [torch.tensor([1.0]), torch.tensor([2.0, 2.0, 2.0]), torch.tensor([-1e30, 0.0, 1e30])],
    ids=["M=1", "all-tied", "extreme"],
)
def test_vbon_exact_is_finite_everywhere(refs):
    probes = torch.cat([refs, torch.tensor([-math.inf, -1e38, 0.0, 2.0, 1e38, math.inf])])
    for n in (2, 10, 100_000):
        assert torch.isfinite(vbon_reward(probes, refs, n, "exact")).all()


def test_expected_bon_reward_is_the_average_over_all_subsets():
    refs = torch.tensor([0.3, 1.0, -2.0, 1.0, 5.0, 0.0, 1.0, 2.5], dtype=torch.float64)
    for n in (1, 3, 8):
        subsets = [max(s) for s in itertools.combinations(refs.tolist(), n)]
        assert expected_bon_reward(refs, n).item() == pytest.approx(sum(subsets) / len(subsets), rel=1e-12)
    batched = torch.stack([refs, -refs])
    torch.testing.assert_close(
        expected_bon_reward(batched, 3),
        torch.stack([expected_bon_reward(refs, 3), expected_bon_reward(-refs, 3)]),
    )
    with pytest.raises(ValueError, match="ref_rewards needs M >= 9"):
        expected_bon_reward(refs, 9)


def test_bon_win_rate_is_the_average_over_opponent_and_subsets():
    refs = [0.3, 1.0, -2.0, 1.0, 5.0, 1.0, 2.5]  # a triple tie
    for n in (1, 2, 4, 6):
        wins = []
        for j, opponent in enumerate(refs):
            others = refs[:j] + refs[j + 1 :]
            for subset in itertools.combinations(others, n):
                wins.append(1.0 if max(subset) > opponent else 0.5 if max(subset) == opponent else 0.0)
        assert bon_win_rate(torch.tensor(refs), n).item() == pytest.approx(sum(wins) / len(wins), rel=1e-12)
    distinct = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bon_win_rate(distinct, 7), torch.full((3,), 7 / 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="ref_rewards needs M >= 8"):
        bon_win_rate(distinct[:, :7], 7)


def test_cached_estimators_agree_with_the_exact_bon_distribution():
    # Population facts from bon_log_probs; estimators from a large cache sampled from the same population.
    log_p, rewards = _random_support(30, 6, seed=3)
    n, num_refs = 4, 200_000
    probs = torch.exp(log_p)
    bon = torch.exp(bon_log_probs(log_p, rewards, n))
    below = torch.stack([probs[rewards < r].sum() for r in rewards])
    tied = torch.stack([probs[rewards == r].sum() for r in rewards])
    cache = rewards[
        torch.multinomial(probs, num_refs, replacement=True, generator=torch.Generator().manual_seed(0))
    ]
    assert expected_bon_reward(cache, n).item() == pytest.approx((bon * rewards).sum().item(), abs=0.01)
    win = (bon * (below + tied / 2)).sum().item()
    assert bon_win_rate(cache, n).item() == pytest.approx(win, abs=0.005)
    assert win < n / (n + 1)  # ties cost BoN some wins


def test_train_objective_reward_applies_the_missing_eos_rule_per_objective():
    from vbon_ds.algorithms.onpolicy import objective_reward
    from vbon_ds.config import load_config

    refs = torch.tensor([[-2.0, -1.0, 0.0, 1.0], [-3.0, -1.0, 2.0, 5.0]])
    scores = torch.tensor([-1.0, 3.0])  # the first answer was cut off and carries missing_eos_score = -1
    ended = torch.tensor([False, True])

    def reward(*overrides: str) -> torch.Tensor:
        cfg = load_config(None, ["vbon.n=4", *overrides])
        return objective_reward(cfg, scores, refs, ended)

    kl_rl = reward("vbon.objective=kl_rl", "vbon.beta=0.1", "reward.missing_eos_score=-1")
    assert kl_rl.tolist() == [-1.0, 3.0]
    lowest = -math.log(5)
    torch.testing.assert_close(reward("reward.missing_eos_score=-1"), torch.tensor([lowest, math.log(4 / 5)]))
    exact = reward("vbon.objective=vbon_exact", "reward.missing_eos_score=-1")
    assert math.isclose(exact[0].item(), lowest + math.log(4) / 3, rel_tol=1e-6)
    # Without missing_eos_score no answer is treated specially: -1 ties a cached reward (F_hat = 2/5).
    torch.testing.assert_close(reward()[0], torch.tensor(math.log(2 / 5)))


def test_train_log_f_puts_cut_off_answers_at_the_bottom_under_every_vbon_objective():
    # train/log_F is the mean of Scores.log_f: an answer cut off before EOS (scored missing_eos_score = -1,
    # mid-distribution here) must count at -log(M + 1), as the vbon reward credits it.
    from vbon_ds.algorithms.onpolicy import score
    from vbon_ds.config import load_config

    refs = torch.tensor([[-2.0, -1.0, 0.0, 1.0], [-3.0, -1.0, 2.0, 5.0]])
    rewards, ended = torch.tensor([-1.0, 3.0]), torch.tensor([False, True])
    for objective in ("vbon", "vbon_exact"):
        cfg = load_config(None, ["vbon.n=4", f"vbon.objective={objective}", "reward.missing_eos_score=-1"])
        log_f = score(cfg, rewards, refs, ["a", "b"], ended).log_f
        torch.testing.assert_close(log_f, torch.tensor([-math.log(5), math.log(4 / 5)]))
    # Without missing_eos_score a cut-off answer keeps its reward's log F (-1 ties a cached reward).
    cfg = load_config(None, ["vbon.n=4", "vbon.objective=vbon_exact"])
    assert score(cfg, rewards, refs, ["a", "b"], ended).log_f[0].item() == pytest.approx(math.log(2 / 5))
