"""Every training algorithm (algo.name) in one table: what it trains on, which engines it needs, its
experience function and its losses. `vbon train`, `vbon plan`, evaluation labels and the README's algorithm
table read it; adding an algorithm is one entry here plus its experience function and loss.

    step = algorithm.experience(inputs, prompt_index, generator)   # onpolicy.py / offline.py
    stats = step.update(experience, engines, cfg, algorithm.losses, ...)  # backward and step per loss
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vbon_ds.algorithms import offline, onpolicy
from vbon_ds.algorithms.objective import objective_label
from vbon_ds.algorithms.onpolicy import Experience, LossFn, TrainingInputs
from vbon_ds.config import ExperimentConfig
from vbon_ds.engines.build import EngineNeeds
from vbon_ds.engines.memory_plan import DEFAULT_CARD_GB, MemoryPlan, memory_plan

ExperienceFn = Callable[[TrainingInputs, list[int], torch.Generator], Experience]
"""(inputs, this rank's prompt indices, the step's generator) -> what the update trains on."""


@dataclass(frozen=True)
class Algorithm:
    """One value of algo.name."""

    name: str
    on_policy: bool
    """True: trains on its own rollouts, scored by the reward engine; False: on the reference cache's
    scored answers (no rollout, no reward engine)."""
    experience: ExperienceFn
    loss: LossFn
    """The actor's loss on a micro-batch."""
    critic_loss: LossFn | None = None
    """The critic's loss on a micro-batch; an algorithm with one has a critic engine."""
    pair_graphs: bool = False
    """Its loss holds two forward graphs (chosen and rejected) until backward: `vbon plan` counts both."""
    beta_field: str = ""
    """The algo.* field run labels name as its beta (empty: none)."""
    summary: str = ""
    """One line for the README's algorithm table."""

    @property
    def needs(self) -> EngineNeeds:
        """The engines `vbon train` builds: a trainable actor and the reference (the KL, the reference
        log-probs of cached answers, BoN-SFT's log-ratio statistic); the reward scorer on-policy; the
        critic when there is a critic loss."""
        return EngineNeeds(
            actor="train", reference=True, scorer=self.on_policy, critic=self.critic_loss is not None
        )

    @property
    def losses(self) -> tuple[tuple[str, LossFn], ...]:
        """(engine, loss) in the order the update runs them on each micro-batch."""
        critic = (("critic", self.critic_loss),) if self.critic_loss is not None else ()
        return (("actor", self.loss), *critic)


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm(
            "ppo",
            on_policy=True,
            experience=onpolicy.ppo_experience,
            loss=onpolicy.policy_gradient_loss,
            critic_loss=onpolicy.value_loss,
            summary="clipped policy gradient with GAE advantages from a critic (model.critic_init)",
        ),
        Algorithm(
            "rloo",
            on_policy=True,
            experience=onpolicy.rloo_experience,
            loss=onpolicy.policy_gradient_loss,
            summary="clipped policy gradient with leave-one-out advantages over K >= 2 answers per prompt",
        ),
        Algorithm(
            "bon_sft",
            on_policy=False,
            experience=offline.best_answer_experience,
            loss=offline.bon_sft_loss,
            summary="SFT on the best of N cached answers",
        ),
        Algorithm(
            "dpo",
            on_policy=False,
            experience=offline.pair_experience,
            loss=offline.dpo_loss,
            pair_graphs=True,
            beta_field="dpo_beta",
            summary="DPO on best-vs-worst-of-N cached pairs (algo.dpo_beta)",
        ),
        Algorithm(
            "ipo",
            on_policy=False,
            experience=offline.pair_experience,
            loss=offline.ipo_loss,
            pair_graphs=True,
            beta_field="ipo_beta",
            summary="IPO on best-vs-worst-of-N cached pairs (algo.ipo_beta)",
        ),
        Algorithm(
            "bonbon",
            on_policy=False,
            experience=offline.pair_experience,
            loss=offline.bonbon_loss,
            pair_graphs=True,
            beta_field="ipo_beta",
            summary="algo.bonbon_alpha x SFT + (1 - alpha) x IPO on best-vs-worst-of-N cached pairs",
        ),
    )
}


def algorithm_of(cfg: ExperimentConfig) -> Algorithm:
    """The registry entry of cfg.algo.name (config validation allows only registered names)."""
    return ALGORITHMS[cfg.algo.name]


def run_label(cfg_dict: dict[str, Any]) -> str:
    """A short description of a run from its saved config: e.g. 'vBoN (bound) N=8 (rloo)',
    'KL-RL beta=0.05 (ppo)', 'dpo N=8 beta=0.1'."""
    algorithm = ALGORITHMS[cfg_dict["algo"]["name"]]
    if algorithm.on_policy:
        return objective_label(cfg_dict["vbon"], algorithm.name)
    beta = cfg_dict["algo"][algorithm.beta_field] if algorithm.beta_field else None
    return f"{algorithm.name} N={cfg_dict['vbon']['n']}" + (f" beta={beta:g}" if beta is not None else "")


def algorithm_table() -> str:
    """The README's algorithm table (tests/test_registry.py checks the README holds this very text)."""
    rows = ["| `algo.name` | trains on | engines | loss |", "|---|---|---|---|"]
    for algorithm in ALGORITHMS.values():
        needs = algorithm.needs
        built = (
            ("actor", True),
            ("reference", needs.reference),
            ("reward", needs.scorer),
            ("critic", needs.critic),
        )
        engines = ", ".join(name for name, used in built if used)
        source = "its rollouts" if algorithm.on_policy else "the reference cache"
        rows.append(f"| `{algorithm.name}` | {source} | {engines} | {algorithm.summary} |")
    return "\n".join(rows)


def training_memory_plan(
    cfg: ExperimentConfig, world_size: int, gpu_memory_gb: float = DEFAULT_CARD_GB
) -> MemoryPlan:
    """`vbon plan`: the memory of the engines and phases `vbon train` runs for cfg.algo.name."""
    algorithm = algorithm_of(cfg)
    return memory_plan(
        cfg,
        world_size,
        algorithm.needs,
        rollout=algorithm.on_policy,
        pair_graphs=algorithm.pair_graphs,
        gpu_memory_gb=gpu_memory_gb,
    )
