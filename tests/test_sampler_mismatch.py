"""A sampler that is not the trainer (e.g. bf16 vLLM for an fp32 trainer): the truncated importance weights
and the KL estimate on tensors (float64), their effect on a policy gradient whose sampler is far off, and
the correction in a training step, with fake engines and with a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_experience import RESPONSES, FakePolicy, rloo_config, token_batch
from test_trainer_guards import tiny_config, tiny_model  # noqa: F401 (tiny_model: a fixture)

from vbon_ds.algorithms import onpolicy
from vbon_ds.algorithms.sampler_mismatch import WEIGHTS
from vbon_ds.batching import batch_sizes
from vbon_ds.core import losses
from vbon_ds.engines.build import Engines

F64 = torch.float64


# ---------------------------------------------------------------- the math on tensors


def test_weights_are_the_capped_ratio_detached_and_zero_at_padding():
    logp = torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.1, 0.1]], dtype=F64).log().requires_grad_()
    sampler = torch.tensor([[0.25, 0.4, 0.3], [0.6, math.nan, -math.inf]], dtype=F64).log()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    weights = losses.truncated_importance_weights(logp, sampler, mask, cap=2.5)
    # pi / mu = 2, 0.5, 3 (capped at 2.5); 0.5; padding 0 whatever the garbage there.
    want = torch.tensor([[2.0, 0.5, 2.5], [0.5, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(weights, want, rtol=1e-12, atol=0.0)
    assert not weights.requires_grad


def test_sampler_kl_is_the_token_mean_of_the_log_ratio_and_estimates_the_kl():
    sampler = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, 0.0, 0.0]], dtype=F64)
    logp = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert losses.sampler_kl(sampler, logp, mask).item() == pytest.approx((0.5 - 1.0 + 0.5) / 3, abs=1e-15)
    # Tokens drawn from mu: the mean converges to KL(mu || pi).
    gen = torch.Generator().manual_seed(0)
    mu, pi = (torch.randn(6, generator=gen, dtype=F64).softmax(0) for _ in range(2))
    tokens = torch.multinomial(mu, 400_000, replacement=True, generator=gen)[:, None]
    estimate = losses.sampler_kl(mu.log()[tokens], pi.log()[tokens], torch.ones_like(tokens))
    exact = (mu * (mu / pi).log()).sum()
    assert estimate.item() == pytest.approx(exact.item(), abs=0.01)


def test_unit_weights_leave_the_policy_loss_bit_identical_and_others_scale_each_token():
    gen = torch.Generator().manual_seed(0)
    logp, old, advantages = (torch.randn(3, 4, generator=gen, dtype=F64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    plain, _ = losses.ppo_policy_loss(logp, old, advantages, mask, 0.2, 5)
    ones, _ = losses.ppo_policy_loss(logp, old, advantages, mask, 0.2, 5, torch.ones_like(logp))
    assert torch.equal(plain, ones)
    halved, _ = losses.ppo_policy_loss(logp, old, advantages, mask, 0.2, 5, torch.full_like(logp, 0.5))
    assert halved.item() == pytest.approx(0.5 * plain.item(), rel=1e-14)


# ---------------------------------------------------------------- a policy gradient with a sampler far off

V, SAMPLES = 8, 200_000


def policy_gradient_estimate(
    logits: torch.Tensor,
    sampler: torch.Tensor,
    rewards: torch.Tensor,
    tokens: torch.Tensor,
    cap: float | None,
) -> torch.Tensor:
    """The gradient of E_pi[r] (pi = softmax(logits)) the surrogate loss gives from `tokens` drawn from
    softmax(sampler): old log-probs from the trainer (ratio 1), weighted when `cap` is given."""
    logits = logits.clone().requires_grad_()
    logp = logits.log_softmax(0)[tokens][:, None]
    mask = torch.ones_like(logp)
    weights = None
    if cap is not None:
        sampler_logp = sampler.log_softmax(0)[tokens][:, None]
        weights = losses.truncated_importance_weights(logp.detach(), sampler_logp, mask, cap)
        assert weights.max() <= cap
    loss, _ = losses.ppo_policy_loss(logp, logp.detach(), rewards[tokens][:, None], mask, 0.2, 1, weights)
    loss.backward()
    return -logits.grad


@pytest.mark.parametrize("sampler_kind", ["hotter", "perturbed"])
def test_the_weights_recover_the_on_policy_gradient_from_a_mismatched_sampler(sampler_kind):
    """Measured (float64, 200k samples): relative error of the gradient estimate against the exact
    on-policy one, uncorrected / capped at 2 / uncapped: hotter (T=1.6, KL(mu||pi) 0.086, pi/mu <= 1.41):
    0.47 / 0.0009 / 0.0009; perturbed (KL 0.15, pi/mu up to 2.85, 4.4% of samples above 2):
    0.74 / 0.035 / 0.0013."""
    gen = torch.Generator().manual_seed(0)
    logits = 1.5 * torch.randn(V, generator=gen, dtype=F64)
    rewards = torch.randn(V, generator=gen, dtype=F64)
    noise = 0.7 * torch.randn(V, generator=gen, dtype=F64)
    sampler = logits / 1.6 if sampler_kind == "hotter" else logits + noise
    pi = logits.softmax(0)
    exact = pi * (rewards - (pi * rewards).sum())  # d E_pi[r] / d logits
    tokens = torch.multinomial(sampler.softmax(0), SAMPLES, replacement=True, generator=gen)

    def error(cap: float | None) -> float:
        estimate = policy_gradient_estimate(logits, sampler, rewards, tokens, cap)
        return ((estimate - exact).norm() / exact.norm()).item()

    uncorrected, capped, uncapped = error(None), error(2.0), error(math.inf)
    assert uncorrected > 0.4
    assert capped < uncorrected / 10
    assert uncapped < 0.01  # unbiased: only sampling noise is left
    if sampler_kind == "perturbed":  # the cap binds on some samples: a small bias for bounded weights
        assert capped > uncapped


# ---------------------------------------------------------------- a training step with fake engines


def fake_step(setting: str, sampler_dtype: torch.dtype | None, recorded: torch.Tensor):
    """logprobs -> advantages for RESPONSES whose rollout recorded `recorded` without entropies (vLLM)."""
    cfg = rloo_config(f"algo.old_logprobs={setting}", "vbon.objective=kl_rl", "vbon.beta=0.1")
    actor = FakePolicy()
    actor.dtype = torch.float32
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=actor, reference=FakePolicy(seed=1))
    batch = token_batch(RESPONSES)
    sampled = SimpleNamespace(sampled_logprobs=recorded, sampled_entropy=None, sampler_dtype=sampler_dtype)
    logps = onpolicy.logprobs(engines, cfg, batch, sampled)
    scores = onpolicy.score(cfg, torch.arange(6.0, dtype=F64), None, ["p"] * 6, torch.ones(6, dtype=bool))
    exp = onpolicy.advantages(cfg, 0.1, batch, scores, logps, onpolicy.leave_one_out_advantages)
    return exp, actor, batch.response_mask


def test_recorded_logprobs_without_entropy_give_the_surprisal_as_entropy():
    mask = token_batch(RESPONSES).response_mask
    recorded = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(0), dtype=F64) * mask
    exp, actor, _ = fake_step("sampling", torch.bfloat16, recorded)
    assert actor.forward_rows == [] and exp.tensors["logprobs"] is recorded
    assert exp.stats["train/entropy"] == pytest.approx(-recorded.sum().item() / mask.sum().item(), rel=1e-12)
    assert WEIGHTS not in exp.tensors and "train/sampler_kl" not in exp.stats


def test_a_bf16_sampler_gets_a_forward_and_its_weights_and_kl():
    mask = token_batch(RESPONSES).response_mask
    trainer_logp = FakePolicy().response_logprobs(*onpolicy.batch_tensors(token_batch(RESPONSES))[:2], 2, 1.0)
    # log mu - log pi per position: +1 at the first token, -1 at the second (pi/mu = e > cap 2), -0.25 after.
    shift = torch.tensor([1.0, -1.0, -0.25, -0.25], dtype=F64).expand_as(mask)
    recorded = ((trainer_logp + shift) * mask).detach()
    exp, actor, _ = fake_step("auto", torch.bfloat16, recorded)
    assert actor.forward_rows  # the old log-probs are the trainer's
    torch.testing.assert_close(exp.tensors["logprobs"], trainer_logp.detach())
    want = torch.tensor([math.exp(-1.0), 2.0, math.exp(0.25), math.exp(0.25)], dtype=F64) * mask
    torch.testing.assert_close(exp.tensors[WEIGHTS], want, rtol=1e-12, atol=1e-12)
    assert exp.stats["train/sampler_kl"] == pytest.approx(losses.masked_mean(shift, mask).item(), rel=1e-12)
    at_cap = (mask[:, 1] == 1).sum().item() / mask.sum().item()  # the second tokens
    assert exp.stats["train/sampler_is_clipped"] == pytest.approx(at_cap, rel=1e-12)


# ---------------------------------------------------------------- a training step on a tiny model


@pytest.mark.slow
def test_a_tiny_model_step_measures_and_corrects_a_perturbed_sampler(tmp_path, tiny_model, monkeypatch):  # noqa: F811
    """The tiny fp32 actor records its log-probs; made to look like a bf16 sampler's, 0.3 nats more sure of
    each token, they give sampler_kl 0.3 and weights exp(-0.3) in the loss; left as recorded (fp32), they are
    the old log-probs and nothing is corrected."""
    from vbon_ds.jobs.train import Trainer

    cfg = tiny_config(tmp_path / "run", tiny_model, "vbon.objective=kl_rl", "vbon.beta=0.1", "train.steps=1")
    trainer = Trainer(cfg)
    real_rollout = onpolicy.rollout
    recorded_rollouts = []

    def sampler(shift: float, dtype: torch.dtype):
        def sample(engines, cfg, prompts):
            sampled = real_rollout(engines, cfg, prompts)
            rollout = sampled.rollout
            assert rollout.sampler_dtype == torch.float32  # the fp32 actor's own record
            rollout.sampled_logprobs = (rollout.sampled_logprobs + shift) * rollout.response_mask
            rollout.sampler_dtype = dtype
            recorded_rollouts.append(rollout)
            return sampled

        return sample

    def experience():
        prompts = trainer.this_ranks_prompts()
        return trainer.algorithm.experience(trainer.inputs, prompts, trainer.step_generator(1))

    monkeypatch.setattr(onpolicy, "rollout", sampler(0.0, torch.float32))
    exp = experience()
    assert WEIGHTS not in exp.tensors and "train/sampler_kl" not in exp.stats
    assert exp.tensors["logprobs"] is recorded_rollouts[-1].sampled_logprobs

    monkeypatch.setattr(onpolicy, "rollout", sampler(0.3, torch.bfloat16))
    exp = experience()
    mask = exp.batches["answers"].response_mask
    assert exp.stats["train/sampler_kl"] == pytest.approx(0.3, abs=1e-4)
    assert exp.stats["train/sampler_is_clipped"] == 0.0
    torch.testing.assert_close(exp.tensors[WEIGHTS], math.exp(-0.3) * mask.float(), atol=1e-4, rtol=0)
    # With every advantage 1 and ratio 1 the loss is -(tokens x weight) per answer: the weights scale it.
    exp.tensors["advantages"] = mask.float()
    micro = exp.micro_batch(torch.arange(cfg.train.micro_batch_size))
    unweighted = onpolicy.Experience(micro.batches, {k: v for k, v in micro.tensors.items() if k != WEIGHTS})
    weighted_loss = onpolicy.policy_gradient_loss(trainer.engines, cfg, micro).loss
    plain_loss = onpolicy.policy_gradient_loss(trainer.engines, cfg, unweighted).loss
    assert plain_loss.item() < 0
    assert (weighted_loss / plain_loss).item() == pytest.approx(math.exp(-0.3), rel=1e-4)
