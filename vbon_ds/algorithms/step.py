"""The update every algorithm shares: passes over the experience in minibatches of micro-batches, and for
each micro-batch the algorithm's losses (registry.py), each followed by its engine's backward and step.

Every rank must take part in every backward and step (ZeRO collectives), so a loss that is not finite on
some rank becomes a zero gradient on every rank instead of a skipped call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vbon_ds.algorithms.onpolicy import Experience, LossFn
from vbon_ds.config import ExperimentConfig
from vbon_ds.engines import distributed
from vbon_ds.engines.build import Engines

LossTerms = Sequence[tuple[str, LossFn]]
"""(engine name in `Engines`, its loss), in the order they run on each micro-batch."""


def update(
    exp: Experience,
    engines: Engines,
    cfg: ExperimentConfig,
    terms: LossTerms,
    epochs: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """`epochs` passes over the experience in a random order, each split into minibatches (one optimizer step
    each) of micro-batches (one forward/backward each); returns the mean of each stat and the number of
    micro-batches whose loss was not finite (their gradient was zeroed)."""
    sizes = engines.sizes
    per_rank_minibatch = sizes.minibatch_samples // sizes.world_size
    totals: dict[str, list[float]] = {}
    skipped = 0
    for _ in range(epochs):
        order = torch.randperm(len(exp), generator=generator)
        for mb_start in range(0, order.numel(), per_rank_minibatch):
            minibatch = order[mb_start : mb_start + per_rank_minibatch]
            for mu_start in range(0, minibatch.numel(), sizes.micro_batch_per_rank):
                index = minibatch[mu_start : mu_start + sizes.micro_batch_per_rank]
                stats, ok = micro_step(exp.micro_batch(index), engines, cfg, terms)
                skipped += not ok
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
    out = {key: float(np.mean(values)) for key, values in totals.items()}
    out["train/skipped_micro_batches"] = float(skipped)
    return out


def micro_step(
    micro: Experience, engines: Engines, cfg: ExperimentConfig, terms: LossTerms
) -> tuple[dict[str, float], bool]:
    """Each loss of the algorithm on one micro-batch, then its engine's backward and step; (the losses'
    stats, whether every loss was finite on every rank)."""
    stats: dict[str, float] = {}
    ok = True
    for engine_name, loss_fn in terms:
        loss, loss_stats, graph = loss_fn(engines, cfg, micro)
        ok = backward_and_step(getattr(engines, engine_name), loss, graph) and ok
        stats.update(loss_stats)
    return stats, ok


def backward_and_step(engine: object, loss: torch.Tensor, like: torch.Tensor) -> bool:
    """Backward and (at an accumulation boundary) optimizer step; False when the loss was not finite on some
    rank. Every rank must take part in backward/step (ZeRO collectives): a bad loss becomes a zero gradient
    through `like`, a tensor of the same graph."""
    ok = all_finite(loss)
    engine.backward(loss if ok else 0.0 * like.nan_to_num().sum())
    engine.step()
    return ok


def all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank (a collective)."""
    return not any_rank(not bool(torch.isfinite(value).all()))


def any_rank(flag: bool) -> bool:
    return distributed.all_reduce_max(int(flag)) > 0


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each stat averaged over the ranks (every rank must call it with the same keys)."""
    gathered = distributed.all_gather_object(stats)
    return {key: float(np.mean([g[key] for g in gathered])) for key in stats}
