"""`vbon train`: vBoN (or the KL-RL baseline) on DeepSpeed engines, one recipe-like step at a time.

Per step (DESIGN.md):
    rollout:    the actor samples K answers to each of this rank's prompts
    score:      reward model or function r(x, y) -> objective reward: log F_hat(r) from the reference cache
                (vbon), the tie-aware log(pi_BoN/pi_ref)/(N-1) (vbon_exact) or r itself (kl_rl)
    logprobs:   actor (rollout-time) and reference log-probs of the response tokens, fused kernel
    advantages: PPO (per-token KL penalty, GAE on critic values) or RLOO (leave-one-out over the K answers)
    update:     ppo_epochs x minibatches of clipped policy-gradient steps (and value steps for PPO)
    monitor:    TensorBoard scalars, sample answers, progress bar; checkpoint every K steps
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vbon_ds import bon, losses
from vbon_ds.batching import BatchSizes, batch_sizes
from vbon_ds.config import ExperimentConfig, config_to_dict
from vbon_ds.data import PromptSampler, load_prompts
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import (
    build_actor,
    build_critic,
    build_reference,
    build_reward,
    load_policy_tokenizer,
)
from vbon_ds.engines.checkpoint import export_hf, load_checkpoint, resume_checkpoint, save_checkpoint
from vbon_ds.engines.policy import Rollout
from vbon_ds.errors import VbonError
from vbon_ds.kernels import set_backend
from vbon_ds.models import check_models_fit
from vbon_ds.monitor import Monitor
from vbon_ds.pipelines.rollout import in_micro_batches, rollout_logprobs, sample_and_score
from vbon_ds.preemption import StopRequest
from vbon_ds.refcache import FINGERPRINT_FILE, RefCache, open_refcache, refcache_dir
from vbon_ds.runlock import run_lock


def objective_beta(cfg: ExperimentConfig) -> float:
    """The KL coefficient: vbon.beta when set, else 1/(N-1) for the vBoN objectives."""
    if cfg.vbon.beta is not None:
        return cfg.vbon.beta
    return bon.vbon_beta(cfg.vbon.n)


def objective_reward(
    cfg: ExperimentConfig,
    scores: torch.Tensor,
    ref_rewards: torch.Tensor | None,
    ended_with_eos: torch.Tensor,
) -> torch.Tensor:
    """The scalar each answer is credited with: raw r (kl_rl, reward.missing_eos_score already in it) or a
    vBoN reward from the cached rewards (with missing_eos_score set, cut-off answers get the lowest one)."""
    if cfg.vbon.objective == "kl_rl":
        return scores
    estimator = "bound" if cfg.vbon.objective == "vbon" else "exact"
    cut_off = ended_with_eos if cfg.reward.missing_eos_score is not None else None
    return bon.vbon_reward(scores, ref_rewards, cfg.vbon.n, estimator, ended_with_eos=cut_off)


@dataclass
class Experience:
    """One step's rollout with everything the update needs, all [B, R] per token or [B] per answer."""

    rollout: Rollout
    logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    values: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def rows(self, index: torch.Tensor) -> dict[str, Any]:
        """The tensors of the answers in `index` (a micro-batch), response padding trimmed."""
        width = int(self.mask[index].sum(1).max().clamp(min=1))
        p = self.rollout.prompt_length
        out = {
            "sequences": self.rollout.sequences[index, : p + width],
            "attention_mask": self.rollout.attention_mask[index, : p + width],
            "mask": self.mask[index, :width],
            "logprobs": self.logprobs[index, :width],
            "advantages": self.advantages[index, :width],
        }
        if self.returns is not None and self.values is not None:
            out["returns"] = self.returns[index, :width]
            out["values"] = self.values[index, :width]
        return out


class Trainer:
    """Owns the engines, the data order and the step counter; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        distributed.init_distributed()
        set_backend(cfg.model.logprob_backend)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.sizes: BatchSizes = batch_sizes(cfg, self.world)
        self.out = Path(cfg.train.output_dir)
        self.beta = objective_beta(cfg)
        self._seed_everything(cfg.train.seed)

        self.prompts = load_prompts(cfg.data, "train")
        self.sampler = PromptSampler(len(self.prompts), cfg.train.seed)
        self.cache = self._open_cache()
        self.tokenizer = load_policy_tokenizer(cfg)
        self.actor = build_actor(cfg, self.sizes, self.tokenizer)
        self.reference = build_reference(cfg, self.sizes, self.tokenizer, self.actor)
        self.scorer = build_reward(cfg, self.sizes)
        self.critic = build_critic(cfg, self.sizes, self.tokenizer) if cfg.algo.name == "ppo" else None
        self.step = 0
        self.bad_steps = 0
        self.monitor = Monitor(self.out / "tensorboard", enabled=cfg.logging.tensorboard and self.rank == 0)
        self._resume()

    # ------------------------------------------------------------ setup

    def _seed_everything(self, seed: int) -> None:
        # Ranks sample different answers: the seed is offset by rank, the data order is not.
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

    def _open_cache(self) -> RefCache | None:
        root = refcache_dir(self.cfg)
        if not (root / FINGERPRINT_FILE).exists():
            if self.cfg.vbon.objective == "kl_rl":
                return None  # KL-RL needs no F; train/log_F is then not logged
            raise VbonError(
                f"no reference cache in {root}: run `vbon refcache --config ...` with this config first "
                f"(vbon.objective={self.cfg.vbon.objective} needs F_hat from M reference rewards per prompt)"
            )
        return open_refcache(self.cfg)

    def _engines(self) -> dict[str, Any]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def _resume(self) -> None:
        self.run_id = uuid.uuid4().hex  # a resumed run keeps the id of the run it continues
        resume = self.cfg.train.resume
        if resume == "none":
            return
        root = self.out / "checkpoints" if resume == "auto" else Path(resume)
        # The newest verified checkpoint; a VbonError when some exist but none is usable.
        path = distributed.broadcast_object(resume_checkpoint(root) if distributed.is_main() else None)
        if path is None:
            if resume != "auto":
                raise VbonError(f"train.resume: no checkpoint in {root}")
            return
        state = load_checkpoint(path, self._engines())  # also restores this rank's RNG streams
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.run_id = state.get("run_id", self.run_id)
        self.sampler.load_state_dict(state["sampler"])
        if distributed.is_main():
            print(f"train: resumed from {path} at step {self.step}")

    def save(self) -> None:
        """Checkpoint every trainable engine plus the data order and counters (RNG states: checkpoint.py)."""
        state = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "sampler": self.sampler.state_dict(),
            "config": config_to_dict(self.cfg),
            "run_id": self.run_id,
        }
        save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self._engines(),
            state,
            keep_last=self.cfg.train.keep_checkpoints,
            run_id=self.run_id,  # saving a step this run already saved (e.g. the last one) is a no-op
        )

    # ------------------------------------------------------------ one step

    def _this_ranks_prompts(self) -> list[int]:
        batch = self.sampler.next_batch(self.sizes.prompts_per_step)
        per_rank = self.sizes.prompts_per_rank
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    @torch.no_grad()
    def make_experience(self, prompt_index: list[int]) -> Experience:
        """Rollout, score, objective reward, log-probs, KL and advantages for this rank's prompts."""
        cfg, k = self.cfg, self.cfg.algo.samples_per_prompt
        ids = [self.prompts.ids[i] for i in prompt_index for _ in range(k)]
        texts = [self.prompts.texts[i] for i in prompt_index for _ in range(k)]
        t0 = time.perf_counter()
        scored = sample_and_score(
            self.actor,
            self.scorer,
            self.tokenizer,
            texts,
            cfg.generation,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
        )
        rollout = scored.rollout
        scores = scored.scores.to(rollout.sequences.device)
        t_rollout = time.perf_counter() - t0
        bad = sorted({prompt_index[j // k] for j in (~torch.isfinite(scores)).nonzero().flatten().tolist()})
        if bad:
            named = ", ".join(f"prompt {i} ({self.prompts.ids[i]!r})" for i in bad[:5])
            raise _NonFinite(
                f"reward is not finite for {named}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
        ref_rewards = self.cache.rewards_for(ids).to(scores.device) if self.cache is not None else None
        reward = objective_reward(cfg, scores, ref_rewards, rollout.ended_with_eos)

        t0 = time.perf_counter()
        size, temperature = cfg.train.micro_batch_size, cfg.generation.temperature
        logp, entropy = rollout_logprobs(self.actor, rollout, temperature, size, with_entropy=True)
        ref_logp = rollout_logprobs(self.reference, rollout, temperature, size)
        mask = rollout.response_mask
        kl = losses.kl_penalty(logp, ref_logp, cfg.algo.kl_estimator) * mask
        t_logprobs = time.perf_counter() - t0

        values = returns = None
        if self.critic is not None:
            values = in_micro_batches(
                lambda s, m: self.critic.values(s, m, rollout.prompt_length), rollout, size
            )
            token_rewards = losses.shape_rewards(reward, kl, mask, self.beta)
            advantages, returns = losses.gae(token_rewards, values, mask, cfg.algo.gamma, cfg.algo.lam)
        else:
            # RLOO: the sequence reward already pays the whole KL penalty, as in the per-token form summed.
            sequence_reward = reward - self.beta * kl.sum(1)
            advantages = losses.rloo_advantages(sequence_reward, k).unsqueeze(1).expand_as(logp) * mask
        if cfg.algo.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)

        lengths = mask.sum(1).float()
        stats = {
            "train/reward": scores.mean().item(),
            "train/objective_reward": reward.mean().item(),
            "train/kl": (logp - ref_logp).mul(mask).sum(1).mean().item(),
            "train/entropy": losses.masked_mean(entropy, mask).item(),
            "train/response_length": lengths.mean().item(),
            "train/eos_fraction": rollout.ended_with_eos.float().mean().item(),
            "time/rollout": t_rollout,
            "time/logprobs": t_logprobs,
        }
        if self.cache is not None:
            stats["train/log_F"] = bon.log_cdf(scores, ref_rewards).mean().item()
        if self.rank == 0 and cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
            samples = [
                f"**{texts[j]}**{scored.texts[j]}  (r={scores[j]:.3f})" for j in range(min(4, len(texts)))
            ]
            self.monitor.text("samples", "\n\n".join(samples), self.step)
        return Experience(rollout, logp, advantages, returns, values, stats)

    def update(self, exp: Experience) -> dict[str, float]:
        """ppo_epochs x num_minibatches optimizer steps on the actor (and critic), micro-batched."""
        cfg, sizes = self.cfg, self.sizes
        per_rank_minibatch = sizes.minibatch_samples // self.world
        generator = torch.Generator().manual_seed(cfg.train.seed * 100_003 + self.step)
        totals: dict[str, list[float]] = {}
        skipped = 0
        for _ in range(cfg.algo.ppo_epochs):
            order = torch.randperm(exp.mask.shape[0], generator=generator)
            for mb_start in range(0, order.numel(), per_rank_minibatch):
                minibatch = order[mb_start : mb_start + per_rank_minibatch]
                for mu_start in range(0, minibatch.numel(), sizes.micro_batch_per_rank):
                    rows = exp.rows(minibatch[mu_start : mu_start + sizes.micro_batch_per_rank])
                    stats, ok = self._micro_step(rows, exp.rollout.prompt_length)
                    skipped += not ok
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(value)
        out = {key: float(np.mean(values)) for key, values in totals.items()}
        out["train/skipped_micro_batches"] = float(skipped)
        return out

    def _micro_step(self, rows: dict[str, Any], prompt_length: int) -> tuple[dict[str, float], bool]:
        cfg = self.cfg
        new_logp = self.actor.response_logprobs(
            rows["sequences"], rows["attention_mask"], prompt_length, cfg.generation.temperature
        )
        loss, pg_stats = losses.ppo_policy_loss(
            new_logp, rows["logprobs"], rows["advantages"], rows["mask"], cfg.algo.clip_range
        )
        ok = _all_finite(loss)
        # Every rank must take part in backward/step (ZeRO collectives): a bad loss becomes a zero gradient.
        self.actor.backward(loss if ok else 0.0 * new_logp.nan_to_num().sum())
        self.actor.step()
        stats = {
            "train/loss": loss.item(),
            "train/clip_frac": pg_stats["clip_frac"].item(),
            "train/approx_kl": pg_stats["approx_kl"].item(),
        }
        if self.critic is not None:
            values = self.critic.values(rows["sequences"], rows["attention_mask"], prompt_length)
            v_loss, v_stats = losses.value_loss(
                values, rows["values"], rows["returns"], rows["mask"], cfg.algo.value_clip_range
            )
            v_ok = _all_finite(v_loss)
            self.critic.backward(cfg.algo.value_coef * v_loss if v_ok else 0.0 * values.nan_to_num().sum())
            self.critic.step()
            ok = ok and v_ok
            stats.update(
                {"train/value_loss": v_loss.item(), "train/vf_clip_frac": v_stats["vf_clip_frac"].item()}
            )
        return stats, ok

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        cfg = self.cfg
        stop = StopRequest()
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            desc="train",
            disable=self.rank != 0 or not cfg.logging.progress_bar,
        )
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                prompt_index = self._this_ranks_prompts()
                try:
                    exp = self.make_experience(prompt_index)
                    error = ""
                except _NonFinite as bad:
                    exp, error = None, str(bad)
                errors = [e for e in distributed.all_gather_object(error) if e]
                if errors:
                    self.step += 1
                    self._count_bad_step("; ".join(errors))
                    continue
                stats = {**exp.stats, **self.update(exp)}
                self.step += 1
                if stats["train/skipped_micro_batches"]:
                    self._count_bad_step(
                        f"non-finite loss in {stats['train/skipped_micro_batches']:.0f} micro-batches"
                    )
                else:
                    self.bad_steps = 0
                stats["train/lr"] = self.actor.current_lr()
                elapsed = time.perf_counter() - t0
                stats["time/step"] = elapsed
                stats["perf/samples_per_sec"] = self.sizes.rollout_samples / elapsed
                stats = _mean_over_ranks(stats)
                if self.step % cfg.logging.log_every == 0:
                    self.monitor.scalars(stats, self.step)
                bar.update(1)
                bar.set_postfix(reward=f"{stats['train/reward']:.3f}", kl=f"{stats['train/kl']:.3f}")
                stop_now = _any_rank(stop.requested)
                if stop_now or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                    self.save()
                if stop_now:
                    if distributed.is_main():
                        print(f"train: stop signal received; checkpoint saved at step {self.step}, exiting")
                    return
            self.save()
            export_hf(self.actor, self.tokenizer, self.out / "final")
        finally:
            stop.restore()
            bar.close()
            self.monitor.close()

    def _count_bad_step(self, reason: str) -> None:
        self.bad_steps += 1
        if distributed.is_main():
            print(f"train: step {self.step} skipped: {reason}")
        self.monitor.scalars({"train/skipped_steps": float(self.bad_steps)}, self.step)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise VbonError(
                f"{self.bad_steps} consecutive steps had non-finite rewards or losses (last: {reason}); "
                f"stopping (train.max_bad_steps={self.cfg.train.max_bad_steps})"
            )


class _NonFinite(Exception):
    """A rollout produced a NaN or infinite reward."""


def _all_finite(value: torch.Tensor) -> bool:
    return not _any_rank(not bool(torch.isfinite(value).all()))


def _any_rank(flag: bool) -> bool:
    return distributed.all_reduce_max(int(flag)) > 0


def _mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    gathered = distributed.all_gather_object(stats)
    return {key: float(np.mean([g[key] for g in gathered])) for key in stats}


def run(cfg: ExperimentConfig) -> Path:
    """Train, leave checkpoints and TensorBoard files under cfg.train.output_dir; return that directory."""
    distributed.init_distributed()
    with run_lock(cfg.train.output_dir, "vbon train"):  # also checks the directory before any work
        check_models_fit(cfg)
        Trainer(cfg).run()
    return Path(cfg.train.output_dir)
