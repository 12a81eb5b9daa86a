"""core/frontier.py against brute force and hand computations in float64: standard errors, paired
differences, dominance outside one standard error, the front and its counts per method, win rate vs
BoN(n), BoN under another reward; and the report's front marking and caption."""

import itertools
import math
import statistics

import pytest
import torch

from vbon_ds.core.bon import bon_win_rate, expected_bon_reward
from vbon_ds.core.frontier import (
    DOMINANCE_RULE,
    Point,
    dominates,
    expected_bon_other_reward,
    front_counts,
    kl_difference,
    mean_and_se,
    paired_difference,
    reward_difference,
    significant_front,
    win_rate_vs_bon,
)
from vbon_ds.jobs.report import EvalRow, mark_front, markdown_report


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


def test_paired_difference_is_over_per_prompt_differences_matched_by_prompt_id():
    a = {"p1": 1.0, "p2": 3.0, "p3": 2.0}
    b = {"p3": 2.5, "p1": 0.5, "p2": 2.0}  # another order: pairs by id
    # differences 0.5, 1.0, -0.5: mean 1/3; deviations 1/6, 2/3, -5/6, sample variance 7/12, SE sqrt(7)/6
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(1 / 3, abs=1e-15)
    assert se == pytest.approx(math.sqrt(7) / 6, abs=1e-15)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, {"p1": 1.0})


def point(rewards: list[float], kls: list[float]) -> Point:
    """A point measured on prompts p0, p1, ...: its means and SEs, and the per-prompt values."""
    ids = [f"p{i}" for i in range(len(rewards))]
    reward, reward_se = statistics.fmean(rewards), statistics.stdev(rewards) / math.sqrt(len(rewards))
    kl, kl_se = statistics.fmean(kls), statistics.stdev(kls) / math.sqrt(len(kls))
    by_id = dict(zip(ids, rewards, strict=True)), dict(zip(ids, kls, strict=True))
    return Point(reward, kl, reward_se, kl_se, *by_id)


def test_dominance_is_paired_when_both_points_share_their_prompts():
    better = point([1.1, 2.1, 3.1], [0.1, 0.2, 0.3])
    worse = point([1.0, 2.0, 3.0], [0.3, 0.4, 0.5])
    # Paired: +0.1 reward and -0.2 KL on every prompt, SE 0: a dominance far outside one SE.
    assert reward_difference(better, worse) == pytest.approx((0.1, 0.0), abs=1e-12)
    assert kl_difference(worse, better) == pytest.approx((0.2, 0.0), abs=1e-12)
    assert dominates(better, worse) and not dominates(worse, better)
    # The same means without per-prompt values: unpaired SE sqrt(SE_A^2 + SE_B^2) = sqrt(2/3) > 0.1.
    unpaired = [Point(p.reward, p.kl, p.reward_se, p.kl_se) for p in (better, worse)]
    gain, se = reward_difference(*unpaired)
    assert (gain, se) == pytest.approx((0.1, math.sqrt(2 / 3)), abs=1e-12)
    assert not dominates(*unpaired)


def test_a_dominance_within_one_standard_error_does_not_count():
    base = point([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    # reward differences 0.3, -0.1, 0.1: mean 0.1, SE 0.2 / sqrt(3) = 0.115 > 0.1
    close = point([1.3, 0.9, 1.1], [0.1, 0.1, 0.1])
    assert reward_difference(close, base) == pytest.approx((0.1, 0.2 / math.sqrt(3)), abs=1e-12)
    assert not dominates(close, base)
    # the same reward gain with KL differences inside one SE: no dominance either
    assert not dominates(point([1.1, 1.1, 1.1], [0.9, 0.1, 0.5]), base)
    # one prompt: no SE, nothing counts
    one = Point(2.0, 0.0, float("nan"), float("nan"), {"p": 2.0}, {"p": 0.0})
    assert not dominates(one, Point(1.0, 1.0, float("nan"), float("nan"), {"p": 1.0}, {"p": 1.0}))
    # rows without standard errors: strict in both, equal points both stay
    assert dominates(Point(1.0, 0.0), Point(0.5, 1.0)) and not dominates(Point(1.0, 0.0), Point(1.0, 1.0))
    assert "r_A - r_B > SE(r_A - r_B) and KL_B - KL_A > SE(KL_B - KL_A)" in DOMINANCE_RULE


def test_significant_front_keeps_every_point_no_other_dominates():
    reference = point([0.1, 0.2, 0.3], [0.0, 0.0, 0.0])
    bon = point([0.6, 0.7, 0.8], [0.4, 0.5, 0.6])
    drifted = point([0.0, 0.2, 0.2], [1.0, 1.2, 1.1])  # worse reward than the reference: dominated by both
    noisy = point([0.9, 0.1, 0.5], [0.6, 0.6, 0.5])  # reward 0.5 vs BoN's 0.7 within its SE: stays
    assert significant_front([reference, bon, drifted, noisy]) == [True, True, False, True]
    assert significant_front([Point(1.0, 1.0), Point(1.0, 1.0)]) == [True, True]
    assert significant_front([]) == []


def test_front_counts_per_method_in_order_of_appearance():
    counts = front_counts(["vBoN", "KL-RL", "vBoN", "DPO", "KL-RL"], [True, False, False, True, False])
    assert counts == {"vBoN": (1, 2), "KL-RL": (0, 2), "DPO": (1, 1)}
    assert list(counts) == ["vBoN", "KL-RL", "DPO"]
    with pytest.raises(ValueError):
        front_counts(["a"], [])


def eval_row(method: str, temperature: float | None, rewards: list[float], kls: list[float], **kw) -> EvalRow:
    """A report row measured on prompts p0, p1, ... with the means and SEs of the per-prompt values."""
    ids = [f"p{i}" for i in range(len(rewards))]
    return EvalRow(
        method,
        temperature,
        reward=statistics.fmean(rewards),
        kl=statistics.fmean(kls),
        win_rate=0.5,
        reward_se=statistics.stdev(rewards) / math.sqrt(len(rewards)),
        kl_se=statistics.stdev(kls) / math.sqrt(len(kls)),
        bon_n=2,
        prompt_ids=ids,
        per_prompt={"reward": rewards, "kl": kls},
        **kw,
    )


def test_the_report_marks_the_front_by_the_paired_rule_and_states_it():
    rows = [
        eval_row("reference", None, [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]),
        eval_row("BoN(2)", None, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4], kl_bound=0.307),
        eval_row("dominated", 1.0, [0.3, 0.4, 0.5], [0.5, 0.6, 0.7]),  # BoN(2): +0.1 reward, -0.3 KL each
        eval_row("noisy", 1.0, [0.9, 0.1, 0.2], [0.5, 0.6, 0.7]),  # its reward -0.1 +- 0.27 vs BoN(2)'s
    ]
    assert [row.on_front for row in mark_front(rows)] == [True, True, False, True]
    report = markdown_report(rows)
    assert DOMINANCE_RULE in report
    # paired against BoN(2): "dominated" is -0.1 reward (SE 0) and +0.3 KL (SE 0) on every prompt
    assert "| dominated | 1 | -0.1000 ± 0.0000 | 0.300 ± 0.000 |" in report
    # "noisy": reward differences 0.5, -0.4, -0.4: mean -0.1, SE 0.3
    assert "| noisy | 1 | -0.1000 ± 0.3000 | 0.300 ± 0.000 |" in report


def test_the_front_is_taken_on_the_evaluation_reward_when_rows_have_one():
    rows = [
        eval_row("reference", None, [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]),
        eval_row("policy", 1.0, [0.5, 0.6, 0.7], [0.1, 0.2, 0.3]),
    ]
    assert [row.on_front for row in mark_front(rows)] == [True, True]  # more training reward, more KL
    rows[0].eval_reward, rows[0].per_prompt["eval_reward"] = 1.0, [1.0, 1.0, 1.0]
    rows[1].eval_reward, rows[1].per_prompt["eval_reward"] = 0.5, [0.4, 0.5, 0.6]
    assert [row.on_front for row in mark_front(rows)] == [True, False]  # less evaluation reward, more KL
    assert "on the Pareto front of evaluation reward against KL" in markdown_report(rows)
