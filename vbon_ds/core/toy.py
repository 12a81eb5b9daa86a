"""An exactly solvable toy world: every sequence enumerable, so pi_BoN and every KL are exact.

Sequences are all V^L token strings (4^4 = 256 by default). Policies are autoregressive tables: one row of
next-token logits per prefix, so the family is complete (it holds every distribution with full support)
and KL-regularised RL has the closed-form optimum pi_ref * exp(R / beta) / Z in it. The reference is a
random table of the same shape. Two rewards: "distinct" (continuous, no ties) and "tied" (a lexicon-like
integer score with many ties).

Every method sees the same cache of M reference samples, as in the real pipeline: vBoN reads F from it
through `vbon_ds.core.bon.vbon_reward`, BoN-SFT trains on the best of each N of it, and KL-RL uses the raw
reward. Training uses either exact expectations over all sequences or sampled policy gradients with the
trainer's functions (k1 KL penalty, `losses.rloo_advantages`, PPO loss). Evaluation is always exact.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vbon_ds.core.bon import bon_log_probs, vbon_beta, vbon_reward
from vbon_ds.core.losses import kl_penalty, ppo_policy_loss, rloo_advantages, sft_nll

NUM_REFS = 512  # M: reference samples per prompt in the cache
KL_RL_BETAS = torch.logspace(-2, 1, 25).tolist()  # KL-RL sweep, in units of the reward's std under pi_ref
# Adam (linearly decayed learning rate) steps and peak learning rates per training mode.
EXACT_STEPS, EXACT_LR = 800, 0.2
SAMPLED_STEPS, SAMPLED_LR = 1500, 0.1
SAMPLES_PER_STEP = 256  # sequences per run and step in sampled mode (the RLOO group)
CLIP_RANGE = 0.2


@dataclass(frozen=True)
class ToyWorld:
    """One prompt, every response enumerated; all tensors float64 where they hold numbers."""

    sequences: Tensor  # [S, L] token ids of every sequence, S = V^L
    contexts: Tensor  # [S, L] id of the prefix each token is predicted from
    ref_logits: Tensor  # [C, V] reference next-token logits, one row per prefix
    rewards: dict[str, Tensor]  # reward name -> [S]

    def ref_log_probs(self) -> Tensor:
        """log pi_ref of every sequence, [S]."""
        return sequence_log_probs(self.ref_logits, self)


def make_world(vocab_size: int = 4, length: int = 4, seed: int = 0) -> ToyWorld:
    """Build the world: all sequences, prefix ids, a random reference table and both rewards."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = vocab_size**length
    powers = vocab_size ** torch.arange(length - 1, -1, -1)
    sequences = torch.arange(num_seqs).unsqueeze(-1) // powers % vocab_size
    # Prefix y[:t] gets id offset[t] + (y[:t] read as a base-V number): one table row per prefix.
    offsets = torch.tensor([sum(vocab_size**j for j in range(t)) for t in range(length)])
    prefix_values = torch.stack(
        [(sequences[:, :t] * (vocab_size ** torch.arange(t - 1, -1, -1))).sum(-1) for t in range(length)],
        dim=1,
    )
    contexts = offsets + prefix_values
    num_contexts = int(offsets[-1]) + vocab_size ** (length - 1)
    ref_logits = torch.randn(num_contexts, vocab_size, generator=gen, dtype=torch.float64)
    # Continuous reward: per-position token scores plus a bigram interaction, so r is injective.
    unigram = torch.randn(length, vocab_size, generator=gen, dtype=torch.float64)
    bigram = 0.5 * torch.randn(vocab_size, vocab_size, generator=gen, dtype=torch.float64)
    token_scores = unigram[torch.arange(length), sequences].sum(-1)
    pair_scores = bigram[sequences[:, :-1], sequences[:, 1:]].sum(-1)
    distinct = token_scores + pair_scores
    # Lexicon-like reward: (#token 0) - (#token V-1), an integer in [-L, L] shared by many sequences.
    tied = ((sequences == 0).sum(-1) - (sequences == vocab_size - 1).sum(-1)).double()
    return ToyWorld(sequences, contexts, ref_logits, {"distinct": distinct, "tied": tied})


def token_log_probs(logits: Tensor, world: ToyWorld) -> Tensor:
    """Per-token log-probs of every sequence under policy tables `logits` [..., C, V] -> [..., S, L]."""
    return torch.log_softmax(logits, -1)[..., world.contexts, world.sequences]


def sequence_log_probs(logits: Tensor, world: ToyWorld) -> Tensor:
    """log pi(y) of every sequence under policy tables `logits` [..., C, V] -> [..., S]."""
    return token_log_probs(logits, world).sum(-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Exact KL(p || q) over the last dim from log-probabilities, with 0 log 0 = 0."""
    terms = torch.exp(log_p) * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


def expected_value(log_p: Tensor, values: Tensor) -> Tensor:
    """E_p[values] over the last dim."""
    return (torch.exp(log_p) * values).sum(-1)


def kl_rl_optimum(ref_log_probs: Tensor, reward: Tensor, beta: float | Tensor) -> Tensor:
    """Closed-form argmax of E_pi[R] - beta KL(pi || pi_ref) in the complete family: pi_ref e^(R/beta) / Z."""
    return torch.log_softmax(ref_log_probs + reward / beta, -1)


def reference_cache(world: ToyWorld, num_refs: int, gen: torch.Generator) -> Tensor:
    """Indices of `num_refs` sequences sampled from pi_ref (the cache every method shares)."""
    return torch.multinomial(torch.exp(world.ref_log_probs()), num_refs, replacement=True, generator=gen)


def best_of_n(rewards: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Best sample of each consecutive group of n cache rewards, ties broken uniformly; positions [M // n]."""
    groups = rewards[: rewards.numel() // n * n].reshape(-1, n)
    # Among maxima, the largest uniform key wins: a uniform choice among the tied samples.
    keys = torch.where(
        groups == groups.max(-1, keepdim=True).values, torch.rand(groups.shape, generator=gen), -1.0
    )
    return keys.argmax(-1) + torch.arange(groups.shape[0]) * n


@contextmanager
def _single_thread() -> Iterator[None]:
    # The tensors here are tiny: intra-op threads only add synchronisation, which costs 10-20x on a
    # loaded machine. The setting is process-wide, so it is restored on the way out.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(init: Tensor, loss_fn: Callable[[Tensor], Tensor], lr: float, steps: int) -> Tensor:
    """Adam on policy tables from `init`; runs stacked in the leading dim train independently."""
    logits = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    # Linear decay to 0 averages out the noise of sampled gradients at the end.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    with _single_thread():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(logits).backward()
            optimizer.step()
            schedule.step()
    return logits.detach()


def train_rl(world: ToyWorld, rewards: Tensor, betas: Tensor, sampled: bool, gen: torch.Generator) -> Tensor:
    """Maximise E_pi[R_i] - beta_i KL(pi || pi_ref) for R runs at once; `rewards` [R, S], `betas` [R].

    Exact mode differentiates the enumerated objective. Sampled mode is the trainer's recipe: sequence
    score plus per-token k1 KL penalty, RLOO advantages over the samples of each run, PPO loss.
    Returns the trained tables [R, C, V], starting from pi_ref.
    """
    ref_tokens = token_log_probs(world.ref_logits, world)
    ref_seq = ref_tokens.sum(-1)
    init = world.ref_logits.expand(len(rewards), -1, -1)

    def exact_loss(logits: Tensor) -> Tensor:
        log_p = sequence_log_probs(logits, world)
        return -(expected_value(log_p, rewards) - betas * kl_divergence(log_p, ref_seq)).sum()

    def sampled_loss(logits: Tensor) -> Tensor:
        tokens = token_log_probs(logits, world)
        with torch.no_grad():
            ids = torch.multinomial(
                torch.exp(tokens.sum(-1)), SAMPLES_PER_STEP, replacement=True, generator=gen
            )
        logp = tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])).flatten(0, 1)
        mask = torch.ones_like(logp)
        kl = kl_penalty(logp.detach(), ref_tokens[ids].flatten(0, 1))
        beta = betas.repeat_interleave(SAMPLES_PER_STEP).unsqueeze(-1)
        # The trainer's advantage function; unwhitened, since whitening would pool the R runs' scales.
        advantages = rloo_advantages(
            rewards.gather(1, ids).flatten(), kl, mask, beta, SAMPLES_PER_STEP, whiten_advantages=False
        )
        return ppo_policy_loss(logp, logp.detach(), advantages, mask, CLIP_RANGE, world.sequences.shape[1])[0]

    if sampled:
        return _fit(init, sampled_loss, SAMPLED_LR, SAMPLED_STEPS)
    return _fit(init, exact_loss, EXACT_LR, EXACT_STEPS)


def train_sft(world: ToyWorld, datasets: list[Tensor]) -> Tensor:
    """Full-batch SFT (mean token NLL) of one table per dataset of sequence indices; returns [D, C, V]."""
    init = world.ref_logits.expand(len(datasets), -1, -1)

    def loss(logits: Tensor) -> Tensor:
        tokens = token_log_probs(logits, world)
        length = world.sequences.shape[1]
        return sum(
            sft_nll(tokens[i, ids], torch.ones_like(tokens[i, ids]), length) for i, ids in enumerate(datasets)
        )

    return _fit(init, loss, EXACT_LR, EXACT_STEPS)


def _row(
    name: str, n: int, method: str, beta: float | None, log_p: Tensor, log_bon: Tensor, world: ToyWorld
) -> dict:
    return {
        "rewards": name,
        "n": n,
        "method": method,
        "beta": beta,
        "kl_to_bon": kl_divergence(log_p, log_bon).item(),
        "reward": expected_value(log_p, world.rewards[name]).item(),
        "kl_to_ref": kl_divergence(log_p, world.ref_log_probs()).item(),
    }


def run_toy(ns: Sequence[int] = (2, 4, 8, 16), seed: int = 0, sampled: bool = False) -> list[dict]:
    """Train every method for each N and reward in the toy world; one exactly evaluated row per method.

    `sampled` trains the RL runs (vBoN, KL-RL) with sampled policy gradients instead of exact expectations;
    BoN-SFT is full-batch on its finite data set either way. Seeded: the same arguments give the same rows.
    Row keys: `rewards` (reward name), `n`, `method`, `beta` (KL coefficient, None for SFT and BoN),
    `kl_to_bon` = KL(pi || pi_BoN), `reward` = E_pi[r], `kl_to_ref` = KL(pi || pi_ref).
    "KL-RL" is the best beta of the sweep by KL(pi || pi_BoN), beta given in reward units.
    """
    # Data (cache, BoN tie-breaks) and policy sampling draw from separate streams, so the data and the
    # exact-mode rows do not depend on `sampled`.
    data_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator().manual_seed(seed + 1)
    world = make_world(seed=seed)
    ref_seq = world.ref_log_probs()
    cache = reference_cache(world, NUM_REFS, data_gen)
    rows = []
    for name, reward in world.rewards.items():
        scale = torch.sqrt(expected_value(ref_seq, (reward - expected_value(ref_seq, reward)) ** 2)).item()
        kl_rl_betas = [scale * b for b in KL_RL_BETAS]
        sft_data = [cache[best_of_n(reward[cache], n, data_gen)] for n in ns]
        vbon_rewards = [vbon_reward(reward, reward[cache], n, est) for n in ns for est in ("bound", "exact")]
        vbon_betas = [vbon_beta(n) for n in ns for _ in range(2)]
        rl_rewards = torch.stack(vbon_rewards + [reward] * len(kl_rl_betas))
        rl_betas = torch.tensor(vbon_betas + kl_rl_betas, dtype=torch.float64)
        rl_log_p = sequence_log_probs(train_rl(world, rl_rewards, rl_betas, sampled, sample_gen), world)
        sft_log_p = sequence_log_probs(train_sft(world, sft_data), world)
        kl_rl_log_p = rl_log_p[2 * len(ns) :]
        for i, n in enumerate(ns):
            log_bon = bon_log_probs(ref_seq, reward, n)
            best = int(torch.argmin(kl_divergence(kl_rl_log_p, log_bon)))
            rows += [
                _row(name, n, "vBoN-bound", vbon_beta(n), rl_log_p[2 * i], log_bon, world),
                _row(name, n, "vBoN-exact", vbon_beta(n), rl_log_p[2 * i + 1], log_bon, world),
                _row(name, n, "KL-RL", kl_rl_betas[best], kl_rl_log_p[best], log_bon, world),
                _row(name, n, "BoN-SFT", None, sft_log_p[i], log_bon, world),
                _row(name, n, "BoN", None, log_bon, log_bon, world),
            ]
    return rows


def format_toy_table(rows: list[dict]) -> str:
    """The rows of `run_toy` as a fixed-width text table."""
    header = (
        f"{'rewards':<9} {'N':>3}  {'method':<11} {'beta':>8}  "
        f"{'KL(pi||BoN)':>11} {'reward':>8} {'KL(pi||ref)':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        beta = "" if row["beta"] is None else f"{row['beta']:.4g}"
        lines.append(
            f"{row['rewards']:<9} {row['n']:>3}  {row['method']:<11} {beta:>8}  "
            f"{row['kl_to_bon']:>11.4f} {row['reward']:>8.4f} {row['kl_to_ref']:>11.4f}"
        )
    return "\n".join(lines)
