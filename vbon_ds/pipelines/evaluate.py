"""`vbon evaluate`: the trained policy against the reference and BoN(N) on the evaluation prompts.

    reference:  the M cached answers per prompt: mean reward, KL 0, win rate 1/2 against itself
    BoN(n):     unbiased order-statistic estimates from the same cache for n = 1, 2, 4, ... <= M:
                expected reward, win rate over a reference answer, and the KL bound log n - (n-1)/n
    policy:     generation.eval_samples fresh answers per prompt at each generation.eval_temperatures
                value: mean reward, KL(pi_theta || pi_ref) estimated from its own samples (both at that
                temperature), mean log F_hat and win rate against the cached reference answers
Writes eval/results.json, eval/results.md and eval/reward_kl.png under train.output_dir.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vbon_ds import bon
from vbon_ds.config import ExperimentConfig
from vbon_ds.data import load_prompts
from vbon_ds.engines import distributed
from vbon_ds.engines.checkpoint import read_trainer_state, resume_checkpoint
from vbon_ds.engines.policy import PolicyEngine
from vbon_ds.engines.weights import load_trained_weights
from vbon_ds.errors import writing
from vbon_ds.pipelines.engines import Engines, build_engines
from vbon_ds.pipelines.experience import TokenBatch, policy_logprobs
from vbon_ds.pipelines.rollout import sample_and_score, shard_evenly
from vbon_ds.refcache import RefCache, open_refcache


@dataclass
class EvalRow:
    """One line of the evaluation table."""

    method: str
    temperature: float | None
    reward: float
    kl: float
    win_rate: float
    log_f: float | None = None
    kl_is_bound: bool = False


def win_rate_vs_reference(rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """Per answer: P(its reward beats a cached reference answer's), ties counting half. [B] and [B, M]."""
    below = (ref_rewards < rewards[:, None]).double().mean(1)
    tied = (ref_rewards == rewards[:, None]).double().mean(1)
    return below + 0.5 * tied


def bon_rows(ref_rewards: torch.Tensor, n_main: int) -> list[EvalRow]:
    """Reference (BoN(1)) and BoN(n) for powers of two up to M, plus n_main; from the cache alone."""
    m = ref_rewards.shape[1]
    ns = sorted({n for n in [2**i for i in range(m.bit_length())] + [n_main] if n < m})
    rows = []
    for n in ns:
        rows.append(
            EvalRow(
                method="reference" if n == 1 else f"BoN({n})",
                temperature=None,
                reward=bon.expected_bon_reward(ref_rewards, n).mean().item(),
                kl=bon.bon_kl_bound(n),
                win_rate=bon.bon_win_rate(ref_rewards, n).mean().item(),
                kl_is_bound=n > 1,
            )
        )
    return rows


@torch.no_grad()
def policy_rows(
    cfg: ExperimentConfig, engines: Engines, policy: PolicyEngine, cache: RefCache, label: str = "policy"
) -> list[EvalRow]:
    """Sample `policy` generation.eval_samples times per evaluation prompt at every eval temperature."""
    prompts = load_prompts(cfg.data, "eval")
    k = cfg.generation.eval_samples
    mine, real = shard_evenly(list(range(len(prompts))), distributed.rank(), distributed.world_size())
    prompt_texts = [prompts.texts[i] for i in mine for _ in range(k)]
    real_ids = [prompts.ids[i] for i in mine[:real] for _ in range(k)]
    size = cfg.train.micro_batch_size
    rows = []
    for temperature in cfg.generation.eval_temperatures:
        scored = sample_and_score(
            policy, engines.scorer, engines.tokenizer, prompt_texts, cfg.generation,
            max_prompt_tokens=cfg.data.max_prompt_tokens, temperature=temperature,
        )  # fmt: skip
        batch = TokenBatch.of(scored.rollout)
        logp = policy_logprobs(policy, batch, temperature, size)
        ref_logp = policy_logprobs(engines.reference, batch, temperature, size)
        kl = ((logp - ref_logp) * batch.response_mask).sum(1)
        rewards = scored.rewards[: real * k].to(torch.float64)
        refs = cache.rewards_for(real_ids).to(torch.float64)
        local = {
            "reward": rewards.tolist(),
            "kl": kl[: real * k].tolist(),
            "win": win_rate_vs_reference(rewards, refs).tolist(),
            "log_f": bon.log_cdf(rewards, refs, presorted=True).tolist(),
        }
        gathered = distributed.all_gather_object(local)
        mean = {key: statistics.fmean(v for g in gathered for v in g[key]) for key in local}
        rows.append(EvalRow(label, temperature, mean["reward"], mean["kl"], mean["win"], mean["log_f"]))
    return rows


def format_table(rows: list[EvalRow]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| method | temperature | mean reward | KL(pi \\|\\| pi_ref) | win rate vs ref | mean log F |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        temp = "-" if row.temperature is None else f"{row.temperature:g}"
        kl = f"<= {row.kl:.3f}" if row.kl_is_bound else f"{row.kl:.3f}"
        log_f = "-" if row.log_f is None else f"{row.log_f:.3f}"
        lines.append(f"| {row.method} | {temp} | {row.reward:.4f} | {kl} | {row.win_rate:.3f} | {log_f} |")
    return "\n".join(lines)


def plot_reward_kl(rows: list[EvalRow], path: Path) -> None:
    """Reward against KL: the BoN curve (KL at its bound) and the policy points, one per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cache_rows = [r for r in rows if r.temperature is None]
    ax.plot(
        [r.kl for r in cache_rows],
        [r.reward for r in cache_rows],
        "o-",
        color="gray",
        label="BoN(n) (KL bound)",
    )
    for r in cache_rows:
        ax.annotate(r.method, (r.kl, r.reward), fontsize=7, xytext=(3, -8), textcoords="offset points")
    for label in dict.fromkeys(r.method for r in rows if r.temperature is not None):
        mine = [r for r in rows if r.method == label]
        ax.plot([r.kl for r in mine], [r.reward for r in mine], "s--", label=f"{label} (by temperature)")
        for r in mine:
            ax.annotate(
                f"T={r.temperature:g}",
                (r.kl, r.reward),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("KL(pi || pi_ref)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cfg: ExperimentConfig, rows: list[EvalRow]) -> Path:
    """results.json, results.md and reward_kl.png in output_dir/eval (rank 0); returns the directory."""
    out = Path(cfg.train.output_dir) / "eval"
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        with writing(out / "results.json"):
            (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        with writing(out / "results.md"):
            (out / "results.md").write_text(format_table(rows) + "\n")
        with writing(out / "reward_kl.png"):
            plot_reward_kl(rows, out / "reward_kl.png")
    return out


def evaluate(cfg: ExperimentConfig, engines: Engines) -> list[EvalRow]:
    """The whole table for engines that are already built (actor, reference and scorer; the demo reuses
    the trainer's)."""
    cache = open_refcache(cfg)
    eval_ids = load_prompts(cfg.data, "eval").ids
    rows = bon_rows(cache.rewards_for(eval_ids).double(), cfg.vbon.n)
    rows += policy_rows(cfg, engines, engines.reference, cache, label="reference (fresh)")
    rows += policy_rows(cfg, engines, engines.actor, cache)
    return rows


def run(cfg: ExperimentConfig) -> list[EvalRow]:
    """Evaluate the latest checkpoint of this config's run (or the untrained actor if there is none).

    Inference engines only: no critic, no optimizer, no TensorBoard writer; the actor's weights are read
    from the checkpoint files, so any world size and any training batch sizes work.
    """
    engines = build_engines(cfg, actor="frozen", reference=True, scorer=True)
    root = Path(cfg.train.output_dir) / "checkpoints"
    checkpoint = distributed.from_main(lambda: resume_checkpoint(root))
    steps = 0
    if checkpoint is not None:
        load_trained_weights(engines.actor, checkpoint / "actor")
        steps = int(read_trainer_state(checkpoint)["step"])
    rows = evaluate(cfg, engines)
    out = write_report(cfg, rows)
    if distributed.is_main():
        print(f"evaluation after {steps} training steps ({out}):\n{format_table(rows)}")
    return rows
