"""Each loss against a hand-computed case or a plain reference loop; padding must change nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from vbon_ds.config import AlgoConfig
from vbon_ds.core.losses import (
    bonbon_loss,
    dpo_loss,
    gae,
    ipo_loss,
    ipo_target_beta,
    kl_penalty,
    last_token_mask,
    leave_one_out,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_advantages,
    ppo_policy_loss,
    rloo_advantages,
    sft_nll,
    shape_rewards,
    value_loss,
    whiten,
)

NAN = math.nan
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second response is one token shorter


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_masked_reductions_ignore_garbage_padding():
    x = _t([[1.0, 2.0, 3.0], [4.0, 6.0, NAN]])
    assert masked_sum(x, MASK).item() == 16.0
    assert masked_mean(x, MASK).item() == 16.0 / 5
    torch.testing.assert_close(masked_mean(x, MASK, dim=1), _t([2.0, 5.0]))
    assert masked_mean(x, torch.zeros_like(MASK)).item() == 0.0


def test_masked_whiten_hand_case():
    x = _t([[1.0, 2.0, 3.0], [2.0, 2.0, math.inf]])
    # valid values 1, 2, 3, 2, 2: mean 2, population variance 2/5
    std = math.sqrt(0.4)
    want = _t([[-1 / std, 0.0, 1 / std], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, MASK, eps=0.0), want)
    torch.testing.assert_close(masked_whiten(x, MASK, shift_mean=False, eps=0.0), (want + 2) * MASK)


def test_kl_penalty_is_k1_and_unbiased():
    logp, ref = _t([math.log(0.5)]), _t([math.log(0.25)])
    assert kl_penalty(logp, ref).item() == pytest.approx(math.log(2))
    pi, q = _t([0.1, 0.6, 0.3]), _t([0.3, 0.3, 0.4])
    kl = (pi * (pi / q).log()).sum()
    torch.testing.assert_close((pi * kl_penalty(pi.log(), q.log())).sum(), kl)


def _reward_policy_gradient(logits, ref_logp, estimator):
    """The exact policy gradient of E_pi[-k(y)] when the per-sample penalty k is a fixed reward (detached), as
    in shape_rewards: sum_y grad pi(y) * k(y), negated so that it is the gradient of the penalty."""
    logits = logits.clone().requires_grad_()
    logp = logits.log_softmax(-1)
    penalty = estimator(logp.detach(), ref_logp)
    (grad,) = torch.autograd.grad((logp.exp() * penalty).sum(), logits)
    return grad


def test_only_k1_as_a_reward_has_the_gradient_of_kl():
    """float64 on a 6-outcome categorical: the reward penalty's policy gradient equals grad KL(pi || ref)
    for k1 (the only estimator offered); k2 and k3 (refused by the config) point elsewhere."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=gen, dtype=torch.float64)
    ref_logp = torch.randn(6, generator=gen, dtype=torch.float64).log_softmax(-1)
    leaf = logits.clone().requires_grad_()
    logp = leaf.log_softmax(-1)
    (grad_kl,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), leaf)
    torch.testing.assert_close(_reward_policy_gradient(logits, ref_logp, kl_penalty), grad_kl)
    k2 = lambda lp, rp: 0.5 * (lp - rp) ** 2  # noqa: E731
    k3 = lambda lp, rp: torch.expm1(rp - lp) + (lp - rp)  # noqa: E731
    for biased in (k2, k3):
        cosine = F.cosine_similarity(_reward_policy_gradient(logits, ref_logp, biased), grad_kl, dim=0)
        assert cosine < 0.99


def test_last_token_mask_and_shape_rewards_hand_case():
    torch.testing.assert_close(
        last_token_mask(MASK), torch.tensor([[False, False, True], [False, True, False]])
    )
    kl = _t([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    got = shape_rewards(_t([1.0, 2.0]), kl, MASK, beta=0.5)
    torch.testing.assert_close(got, _t([[-0.05, -0.1, 1.0 - 0.15], [-0.2, 2.0 - 0.25, 0.0]]))
    per_row = shape_rewards(_t([1.0, 2.0]), kl, MASK, beta=_t([[0.5], [1.0]]))
    torch.testing.assert_close(per_row[1], _t([-0.4, 2.0 - 0.5, 0.0]))
    with pytest.raises(ValueError, match="no valid token"):
        shape_rewards(_t([1.0, 2.0]), kl, _t([[1, 1, 1], [0, 0, 0]]), beta=0.5)
    with pytest.raises(ValueError, match="need scores"):
        shape_rewards(_t([1.0]), kl, MASK, beta=0.5)


def _gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE for one unpadded episode; the value after the last step is 0."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_matches_reference_loop_over_variable_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1, 4]
    rewards = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor(lengths).unsqueeze(1)).double()
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, length in enumerate(lengths):
        want = _gae_loop(rewards[b, :length].tolist(), values[b, :length].tolist(), 0.9, 0.8)
        torch.testing.assert_close(advantages[b, :length], _t(want))
        torch.testing.assert_close(returns[b, :length], _t(want) + values[b, :length])
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
    # Garbage at the padding changes nothing.
    dirty = gae(rewards.masked_fill(mask == 0, NAN), values.masked_fill(mask == 0, 1e30), mask, 0.9, 0.8)
    torch.testing.assert_close(dirty, (advantages, returns))


def test_gae_with_gamma_lambda_one_and_zero_values_is_reward_to_go():
    rewards = _t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    advantages, _ = gae(rewards, torch.zeros_like(rewards), MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, _t([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))


def test_leave_one_out_hand_case_and_baseline_excludes_the_sample():
    scores = _t([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    got = leave_one_out(scores, k=4)
    want = _t([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0.0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(leave_one_out(scores.reshape(2, 4), k=4), want.reshape(2, 4))
    # Raising one score by d moves its own advantage by d and each other one by -d/(k-1), i.e. the
    # sample's own score never enters its baseline; other prompts are untouched.
    bumped = leave_one_out(scores + _t([0, 0, 3.0, 0, 0, 0, 0, 0]), k=4)
    torch.testing.assert_close(bumped - got, _t([-1.0, -1.0, 3.0, -1.0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="k must be >= 2"):
        leave_one_out(scores, k=1)
    with pytest.raises(ValueError, match="scores must be"):
        leave_one_out(scores, k=3)
    with pytest.raises(ValueError, match="scores must be"):
        leave_one_out(scores.reshape(4, 2), k=4)


def test_ppo_policy_loss_hand_case():
    # ratios e^0 = 1, 1.5 (clipped to 1.2 when A > 0), 0.5 (clipped to 0.8 when A < 0); one padded token.
    old = _t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = _t([[0.0, math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5), NAN]]).requires_grad_()
    adv = _t([[1.0, 2.0, -1.0], [-1.0, 2.0, 5.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, MASK, clip_range=0.2, max_tokens=4)
    # per token: max(-A r, -A clip(r)) = -1, -2.4, +0.8 | +1.5, -1.0: summed per answer, / 4, mean of 2
    assert loss.item() == pytest.approx(((-1 - 2.4 + 0.8) + (1.5 - 1.0)) / 4 / 2)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert set(stats) == {"approx_kl", "clip_frac"}
    kl3 = [0.0, 0.5 - math.log(1.5), -0.5 - math.log(0.5), 0.5 - math.log(1.5), -0.5 - math.log(0.5)]
    assert stats["approx_kl"].item() == pytest.approx(sum(kl3) / 5)
    loss.backward()
    # Clipped tokens get no gradient; unclipped ones get -A r / (4 * 2); padding gets exactly 0.
    want_grad = _t([[-1.0, 0.0, 0.0], [1.5, -1.0, 0.0]]) / 8
    torch.testing.assert_close(logp.grad, want_grad)


def test_ppo_policy_loss_sequence_advantages_broadcast():
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    adv = torch.tensor([0.7, -1.3])
    per_seq = ppo_policy_loss(logp, old, adv, MASK, 0.2, 3)
    per_token = ppo_policy_loss(logp, old, adv.unsqueeze(1).expand(2, 3), MASK, 0.2, 3)
    torch.testing.assert_close(per_seq, per_token)


def test_ppo_policy_gradient_of_an_answer_ignores_other_answers_lengths():
    """A token's gradient is -A / (answers * max_tokens) at ratio 1, whatever the length of the other answers
    in the micro-batch (a token mean would divide by the micro-batch's token count)."""
    adv = _t([1.0, -2.0])
    grads = []
    for other_length in (1, 6):
        mask = torch.zeros(2, 6, dtype=torch.float64)
        mask[0, :2], mask[1, :other_length] = 1.0, 1.0
        logp = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
        ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2, max_tokens=6)[0].backward()
        grads.append(logp.grad[0, :2])
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], _t([-1.0, -1.0]) / (2 * 6))


def test_value_loss_hand_case():
    old = _t([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    values = _t([[0.5, -0.1, 0.3], [1.1, 0.0, NAN]]).requires_grad_()
    returns = _t([[1.0, 0.0, -1.0], [3.0, 1.0, math.inf]])
    loss, stats = value_loss(values, old, returns, MASK, clip_range=0.2)
    # clipped values 0.2, -0.1, 0.2, 1.1, 0.8: max of the two squared errors per token
    terms = [max(0.25, 0.64), max(0.01, 0.01), max(1.69, 1.44), max(3.61, 3.61), max(1.0, 0.04)]
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 5)
    assert stats["vf_clip_frac"].item() == pytest.approx(1 / 5)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 5 where the unclipped error wins; 0 where the clipped one wins and at padding.
    torch.testing.assert_close(values.grad, _t([[0.0, -0.1, 1.3], [-1.9, -1.0, 0.0]]) / 5)


def test_sft_nll_hand_case():
    logp = _t([[-1.0, -2.0, -3.0], [-4.0, -5.0, NAN]])
    assert sft_nll(logp, MASK, max_tokens=3).item() == pytest.approx((6 / 3 + 9 / 3) / 2)


def _expected_sft_loss(theta, max_tokens, micro_batch):
    """Expected BoN-SFT loss when the data are two equally likely answers of 2 and 6 tokens, drawn
    `micro_batch` at a time (every composition enumerated). The model picks the 2-token answer with
    probability sigmoid(theta) at its first token; every later token is certain (log-prob 0)."""
    first = torch.stack([F.logsigmoid(theta), F.logsigmoid(-theta)])
    answers = [
        torch.cat([first[0:1], torch.zeros(1, dtype=theta.dtype)]),
        torch.cat([first[1:2], torch.zeros(5, dtype=theta.dtype)]),
    ]
    total = theta.new_zeros(())
    for short_count in range(micro_batch + 1):
        rows = [answers[0]] * short_count + [answers[1]] * (micro_batch - short_count)
        logp = torch.zeros(micro_batch, 6, dtype=theta.dtype)
        mask = torch.zeros_like(logp)
        for i, row in enumerate(rows):
            logp[i, : len(row)], mask[i, : len(row)] = row, 1.0
        weight = math.comb(micro_batch, short_count) / 2**micro_batch
        total = total + weight * sft_nll(logp, mask, max_tokens)
    return total


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_bon_sft_optimum_is_the_data_distribution_whatever_the_lengths(micro_batch):
    """Two equally likely answers of 2 and 6 tokens: the expected loss is minimal at probability 1/2 each
    (a token mean over the micro-batch put 0.75 on the short one at micro-batch 1). float64, exact."""
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)  # sigmoid(0) = 1/2: the target
    (grad,) = torch.autograd.grad(_expected_sft_loss(theta, 6, micro_batch), theta)
    assert abs(grad.item()) < 1e-12
    # and it is a minimum: the loss rises on both sides
    at_target = _expected_sft_loss(theta.detach(), 6, micro_batch)
    for step in (-0.1, 0.1):
        assert _expected_sft_loss(theta.detach() + step, 6, micro_batch) > at_target


def test_dpo_and_ipo_hand_case():
    chosen, rejected = _t([-1.0, -3.0]), _t([-2.0, -1.0])
    ref_chosen, ref_rejected = _t([-1.5, -2.0]), _t([-1.5, -2.0])
    margins = [(-1.0 + 1.5) - (-2.0 + 1.5), (-3.0 + 2.0) - (-1.0 + 2.0)]  # 1.0, -2.0
    beta = 0.1
    want_dpo = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).item() == pytest.approx(want_dpo)
    want_ipo = sum((m - 1 / (2 * beta)) ** 2 for m in margins) / 2
    assert ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).item() == pytest.approx(want_ipo)
    # A zero margin costs log 2 per pair.
    assert dpo_loss(chosen, chosen, chosen, chosen, beta).item() == pytest.approx(
        -F.logsigmoid(_t(0.0)).item()
    )


def test_rloo_advantages_are_the_per_token_form_summed_then_leave_one_out():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, generator=gen, dtype=torch.float64)
    kl = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    mask = _t([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    beta = 0.3
    got = rloo_advantages(rewards, kl.masked_fill(mask == 0, NAN), mask, beta, k=2, whiten_advantages=False)
    # The per-token rewards summed over each answer: its reward minus beta times its summed KL.
    sequence = shape_rewards(rewards, kl, mask, beta).sum(-1)
    torch.testing.assert_close(sequence, rewards - beta * (kl * mask).sum(-1))
    torch.testing.assert_close(got, leave_one_out(sequence, 2))
    assert got.shape == (4,)


def test_rloo_whitens_per_answer_not_per_token():
    rewards = _t([1.0, 0.0, 3.0, 0.0])
    mask = _t([[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # long and short answers
    got = rloo_advantages(rewards, torch.zeros_like(mask), mask, 0.1, k=2, whiten_advantages=True)
    raw = leave_one_out(rewards, 2)  # [1, -1, 3, -3]: mean 0, population variance 5
    torch.testing.assert_close(got, raw / math.sqrt(5.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(got, whiten(raw))
    # Whitening the broadcast per-token tensor instead would weight the long answers four times.
    per_token = masked_whiten(raw.unsqueeze(1) * mask, mask)
    assert not torch.allclose(per_token[:, 0], got)


def test_ppo_advantages_are_gae_of_the_shaped_rewards():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, generator=gen, dtype=torch.float64)
    kl = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    values = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    advantages, returns = ppo_advantages(rewards, kl, values, MASK, 0.2, 1.0, 0.95, whiten_advantages=False)
    want = gae(shape_rewards(rewards, kl, MASK, 0.2), values, MASK, 1.0, 0.95)
    torch.testing.assert_close((advantages, returns), want)
    whitened, same_returns = ppo_advantages(rewards, kl, values, MASK, 0.2, 1.0, 0.95, whiten_advantages=True)
    torch.testing.assert_close(whitened, masked_whiten(want[0], MASK))
    torch.testing.assert_close(same_returns, returns)


def test_ipo_target_beta_matches_the_bon_margin_of_best_over_worst():
    # Without ties u = F(r) is uniform and log(pi_BoN / pi_ref) = log n + (n - 1) log u, so the expected
    # margin of the best over the worst of n is (n - 1) E[log U_max - log U_min] = (n - 1) H_(n-1).
    assert ipo_target_beta(2) == pytest.approx(0.5)
    n = 4
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, n, generator=gen, dtype=torch.float64)
    margin = (n - 1) * (u.max(1).values.log() - u.min(1).values.log()).mean().item()
    assert 1 / (2 * ipo_target_beta(n)) == pytest.approx(margin, rel=0.01)
    assert 1 / (2 * ipo_target_beta(n)) == pytest.approx(3 * (1 + 1 / 2 + 1 / 3))
    with pytest.raises(ValueError, match="n must be >= 2"):
        ipo_target_beta(1)


def test_bonbon_loss_mixes_summed_sft_and_ipo():
    chosen, rejected = _t([-1.0, -3.0]), _t([-2.0, -1.0])
    ref_chosen, ref_rejected = _t([-1.5, -2.0]), _t([-1.5, -2.0])
    args = (chosen, rejected, ref_chosen, ref_rejected)
    ipo = ipo_loss(*args, 0.25)
    got = bonbon_loss(*args, alpha=0.2, beta=0.25)
    assert got.item() == pytest.approx(0.2 * (1.0 + 3.0) / 2 + 0.8 * ipo.item())
    assert bonbon_loss(*args, alpha=0.0, beta=0.25).item() == pytest.approx(ipo.item())


def test_default_bonbon_alpha_balances_the_two_gradients_at_the_start():
    """At pi = pi_ref (margin 0) the default alpha gives the SFT and IPO terms gradients of about equal norm
    for N = 8 when the best and worst answers' score functions are orthogonal, as measured on the demo
    (benchmarks/RESULTS.md; docs/math.md section 5). Here: one categorical over 1000 answers, uniform."""
    alpha, beta = AlgoConfig().bonbon_alpha, ipo_target_beta(8)
    logits = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    logp = logits.log_softmax(-1)
    chosen, rejected = logp[:1], logp[1:2]
    ref = (chosen.detach(), rejected.detach())
    sft = bonbon_loss(chosen, rejected, *ref, alpha=1.0, beta=beta)  # alpha = 1: the SFT term alone
    ipo = bonbon_loss(chosen, rejected, *ref, alpha=0.0, beta=beta)
    (g_sft,) = torch.autograd.grad(alpha * sft, logits, retain_graph=True)
    (g_ipo,) = torch.autograd.grad((1 - alpha) * ipo, logits)
    assert 0.5 < g_sft.norm() / g_ipo.norm() < 2.0
