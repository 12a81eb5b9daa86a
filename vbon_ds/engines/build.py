"""One function builds the engines of every job; each job asks for only what it uses.

    train (RL)       actor, reference, reward scorer, critic (an algorithm with a critic loss)
    train (offline)  actor, reference (the reference log-probs of cached answers)
    evaluate         actor, reference, reward scorer: frozen, no optimizer
    refcache         reference, reward scorer

`vbon train` asks for the engines the algorithm registry names for algo.name
(vbon_ds.algorithms.registry, `Algorithm.needs`); `vbon plan` sizes the same set.
Frozen-only jobs size their DeepSpeed configs with `inference_batch_sizes`, so they work at any world size
whatever the training batch fields say.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from vbon_ds.batching import BatchSizes, batch_sizes, inference_batch_sizes
from vbon_ds.config import ExperimentConfig, GenerationConfig
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import (
    build_actor,
    build_critic,
    build_reference,
    build_reward,
    load_policy_tokenizer,
)
from vbon_ds.engines.critic import CriticEngine
from vbon_ds.engines.lora import AdapterReference
from vbon_ds.engines.policy import PolicyEngine
from vbon_ds.engines.reward import RewardScorer
from vbon_ds.engines.vllm_sampler import VllmSampler
from vbon_ds.kernels import set_backend
from vbon_ds.models.sampler_choice import resolved_engine


@dataclass
class Engines:
    """The engines one job asked for (None where it did not) and the policy tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    sizes: BatchSizes
    actor: PolicyEngine | None = None
    reference: PolicyEngine | AdapterReference | None = None
    scorer: RewardScorer | None = None
    critic: CriticEngine | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_prompt_tokens: int = 512
    samplers: dict[str, VllmSampler] = field(default_factory=dict)
    """The vLLM engines started so far, by role (generation.engine=vllm)."""

    def sampler(self, role: str) -> PolicyEngine | AdapterReference | VllmSampler:
        """What samples answers of `role` ("actor" or "reference"): the engine itself (generate), or with
        generation.engine=vllm a vLLM engine following its weights, started on first use (on every rank)."""
        engine = getattr(self, role)
        if resolved_engine(self.generation) != "vllm":
            return engine
        if role not in self.samplers:
            self.samplers[role] = VllmSampler(
                engine, self.generation, max_prompt_tokens=self.max_prompt_tokens
            )
        return self.samplers[role]

    def weight_sync_seconds(self) -> float:
        """Seconds spent pushing weights into vLLM engines since the last call."""
        seconds = sum(sampler.sync_seconds for sampler in self.samplers.values())
        for sampler in self.samplers.values():
            sampler.sync_seconds = 0.0
        return seconds

    def trainable(self) -> dict[str, PolicyEngine | CriticEngine]:
        """The engines a checkpoint saves and restores, by name."""
        named = {"actor": self.actor, "critic": self.critic}
        return {name: engine for name, engine in named.items() if engine is not None and engine.trainable}


@dataclass(frozen=True)
class EngineNeeds:
    """Which engines a job builds: `build_engines`' keyword arguments."""

    actor: str = ""
    reference: bool = False
    scorer: bool = False
    critic: bool = False


def build_engines(
    cfg: ExperimentConfig,
    *,
    actor: str = "",
    reference: bool = False,
    scorer: bool = False,
    critic: bool = False,
) -> Engines:
    """Initialise the process group and build the requested engines.

    `actor` is "" (none), "train" (with optimizer and LR schedule) or "frozen" (inference only, e.g. for
    evaluation: the weights come from a checkpoint or the actor checkpoint itself).
    """
    distributed.init_distributed()
    set_backend(cfg.model.logprob_backend)
    world = distributed.world_size()
    training = actor == "train" or critic
    sizes = batch_sizes(cfg, world) if training else inference_batch_sizes(cfg, world)
    tokenizer = load_policy_tokenizer(cfg)
    policy = build_actor(cfg, sizes, tokenizer, trainable=actor == "train") if actor else None
    return Engines(
        tokenizer=tokenizer,
        sizes=sizes,
        actor=policy,
        # With LoRA the reference is the actor with its adapters off (no second copy of the weights).
        reference=build_reference(cfg, sizes, tokenizer, policy) if reference else None,
        scorer=build_reward(cfg, sizes) if scorer else None,
        critic=build_critic(cfg, sizes, tokenizer) if critic else None,
        generation=cfg.generation,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )
