"""core/frontier.py against brute force in float64: standard errors, win rate vs BoN(n), BoN under another
reward, the Pareto front."""

import itertools
import math
import statistics

import pytest
import torch

from vbon_ds.core.bon import bon_win_rate, expected_bon_reward
from vbon_ds.core.frontier import expected_bon_other_reward, mean_and_se, pareto_front, win_rate_vs_bon


def test_mean_and_se_is_over_prompt_means():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 10.0]])
    prompt_means = [2.0, 2.0, 5.0]
    mean, se = mean_and_se(values)
    assert mean == pytest.approx(statistics.fmean(prompt_means), abs=1e-12)
    assert se == pytest.approx(statistics.stdev(prompt_means) / math.sqrt(3), abs=1e-12)
    assert mean_and_se(torch.tensor([4.0, 6.0])) == pytest.approx((5.0, 1.0))
    assert math.isnan(mean_and_se(torch.tensor([[1.0, 2.0]]))[1])


def brute_win_rate(r: float, refs: list[float], n: int) -> float:
    """Average over every n-subset of refs of 1 (r beats its max), 1/2 (tie) or 0."""
    outcomes = [1.0 if r > max(s) else 0.5 if r == max(s) else 0.0 for s in itertools.combinations(refs, n)]
    return statistics.fmean(outcomes)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_win_rate_vs_bon_matches_enumeration(seed, n):
    gen = torch.Generator().manual_seed(seed)
    refs = torch.randint(0, 5, (3, 7), generator=gen).double()  # heavy ties
    rewards = torch.randint(-1, 6, (3, 4), generator=gen).double()
    got = win_rate_vs_bon(rewards, refs, n)
    assert got.shape == rewards.shape and got.dtype == torch.float64
    for b in range(3):
        for k in range(4):
            expected = brute_win_rate(rewards[b, k].item(), refs[b].tolist(), n)
            assert got[b, k].item() == pytest.approx(expected, abs=1e-12)


def test_win_rate_vs_bon_of_one_is_the_win_rate_against_one_reference_answer():
    refs = torch.tensor([[0.1, 0.5, 0.5, 0.9]])
    rewards = torch.tensor([0.5])
    assert win_rate_vs_bon(rewards, refs, 1).item() == pytest.approx((1 + 0.5 * 2) / 4)
    with pytest.raises(ValueError, match="M >= 5"):
        win_rate_vs_bon(rewards, refs, 5)


def test_a_reference_answer_against_bon_is_the_complement_of_bon_win_rate():
    # What the evaluation's reference row reports: one cached answer against BoN(n) of the other M - 1.
    refs = torch.randint(0, 4, (9,), generator=torch.Generator().manual_seed(0)).double().tolist()
    n = 3
    brute = statistics.fmean(brute_win_rate(r, refs[:i] + refs[i + 1 :], n) for i, r in enumerate(refs))
    assert 1 - bon_win_rate(torch.tensor(refs), n).item() == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_expected_bon_other_reward_matches_enumeration_with_uniform_tie_break(n):
    gen = torch.Generator().manual_seed(n)
    select = torch.randint(0, 3, (2, 6), generator=gen).double()  # ties in the selecting reward
    other = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    got = expected_bon_other_reward(select, other, n)
    for b in range(2):
        per_subset = []
        for subset in itertools.combinations(range(6), n):
            best = max(select[b, i].item() for i in subset)
            tied = [i for i in subset if select[b, i].item() == best]
            per_subset.append(statistics.fmean(other[b, i].item() for i in tied))
        assert got[b].item() == pytest.approx(statistics.fmean(per_subset), abs=1e-12)
    # Scored by the selecting reward itself it is the ordinary BoN reward estimate.
    assert torch.allclose(expected_bon_other_reward(select, select, n), expected_bon_reward(select, n))


def test_pareto_front_maximises_reward_and_minimises_kl():
    rewards = [0.1, 0.5, 0.4, 0.5, 0.9, 0.9, 0.2]
    kls = [0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 0.0]
    #  (0.1, 0) is dominated by (0.2, 0); (0.4, 1) by (0.5, 1); (0.5, 2) by (0.5, 1); equal points both stay
    assert pareto_front(rewards, kls) == [False, True, False, False, True, True, True]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1.0], [])
