"""`vbon train`: vBoN, the KL-RL baseline and the offline baselines on DeepSpeed engines, one step at a time.

A step (docs/design.md), the same for every algorithm of the registry (algorithms/registry.py):
    experience = algorithm.experience(...)     on-policy: rollout -> score -> logprobs -> advantages;
                                               offline: pairs from the reference cache -> reference logprobs
    update(experience, algorithm.losses, ...)  per micro-batch: each loss, then its engine's backward and step
A step that is skipped (non-finite reward or loss) still counts, logs, checkpoints on schedule and honours
a stop signal.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vbon_ds.algorithms.objective import needs_reference_rewards, objective_beta
from vbon_ds.algorithms.offline import ReferenceLogProbs
from vbon_ds.algorithms.onpolicy import Experience, NonFiniteReward, TrainingInputs
from vbon_ds.algorithms.registry import algorithm_of
from vbon_ds.algorithms.step import any_rank, mean_over_ranks, update
from vbon_ds.config import ExperimentConfig, config_to_dict
from vbon_ds.data.prompts import PromptSampler, load_prompts
from vbon_ds.data.refcache import RefCache, open_refcache, refcache_dir
from vbon_ds.data.refcache_fingerprint import FINGERPRINT_FILE
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines, build_engines
from vbon_ds.engines.checkpoint import export_hf, load_checkpoint, save_checkpoint
from vbon_ds.engines.checkpoint_layout import read_trainer_state, resume_checkpoint, step_dirs
from vbon_ds.engines.run_settings import (
    SETTINGS_KEY,
    check_resume_compatible,
    recorded_settings,
    weights_settings,
)
from vbon_ds.errors import VbonError
from vbon_ds.models.loading import check_models_fit
from vbon_ds.monitor import Monitor
from vbon_ds.preemption import StopRequest
from vbon_ds.runlock import run_lock


class Trainer:
    """The data order, the step counter and the loop; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: ExperimentConfig, engines: Engines | None = None) -> None:
        self.cfg = cfg
        self.rank = distributed.rank()
        self.out = Path(cfg.train.output_dir)
        self.algorithm = algorithm_of(cfg)
        self.settings = weights_settings(cfg, critic=self.algorithm.needs.critic)  # in every checkpoint
        self.resume_from = self._checkpoint_to_resume()  # checked against self.settings before models load
        self.engines = engines if engines is not None else build_engines(cfg, **asdict(self.algorithm.needs))
        self._seed_everything(cfg.train.seed)
        self.prompts = load_prompts(cfg.data, "train")
        self.sampler = PromptSampler(len(self.prompts), cfg.train.seed)
        self.reference_logps = ReferenceLogProbs()
        self.inputs = TrainingInputs(
            self.engines, cfg, self.prompts, self._open_cache(), self.reference_logps, objective_beta(cfg)
        )
        self.step = 0
        self.bad_steps = 0
        self.monitor = Monitor(self.out / "tensorboard", enabled=cfg.logging.tensorboard and self.rank == 0)
        self.resume()

    # ------------------------------------------------------------ setup, checkpoints

    def _seed_everything(self, seed: int) -> None:
        # Ranks sample different answers: the seed is offset by rank, the data order is not.
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

    def _open_cache(self) -> RefCache | None:
        root = refcache_dir(self.cfg)
        if not (root / FINGERPRINT_FILE).exists():
            on_policy = self.algorithm.on_policy
            if on_policy and not needs_reference_rewards(self.cfg):
                return None  # KL-RL needs no F; train/log_F is then not logged
            need = "F_hat needs" if on_policy else f"algo.name={self.cfg.algo.name} trains on"
            raise VbonError(
                f"no reference cache in {root}: run `vbon refcache --config ...` with this config first "
                f"({need} the M cached reference answers per prompt)"
            )
        return open_refcache(self.cfg)

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint train.resume names (auto: the latest verified one, if any), refused when it was
        written with other weights settings; None to start fresh."""
        resume = self.cfg.train.resume
        if resume == "none":
            if distributed.is_main():
                self._announce_fresh_start()
            return None
        root = self.out / "checkpoints" if resume == "auto" else Path(resume)
        return distributed.from_main(lambda: self._compatible_checkpoint(root, resume))

    def _compatible_checkpoint(self, root: Path, resume: str) -> Path | None:
        # The newest verified checkpoint; a VbonError when some exist but none is usable.
        path = resume_checkpoint(root)
        if path is None:
            if resume != "auto":
                raise VbonError(f"train.resume: no checkpoint in {root}")
            return None
        where = f"checkpoint {path}"
        check_resume_compatible(recorded_settings(read_trainer_state(path), where), self.settings, where)
        return path

    def _announce_fresh_start(self) -> None:
        """train.resume=none over an earlier run's files: say what this run replaces, before it does."""
        earlier = [d.name for d in step_dirs(self.out / "checkpoints")]
        final = self.out / "final"
        replaced = []
        if earlier:
            replaced.append(
                f"its earlier checkpoints ({', '.join(earlier)}) go as this run saves (a step it saves "
                f"replaces the old one of that number, and only the newest train.keep_checkpoints="
                f"{self.cfg.train.keep_checkpoints} are kept)"
            )
        if final.exists():
            replaced.append(f"{final} is replaced when this run finishes (kept until the new one is written)")
        if replaced:
            print(
                f"vbon: warning: train.resume=none starts fresh in {self.out}: {'; '.join(replaced)}",
                file=sys.stderr,
            )

    def resume(self) -> None:
        """Continue from the checkpoint chosen at start-up, if any."""
        self.run_id = uuid.uuid4().hex  # a resumed run keeps the id of the run it continues
        path = self.resume_from
        if path is None:
            return
        state = load_checkpoint(path, self.engines.trainable())  # also restores this rank's RNG streams
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.run_id = state.get("run_id", self.run_id)
        self.sampler.load_state_dict(state["sampler"])
        per_rank = state.get("reference_logps", [])
        if per_rank:  # this rank's own values when the world size is unchanged, else everybody's
            mine = per_rank[self.rank] if len(per_rank) == distributed.world_size() else _merged(per_rank)
            self.reference_logps.load_state_dict(mine)
        if distributed.is_main():
            print(f"train: resumed from {path} at step {self.step}")

    def save(self) -> None:
        """Checkpoint every trainable engine plus the data order and counters (RNG states: checkpoint.py);
        logs `time/save`, which with `time/step` sizes the Slurm signal's lead time."""
        t0 = time.perf_counter()
        state = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "sampler": self.sampler.state_dict(),
            "reference_logps": distributed.all_gather_object(self.reference_logps.state_dict()),
            "config": config_to_dict(self.cfg),
            SETTINGS_KEY: self.settings,
            "run_id": self.run_id,
        }
        save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self.engines.trainable(),
            state,
            keep_last=self.cfg.train.keep_checkpoints,
            run_id=self.run_id,  # saving a step this run already saved (e.g. the last one) is a no-op
        )
        self.monitor.scalars({"time/save": time.perf_counter() - t0}, self.step)

    # ------------------------------------------------------------ one step

    def this_ranks_prompts(self) -> list[int]:
        sizes = self.engines.sizes
        batch = self.sampler.next_batch(sizes.prompts_per_step)
        return batch[self.rank * sizes.prompts_per_rank : (self.rank + 1) * sizes.prompts_per_rank]

    def step_generator(self, purpose: int) -> torch.Generator:
        """A stream fixed by (seed, step, purpose), the same on every rank and after a resume."""
        return torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + self.step * 7 + purpose)

    def train_step(self) -> tuple[dict[str, float], str]:
        """Experience, then update; returns (stats, why the update was skipped: "" when it was not)."""
        t0 = time.perf_counter()
        try:
            experience = self.algorithm.experience(
                self.inputs, self.this_ranks_prompts(), self.step_generator(1)
            )
            self._log_samples(experience)
            problem = ""
        except NonFiniteReward as bad:
            experience, problem = None, str(bad)
        problems = [p for p in distributed.all_gather_object(problem) if p]
        if problems:
            return {}, "; ".join(problems)
        losses = self.algorithm.losses  # (engine, loss) pairs; update runs backward and step after each
        epochs, generator = self.cfg.algo.epochs, self.step_generator(0)
        stats = {**experience.stats, **update(experience, self.engines, self.cfg, losses, epochs, generator)}
        skipped = stats.pop("train/skipped_micro_batches")
        stats["train/lr"] = self.engines.actor.current_lr()
        stats["time/step"] = time.perf_counter() - t0
        if self.engines.samplers:  # generation.engine=vllm: pushing the actor's weights into its engine
            stats["time/weight_sync"] = self.engines.weight_sync_seconds()
        stats["perf/samples_per_sec"] = self.engines.sizes.rollout_samples / stats["time/step"]
        stats = mean_over_ranks(stats)
        return stats, f"non-finite loss in {skipped:.0f} micro-batches" if skipped else ""

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
                stats, problem = self.train_step()
                self.step += 1
                self._record(stats, problem, bar)
                stop_now = any_rank(stop.requested)
                if stop_now or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                    self.save()
                if stop_now:
                    if distributed.is_main():
                        print(f"train: stop signal received; checkpoint saved at step {self.step}, exiting")
                    return
            self.save()
            export_hf(self.engines.actor, self.engines.tokenizer, self.out / "final")
        finally:
            stop.restore()
            bar.close()
            self.monitor.close()

    def _record(self, stats: dict[str, float], problem: str, bar: tqdm) -> None:
        """Count a skipped step (stop after train.max_bad_steps in a row), log scalars, advance the bar."""
        if problem:
            self.bad_steps += 1
            stats = {**stats, "train/skipped_steps": float(self.bad_steps)}
            if distributed.is_main():
                print(f"train: step {self.step} skipped: {problem}")
        else:
            self.bad_steps = 0
        if stats and (problem or self.step % self.cfg.logging.log_every == 0):
            self.monitor.scalars(stats, self.step)
        bar.update(1)
        shown = ("train/reward", "train/kl") if "train/reward" in stats else ("train/loss",)
        bar.set_postfix({tag.split("/")[1]: f"{stats[tag]:.3f}" for tag in shown if tag in stats})
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise VbonError(
                f"{self.bad_steps} consecutive steps had non-finite rewards or losses (last: {problem}); "
                f"stopping (train.max_bad_steps={self.cfg.train.max_bad_steps})"
            )

    def _log_samples(self, experience: Experience) -> None:
        every = self.cfg.logging.sample_every
        if self.rank == 0 and every and self.step % every == 0 and experience.samples:
            shown = [f"**{p}**{r}  (r={v:.3f})" for p, r, v in experience.samples]
            self.monitor.text("samples", "\n\n".join(shown), self.step)


def _merged(per_rank: list[list]) -> list:
    return [triple for triples in per_rank for triple in triples]


def run(cfg: ExperimentConfig) -> Path:
    """Train, leave checkpoints and TensorBoard files under cfg.train.output_dir; return that directory."""
    distributed.init_distributed()
    with run_lock(cfg.train.output_dir, "vbon train"):  # also checks the directory before any work
        check_models_fit(cfg)
        Trainer(cfg).run()
    return Path(cfg.train.output_dir)
