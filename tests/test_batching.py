"""Batch-size arithmetic: what one step holds per prompt follows the algorithm's own field, and a size that
does not divide is refused naming the field to change."""

import pytest

from vbon_ds.batching import batch_sizes
from vbon_ds.config import ConfigError, load_config

# 6 prompts, 2 minibatches, 2 ranks: K rollouts or N-subsets per prompt must be even for micro-batches of 3.
SIZES = ["train.prompts_per_step=6", "algo.num_minibatches=2", "train.micro_batch_size=3"]
PER_PROMPT = ["algo.samples_per_prompt=2", "algo.subsets_per_prompt=4"]


@pytest.mark.parametrize(("algo", "per_prompt"), [("rloo", 2), ("ppo", 2), ("dpo", 4), ("bon_sft", 4)])
def test_a_step_holds_k_rollouts_on_policy_and_the_subsets_offline(algo, per_prompt):
    sizes = batch_sizes(load_config(None, [f"algo.name={algo}", *SIZES, *PER_PROMPT]), world_size=2)
    assert sizes.rollout_samples == 6 * per_prompt
    assert sizes.minibatch_samples == 3 * per_prompt
    # Each rank's half of a minibatch, in micro-batches of 3.
    assert sizes.gradient_accumulation_steps == per_prompt // 2


@pytest.mark.parametrize(
    ("algo", "field"), [("rloo", "algo.samples_per_prompt"), ("ipo", "algo.subsets_per_prompt")]
)
def test_an_indivisible_step_names_the_algorithms_per_prompt_field(algo, field):
    cfg = load_config(None, [f"algo.name={algo}", "train.prompts_per_step=3", "algo.num_minibatches=2",
                             "algo.samples_per_prompt=3", "algo.subsets_per_prompt=3"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        batch_sizes(cfg, world_size=1)
    assert str(err.value) == (
        f"algo.num_minibatches: 2 does not divide the 9 answers per step (train.prompts_per_step x {field})"
    )


def test_epochs_follow_the_algorithm():
    overrides = ["algo.ppo_epochs=2", "algo.offline_epochs=3"]
    assert load_config(None, ["algo.name=ppo", *overrides]).algo.epochs == 2
    assert load_config(None, ["algo.name=bonbon", *overrides]).algo.epochs == 3
