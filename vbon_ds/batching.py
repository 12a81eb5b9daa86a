"""All batch-size arithmetic in one place: rollout, minibatch, micro-batch and gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

from vbon_ds.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class BatchSizes:
    """Sizes of one training step, global (all ranks) unless the name says per rank."""

    world_size: int
    prompts_per_step: int
    """Prompts drawn per step, all ranks together."""
    prompts_per_rank: int
    """Prompts each rank rolls out per step."""
    rollout_samples: int
    """Batch items per step, all ranks: prompts_per_step x (K rollouts or N-subsets) per prompt."""
    minibatch_samples: int
    """Answers per optimizer step, all ranks."""
    micro_batch_per_rank: int
    """Answers per forward/backward on one rank."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated per optimizer step on each rank."""


def batch_sizes(cfg: ExperimentConfig, world_size: int) -> BatchSizes:
    """Derive every batch size from the config, or explain which fields do not divide."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    train, algo = cfg.train, cfg.algo
    if train.prompts_per_step % world_size:
        raise ConfigError(
            f"train.prompts_per_step: {train.prompts_per_step} is not divisible "
            f"by the world size {world_size}"
        )
    rollout = train.prompts_per_step * algo.items_per_prompt
    if rollout % algo.num_minibatches:
        per_prompt = "algo.subsets_per_prompt" if algo.offline else "algo.samples_per_prompt"
        raise ConfigError(
            f"algo.num_minibatches: {algo.num_minibatches} does not divide the {rollout} answers per step "
            f"(train.prompts_per_step x {per_prompt})"
        )
    minibatch = rollout // algo.num_minibatches
    per_rank = minibatch // world_size
    if minibatch % world_size or per_rank % train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size: each rank gets {minibatch}/{world_size} answers per minibatch, "
            f"which is not a multiple of train.micro_batch_size={train.micro_batch_size}"
        )
    return BatchSizes(
        world_size=world_size,
        prompts_per_step=train.prompts_per_step,
        prompts_per_rank=train.prompts_per_step // world_size,
        rollout_samples=rollout,
        minibatch_samples=minibatch,
        micro_batch_per_rank=train.micro_batch_size,
        gradient_accumulation_steps=per_rank // train.micro_batch_size,
    )


def inference_batch_sizes(cfg: ExperimentConfig, world_size: int) -> BatchSizes:
    """Sizes for jobs that only run frozen engines (refcache, evaluate): nothing trains, so the training
    batch fields need not divide anything; DeepSpeed still wants a consistent micro-batch arithmetic."""
    micro = cfg.train.micro_batch_size
    return BatchSizes(
        world_size=world_size,
        prompts_per_step=0,
        prompts_per_rank=0,
        rollout_samples=0,
        minibatch_samples=micro * world_size,
        micro_batch_per_rank=micro,
        gradient_accumulation_steps=1,
    )
