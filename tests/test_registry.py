"""The algorithm registry is the one place that decides what algo.name does: config's allowed names, the
README's table and every code path read it, and a new entry trains through it."""

from __future__ import annotations

import dataclasses
import io
import tokenize
from pathlib import Path

import pytest
from test_trainer_guards import tiny_config, tiny_model  # noqa: F401 (tiny_model: a fixture)

from vbon_ds.algorithms import onpolicy
from vbon_ds.algorithms.onpolicy import Experience, Loss
from vbon_ds.algorithms.registry import ALGORITHMS, Algorithm, algorithm_table
from vbon_ds.config import OFFLINE_ALGOS, ON_POLICY_ALGOS, AlgoConfig, ExperimentConfig
from vbon_ds.core import losses
from vbon_ds.engines.build import Engines

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vbon_ds"
MAY_NAME_ALGORITHMS = {PACKAGE / "algorithms" / "registry.py", PACKAGE / "config.py"}
"""The registry, and config.py for its allowed values (checked equal to the registry's names below)."""


def test_config_allows_exactly_the_registered_algorithms():
    (name,) = [f for f in dataclasses.fields(AlgoConfig) if f.name == "name"]
    assert set(name.metadata["choices"]) == set(ALGORITHMS)
    assert name.default in ALGORITHMS
    # config.py's split (it decides batch fields and epochs at load time) is the registry's.
    assert set(ON_POLICY_ALGOS) == {n for n, a in ALGORITHMS.items() if a.on_policy}
    assert set(OFFLINE_ALGOS) == {n for n, a in ALGORITHMS.items() if not a.on_policy}


def string_literals(path: Path) -> set[str]:
    """The values of the plain string literals in a Python file (f-string parts excluded)."""
    values = set()
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.STRING and token.string[0] in "\"'":
            values.add(token.string.strip("\"'"))
    return values


def test_algorithm_names_are_written_out_only_in_the_registry_and_the_config():
    names = set(ALGORITHMS)
    naming = {
        str(path.relative_to(ROOT)): sorted(string_literals(path) & names)
        for path in PACKAGE.rglob("*.py")
        if path not in MAY_NAME_ALGORITHMS
    }
    assert {path: found for path, found in naming.items() if found} == {}


def test_readme_algorithm_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- algorithms:start -->\n")[1].split("\n<!-- algorithms:end -->")[0]
    assert section == algorithm_table(), "README algorithm table is stale: paste registry.algorithm_table()"


def test_the_engines_follow_the_entry():
    for algorithm in ALGORITHMS.values():
        needs = algorithm.needs
        assert needs.actor == "train" and needs.reference
        assert needs.scorer == algorithm.on_policy  # offline answers come scored from the cache
        assert needs.critic == (algorithm.critic_loss is not None)
        assert [engine for engine, _ in algorithm.losses] == ["actor", "critic"][: 1 + needs.critic]


# ---------------------------------------------------------------- a new algorithm trains through its entry


@pytest.mark.slow
def test_a_new_entry_trains_one_step_with_its_own_loss(tmp_path, tiny_model, monkeypatch):  # noqa: F811
    """A toy algorithm (advantage-weighted log-likelihood of its own answers, no critic) put in the registry
    under an allowed name: the trainer builds its engines, runs its experience and only its loss."""
    from vbon_ds.jobs.train import Trainer

    seen_rows: list[int] = []

    def weighted_nll(engines: Engines, cfg: ExperimentConfig, micro: Experience) -> Loss:
        rows = micro.batches["answers"]
        logp = engines.actor.response_logprobs(
            rows.sequences, rows.attention_mask, rows.prompt_length, cfg.generation.temperature
        )
        loss = -losses.masked_mean(micro.tensors["advantages"] * logp, rows.response_mask)
        seen_rows.append(len(rows))
        return Loss(loss, {"train/toy_loss": loss.item()}, logp)

    toy = Algorithm("rloo", on_policy=True, experience=onpolicy.rloo_experience, loss=weighted_nll)
    monkeypatch.setitem(ALGORITHMS, "rloo", toy)
    cfg = tiny_config(tmp_path / "toy", tiny_model, "vbon.objective=kl_rl", "vbon.beta=0.1", "train.steps=1")
    assert cfg.algo.name == "rloo"
    trainer = Trainer(cfg)
    assert trainer.engines.critic is None and trainer.engines.scorer is not None
    stats, problem = trainer.train_step()
    assert problem == ""
    assert "train/toy_loss" in stats and "train/clip_frac" not in stats  # its loss, not PPO's
    assert "train/reward" in stats  # the rollout experience ran
    sizes = trainer.engines.sizes
    assert sum(seen_rows) == cfg.algo.ppo_epochs * sizes.prompts_per_rank * cfg.algo.samples_per_prompt
