"""The phases of a training step with small fake engines (no DeepSpeed): micro-batching, score, advantages,
update and the non-finite guard. The fakes compute real log-probs from a bigram table, so the update's
effect is measurable."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vbon_ds.algorithms import onpolicy as phases
from vbon_ds.algorithms import step
from vbon_ds.algorithms.offline import choose_pairs
from vbon_ds.algorithms.registry import ALGORITHMS
from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.core import bon, losses
from vbon_ds.engines.build import Engines

VOCAB = 6


class FakePolicy:
    """A bigram table policy with the PolicyEngine methods the phases use; SGD every `accumulate` steps."""

    def __init__(self, accumulate: int = 1, lr: float = 0.5, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64).requires_grad_()
        self.dtype = self.table.dtype
        self.accumulate, self.lr = accumulate, lr
        self.forward_rows: list[int] = []
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.trainable = True

    def response_logprobs(self, sequences, attention_mask, prompt_length, temperature, return_entropy=False):
        self.forward_rows.append(sequences.shape[0])
        logits = self.table[sequences[:, prompt_length - 1 : -1]] / temperature
        log_probs = torch.log_softmax(logits, -1)
        mask = attention_mask[:, prompt_length:]
        logp = log_probs.gather(-1, sequences[:, prompt_length:, None])[..., 0] * mask
        if not return_entropy:
            return logp
        return logp, -(log_probs.exp() * log_probs).sum(-1) * mask

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulate).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulate == 0:
            with torch.no_grad():
                self.table -= self.lr * self.table.grad
            self.table.grad = None
            self.optimizer_steps += 1

    def current_lr(self) -> float:
        return self.lr


def token_batch(responses: list[list[int]], prompt: list[int] = (1, 2)) -> phases.TokenBatch:
    """Rows of `prompt` + each response, right-padded with 0."""
    width = max(len(r) for r in responses)
    seqs = torch.tensor([[*prompt, *r, *[0] * (width - len(r))] for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    attention = torch.cat([torch.ones(len(responses), len(prompt), dtype=torch.long), response_mask], 1)
    return phases.TokenBatch(seqs, attention, response_mask, len(prompt))


RESPONSES = [[3, 4, 5], [3], [5, 5], [4, 3, 2, 1], [2], [1, 1, 1]]


def rloo_config(*extra: str):
    return load_config(
        None,
        ["algo.name=rloo", "algo.samples_per_prompt=2", "train.prompts_per_step=3", "vbon.n=4",
         "train.micro_batch_size=2", "algo.ppo_epochs=2", "generation.temperature=1.0", *extra],
    )  # fmt: skip


def test_token_batch_rows_trim_response_padding():
    batch = token_batch(RESPONSES)
    rows = batch.rows(torch.tensor([1, 4]))  # two one-token answers
    assert rows.sequences.tolist() == [[1, 2, 3], [1, 2, 2]]
    assert rows.response_mask.tolist() == [[1], [1]]
    exp = phases.Experience(
        {"answers": batch}, {"per_token": torch.arange(24.0).reshape(6, 4), "per_item": torch.arange(6.0)}
    )
    micro = exp.micro_batch(torch.tensor([2, 0]))
    assert micro.tensors["per_token"].tolist() == [[8.0, 9.0, 10.0], [0.0, 1.0, 2.0]]
    assert micro.tensors["per_item"].tolist() == [2.0, 0.0]
    assert len(exp) == 6 and len(micro) == 2


def test_logprobs_in_micro_batches_equal_one_forward():
    batch, policy = token_batch(RESPONSES), FakePolicy()
    whole = policy.response_logprobs(batch.sequences, batch.attention_mask, 2, 1.0)
    policy.forward_rows.clear()
    logp, entropy = phases.policy_logprobs(policy, batch, 1.0, 4, with_entropy=True)
    assert policy.forward_rows == [4, 2]
    torch.testing.assert_close(logp, whole)
    assert entropy.shape == whole.shape and (entropy[batch.response_mask == 0] == 0).all()


ENDED = torch.tensor([True, True])


def test_score_checks_rewards_once_and_computes_log_f_once():
    refs = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)  # ascending, as the cache stores them
    rewards = torch.tensor([1.5, 4.0])
    scores = phases.score(rloo_config(), rewards, refs, ["a", "b"], ENDED)
    assert scores.objective_rewards is scores.log_f  # vbon: the objective is log F itself
    torch.testing.assert_close(scores.log_f, bon.log_cdf(rewards, refs))
    exact = phases.score(rloo_config("vbon.objective=vbon_exact"), rewards, refs, ["a", "b"], ENDED)
    torch.testing.assert_close(exact.log_f, scores.log_f)
    torch.testing.assert_close(exact.objective_rewards, bon.vbon_reward(rewards, refs, 4, "exact"))
    kl_rl = phases.score(
        rloo_config("vbon.objective=kl_rl", "vbon.beta=0.1"), rewards, None, ["a", "b"], ENDED
    )
    assert kl_rl.objective_rewards is rewards and kl_rl.log_f is None
    with pytest.raises(phases.NonFiniteReward, match=r"reward is not finite for b$"):
        phases.score(rloo_config(), torch.tensor([1.0, math.nan]), refs, ["a", "b"], ENDED)


def step_through(cfg, policy: FakePolicy, critic=None):
    """score -> logprobs -> advantages -> update on the fake engines; returns (experience, update stats)."""
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=policy, reference=FakePolicy(seed=1))
    engines.critic = critic
    batch = token_batch(RESPONSES)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    scores = phases.score(
        cfg, rewards, None, [f"p{j // 2}" for j in range(6)], torch.ones(6, dtype=torch.bool)
    )
    logps = phases.logprobs(engines, cfg, batch)
    estimator = phases.gae_advantages if critic is not None else phases.leave_one_out_advantages
    exp = phases.advantages(cfg, 0.1, batch, scores, logps, estimator)
    algorithm = ALGORITHMS[cfg.algo.name]
    stats = step.update(
        exp, engines, cfg, algorithm.losses, cfg.algo.ppo_epochs, torch.Generator().manual_seed(0)
    )
    return exp, stats


def test_rloo_step_advantages_and_update_counts():
    cfg = rloo_config("vbon.objective=kl_rl", "vbon.beta=0.1")
    policy = FakePolicy(accumulate=batch_sizes(cfg, 1).gradient_accumulation_steps)
    before = policy.response_logprobs(*phases.batch_tensors(token_batch(RESPONSES))[:2], 2, 1.0).sum(1)
    exp, stats = step_through(cfg, policy)
    adv = exp.tensors["advantages"]
    # One advantage per answer, the same at each of its tokens, whitened over the 6 answers.
    per_answer = adv[:, 0]
    assert torch.equal(adv, per_answer.unsqueeze(1) * exp.batches["answers"].response_mask)
    assert per_answer.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert per_answer.pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    # 6 answers, micro-batches of 2: 3 micro-steps and 1 optimizer step per epoch, 2 epochs.
    assert policy.micro_steps == 6 and policy.optimizer_steps == 2
    assert stats["train/skipped_micro_batches"] == 0
    assert set(stats) >= {"train/loss", "train/clip_frac", "train/approx_kl"}
    after = policy.response_logprobs(*phases.batch_tensors(token_batch(RESPONSES))[:2], 2, 1.0).sum(1)
    # The update makes the answers with positive advantage more likely relative to the others.
    gain = after - before
    assert gain[per_answer > 0].mean() > gain[per_answer < 0].mean()


def test_kl_is_zero_when_actor_is_the_reference():
    cfg = rloo_config("vbon.objective=kl_rl", "vbon.beta=0.1")
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=FakePolicy(), reference=FakePolicy())
    batch = token_batch(RESPONSES)
    logps = phases.logprobs(engines, cfg, batch)
    scores = phases.score(
        cfg, torch.ones(6, dtype=torch.float64), None, ["p"] * 6, torch.ones(6, dtype=torch.bool)
    )
    exp = phases.advantages(cfg, 0.1, batch, scores, logps, phases.leave_one_out_advantages)
    assert exp.stats["train/kl"] == 0.0
    # Equal rewards and zero KL: every leave-one-out advantage is 0.
    assert torch.equal(exp.tensors["advantages"], torch.zeros_like(exp.tensors["advantages"]))


def test_recorded_sampling_logprobs_replace_the_actor_forward():
    cfg = rloo_config("algo.old_logprobs=sampling")
    actor = FakePolicy()
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=actor, reference=FakePolicy())
    batch = token_batch(RESPONSES)
    recorded = torch.randn(batch.response_mask.shape) * batch.response_mask
    sampled = SimpleNamespace(sampled_logprobs=recorded, sampled_entropy=recorded.abs(), sampler_dtype=None)
    logps = phases.logprobs(engines, cfg, batch, sampled)
    assert actor.forward_rows == [] and torch.equal(logps.actor, recorded)
    assert torch.equal(logps.entropy, recorded.abs()) and logps.sampler is None
    # Without a recording (or when the rollout was not recorded) the actor runs its forward.
    forward = phases.logprobs(engines, cfg, batch, SimpleNamespace(sampled_logprobs=None))
    assert actor.forward_rows and torch.equal(forward.actor, phases.logprobs(engines, cfg, batch).actor)


@pytest.mark.parametrize(
    "setting, actor, sampler, want",
    [
        ("auto", torch.float32, torch.float32, True),
        ("auto", torch.bfloat16, torch.bfloat16, False),  # bf16 sampling logits differ from a forward's
        ("auto", torch.float32, torch.bfloat16, False),  # e.g. a bf16 vLLM sampler for an fp32 trainer
        ("auto", torch.float32, None, False),
        ("forward", torch.float32, torch.float32, False),
        ("sampling", torch.float32, torch.bfloat16, True),
    ],
)
def test_when_old_logprobs_come_from_sampling(setting, actor, sampler, want):
    cfg = rloo_config(f"algo.old_logprobs={setting}")
    assert phases.old_logprobs_from_sampling(cfg, actor, sampler) is want


class FakeCritic(FakePolicy):
    """Per-token values from a table indexed by the previous token."""

    def values(self, sequences, attention_mask, prompt_length):
        self.forward_rows.append(sequences.shape[0])
        return self.table[sequences[:, prompt_length - 1 : -1], 0] * attention_mask[:, prompt_length:]


def test_ppo_step_trains_the_critic_and_whitens_per_token():
    cfg = rloo_config(
        "algo.name=ppo", "algo.samples_per_prompt=1", "train.prompts_per_step=6", "vbon.objective=kl_rl",
        "vbon.beta=0.1",
    )  # fmt: skip
    critic = FakeCritic(seed=2)
    exp, stats = step_through(cfg, FakePolicy(), critic)
    mask = exp.batches["answers"].response_mask
    assert losses.masked_mean(exp.tensors["advantages"], mask).item() == pytest.approx(0.0, abs=1e-6)
    assert {"returns", "values"} <= set(exp.tensors)
    assert critic.micro_steps == 6 and "train/value_loss" in stats


def test_a_non_finite_loss_is_skipped_with_a_zero_gradient():
    policy = FakePolicy()
    rows = phases.batch_tensors(token_batch(RESPONSES))[:2]
    table = policy.table.detach().clone()
    logp = policy.response_logprobs(*rows, 2, 1.0)
    assert not step.backward_and_step(policy, logp.sum() * math.nan, logp)
    assert torch.equal(policy.table.detach(), table) and policy.optimizer_steps == 1
    logp = policy.response_logprobs(*rows, 2, 1.0)
    assert step.backward_and_step(policy, logp.sum(), logp)
    assert not torch.equal(policy.table.detach(), table)


def test_pairs_are_best_and_worst_of_a_random_n_subset():
    rewards = [[0.0, 5.0, 1.0, 3.0, 2.0, 4.0]] * 200
    pairs = choose_pairs(rewards, list(range(200)), 3, torch.Generator().manual_seed(0))
    for pair in pairs:
        assert pair.chosen_reward >= pair.rejected_reward
        assert (
            pair.chosen_reward == rewards[0][pair.chosen]
            and pair.rejected_reward == rewards[0][pair.rejected]
        )
    # Best of 3 of these 6 distinct rewards: the top answer with probability C(5, 2) / C(6, 3) = 1/2.
    top = sum(pair.chosen == 1 for pair in pairs) / len(pairs)
    assert 0.4 < top < 0.6
    assert len({pair.chosen for pair in pairs}) > 1
    with_ties = choose_pairs([[1.0, 1.0, 1.0]], [0], 3, torch.Generator().manual_seed(0))[0]
    assert with_ties.chosen_reward == with_ties.rejected_reward == 1.0


@pytest.mark.parametrize("algo", ["bon_sft", "dpo", "ipo", "bonbon"])
def test_offline_update_moves_what_it_optimises(algo):
    cfg = rloo_config(f"algo.name={algo}", "algo.samples_per_prompt=1", "train.prompts_per_step=4")
    policy, reference = FakePolicy(accumulate=2, lr=0.02), FakePolicy()
    chosen, rejected = token_batch([[3, 3], [3, 4], [3], [3, 3, 3]]), token_batch([[5, 5], [5], [4, 5], [5]])
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=policy, reference=reference)

    def sequence_logp(model, batch):
        return model.response_logprobs(*phases.batch_tensors(batch)[:2], 2, 1.0).sum(1)

    refs = {"ref_chosen": sequence_logp(reference, chosen).detach(),
            "ref_rejected": sequence_logp(reference, rejected).detach()}  # fmt: skip
    exp = phases.Experience({"chosen": chosen, "rejected": rejected}, refs)
    terms = ALGORITHMS[algo].losses
    first = step.update(exp, engines, cfg, terms, 1, torch.Generator().manual_seed(0))
    for _ in range(5):
        last = step.update(exp, engines, cfg, terms, 1, torch.Generator().manual_seed(0))
    assert policy.optimizer_steps == 6
    assert last["train/loss"] < first["train/loss"]
    if algo == "bon_sft":
        assert last["train/chosen_nll"] < first["train/chosen_nll"]
    else:
        assert last["train/reward_margin"] > first["train/reward_margin"]
        assert last["train/reward_accuracy"] >= first["train/reward_accuracy"]


def test_micro_step_losses_sum_each_answer_over_max_new_tokens():
    """BoN-SFT and the policy-gradient surrogate: each answer's token sum / generation.max_new_tokens, mean
    over answers, so an answer weighs the same whatever the other answers' lengths (docs/math.md)."""
    chosen = token_batch([[3, 4, 5], [3]])
    mask = chosen.response_mask
    policy = FakePolicy()
    logp = policy.response_logprobs(*phases.batch_tensors(chosen)[:2], 2, 1.0).detach()
    cfg = rloo_config("algo.name=bon_sft", "generation.max_new_tokens=7")
    engines = Engines(tokenizer=None, sizes=batch_sizes(cfg, 1), actor=policy, reference=FakePolicy())
    exp = phases.Experience({"chosen": chosen}, {"ref_chosen": torch.zeros(2, dtype=torch.float64)})
    stats, _ = step.micro_step(exp, engines, cfg, ALGORITHMS["bon_sft"].losses)
    assert stats["train/loss"] == pytest.approx(-(logp * mask).sum(1).mean().item() / 7)
    rl = rloo_config("generation.max_new_tokens=7")
    advantages = torch.tensor([1.5, -0.5], dtype=torch.float64)
    exp = phases.Experience(
        {"answers": chosen}, {"logprobs": logp, "advantages": advantages.unsqueeze(1) * mask}
    )
    engines = Engines(None, batch_sizes(rl, 1), FakePolicy(), FakePolicy())
    stats, _ = step.micro_step(exp, engines, rl, ALGORITHMS["rloo"].losses)
    # ratio 1 at the first epoch: -A per token, 3 and 1 tokens
    assert stats["train/loss"] == pytest.approx(-(1.5 * 3 - 0.5 * 1) / 2 / 7)


def test_concat_rollouts_pads_recorded_logprobs_like_the_answers():
    from vbon_ds.algorithms.rollout import concat_rollouts
    from vbon_ds.engines.policy import Rollout

    def part(width: int, value: float) -> Rollout:
        mask = torch.ones(1, width, dtype=torch.long)
        return Rollout(
            sequences=torch.ones(1, 2 + width, dtype=torch.long), attention_mask=torch.ones(1, 2 + width),
            response_mask=mask, prompt_length=2, ended_with_eos=torch.tensor([True]),
            sampled_logprobs=torch.full((1, width), value), sampled_entropy=torch.full((1, width), -value),
            sampler_dtype=torch.bfloat16,
        )  # fmt: skip

    joined = concat_rollouts([part(3, -1.0), part(1, -2.0)], pad_id=0)
    assert torch.equal(joined.sampled_logprobs, torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]))
    assert torch.equal(joined.sampled_entropy, -joined.sampled_logprobs)
    assert joined.sampler_dtype == torch.bfloat16
    no_entropy = [part(3, -1.0), part(1, -2.0)]
    for one in no_entropy:
        one.sampled_entropy = None  # what a vLLM sampler gives
    joined = concat_rollouts(no_entropy, pad_id=0)
    assert joined.sampled_entropy is None and joined.sampled_logprobs.shape == (2, 3)
    unrecorded = part(2, -1.0)
    unrecorded.sampled_logprobs = unrecorded.sampled_entropy = unrecorded.sampler_dtype = None
    joined = concat_rollouts([part(3, -1.0), unrecorded], pad_id=0)
    assert joined.sampled_logprobs is None and joined.sampler_dtype is None
