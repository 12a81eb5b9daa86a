"""Engines from the experiment config: the only place models meet DeepSpeed.

    init_distributed()
    sizes = batch_sizes(cfg, world_size())
    tokenizer = load_policy_tokenizer(cfg)
    actor = build_actor(cfg, sizes, tokenizer)          # PolicyEngine, trainable
    reference = build_reference(cfg, sizes, tokenizer, actor)  # frozen ZeRO-3 (LoRA: the actor, adapters off)
    critic = build_critic(cfg, sizes, tokenizer)        # CriticEngine (PPO only)
    reward = build_reward(cfg, sizes)                   # RewardScorer (rule function or frozen ZeRO-3 model)

Trainable engines take their ZeRO stage from deepspeed.config, AdamW and gradient clipping from the filled
DeepSpeed config, and a warmup + constant/cosine LR schedule over `optimizer_steps(cfg)` optimizer steps.
Frozen engines are ZeRO-3 (from the zero3 template when deepspeed.config is a lower stage); a world of one
runs every engine at stage 0 unless something is offloaded (ds_config.py).
Trainable models train the weights model.trainable_layers / model.lora_rank choose
(vbon_ds/models/adapters.py).
Each model loads while its `HfDeepSpeedConfig` is alive, so under ZeRO-3 transformers initialises and loads
it partitioned. Dropout is switched off everywhere (`switch_off_dropout`): PPO compares log-probs of the same
tokens across passes, so a training forward must compute what sampling and the no-grad forwards computed.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vbon_ds.batching import BatchSizes
from vbon_ds.config import ExperimentConfig
from vbon_ds.data.rewards import get_reward_function
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.engines.critic import CriticEngine, TokenValueModel
from vbon_ds.engines.ds_config import fill_ds_config, load_ds_template, precision
from vbon_ds.engines.lora import AdapterReference
from vbon_ds.engines.policy import PolicyEngine
from vbon_ds.engines.reward import LastTokenReward, RewardScorer
from vbon_ds.errors import VbonError
from vbon_ds.models.adapters import apply_trainable_subset
from vbon_ds.models.loading import (
    check_same_vocab,
    load_causal_lm,
    load_model_config,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)

log = logging.getLogger(__name__)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup that reaches the full LR
    at step `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps(cfg: ExperimentConfig) -> int:
    """Optimizer steps in the whole run: one per minibatch per epoch per training step."""
    return cfg.train.steps * cfg.algo.epochs * cfg.algo.num_minibatches


# Config fields and module attributes that make a forward random in training mode: dropout probabilities
# (dropout, attention_dropout, hidden_dropout, resid_pdrop, attn_pdrop, layerdrop, drop_path_rate, ...) and
# MoE router jitter noise.
_RANDOM_IN_TRAINING = re.compile(r"drop|jitter", re.IGNORECASE)


def _is_randomness_setting(name: str, value: object) -> bool:
    return type(value) is float and bool(_RANDOM_IN_TRAINING.search(name))  # not counters, flags or None


def _configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    """Every config object the model's modules hold, nested sub-configs included (e.g. a text_config)."""
    found: dict[int, PretrainedConfig] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if isinstance(config, PretrainedConfig) and id(config) not in found:
            found[id(config)] = config
            pending.extend(vars(config).values())
    return list(found.values())


def switch_off_dropout(model: torch.nn.Module) -> list[str]:
    """Make `model`'s training-mode forward deterministic; returns the config fields that were not 0.

    Zeroes every dropout-like config field (read by forwards that call the functional dropout, as OPT's and
    the attention functions of LLaMA, Qwen2 or GPT-NeoX do), the module attributes copied from them at
    build time, and the p of every dropout module (GPT-2's, LoRA's).
    """
    nonzero = []
    for config in _configs(model):
        for name, value in vars(config).items():
            if _is_randomness_setting(name, value):
                if value:
                    nonzero.append(f"{config.model_type or type(config).__name__}.{name}={value}")
                setattr(config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_randomness_setting(name, value):
                setattr(module, name, 0.0)
    return nonzero


def accelerator_support() -> tuple[bool, bool]:
    """(on a GPU, bfloat16 supported there)."""
    on_gpu = torch.cuda.is_available()
    return on_gpu, on_gpu and torch.cuda.is_bf16_supported()


def _ds_config(
    cfg: ExperimentConfig, sizes: BatchSizes, *, trainable: bool, lr: float | None, hidden_size: int | None
) -> dict[str, Any]:
    template = load_ds_template(cfg.deepspeed.config)
    if not trainable and template.get("zero_optimization", {}).get("stage") != 3:
        template = load_ds_template("zero3")
    on_gpu, bf16 = accelerator_support()
    return fill_ds_config(
        template,
        cfg,
        sizes,
        on_gpu=on_gpu,
        bf16_supported=bf16,
        lr=lr,
        hidden_size=hidden_size,
        trainable=trainable,
    )


def _initialize(
    cfg: ExperimentConfig,
    sizes: BatchSizes,
    path: str,
    load: Callable[..., PreTrainedModel],
    *,
    trainable: bool,
    lr: float | None = None,
    gguf_file: str = "",
    wrap: Callable[[PreTrainedModel], torch.nn.Module] | None = None,
    lora: bool = False,
) -> tuple[Any, Any]:
    """(DeepSpeed engine, its HfDeepSpeedConfig) for the model that `load(dtype=...)` returns from `path`,
    optionally wrapped in another module by `wrap`; `lora`: the model gets LoRA adapters (the actor's)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    model_config = load_model_config(path, trust_remote_code=cfg.model.trust_remote_code, gguf_file=gguf_file)
    ds_config = _ds_config(
        cfg, sizes, trainable=trainable, lr=lr, hidden_size=getattr(model_config, "hidden_size", None)
    )
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # must exist before from_pretrained to partition at load
    model = load(dtype=getattr(torch, precision(cfg, *accelerator_support())))
    scheduler = None
    # A frozen actor (evaluation) gets the adapters too, so a LoRA checkpoint's weights load by name.
    apply_trainable_subset(model, cfg.model, cfg.train.seed, lora=lora)
    switched_off = switch_off_dropout(model)  # after the adapters: theirs too
    if switched_off:
        log.info("%s: dropout switched off (%s)", path, ", ".join(switched_off))
    if trainable:
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        factor = functools.partial(
            lr_factor,
            warmup_steps=cfg.train.warmup_steps,
            total_steps=optimizer_steps(cfg),
            schedule=cfg.train.lr_schedule,
        )
        scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=factor)
    else:
        model.requires_grad_(False)
    if wrap is not None:
        model = wrap(model)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad] if trainable else None,
        config=ds_config,
        lr_scheduler=scheduler,
    )
    engine.train(trainable)  # from_pretrained leaves models in eval mode; gradient checkpointing needs train
    return engine, hf_ds_config


def load_policy_tokenizer(cfg: ExperimentConfig) -> PreTrainedTokenizerBase:
    """The actor's tokenizer (model.tokenizer, else the actor checkpoint's), left-padded with a pad token."""
    return load_tokenizer(
        cfg.model.tokenizer or cfg.model.actor,
        trust_remote_code=cfg.model.trust_remote_code,
        gguf_file="" if cfg.model.tokenizer else cfg.model.gguf_file,
    )


def generation_eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS of the tokenizer plus any the checkpoint's generation config stops at (e.g. chat end tokens)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids.update([extra] if isinstance(extra, int) else extra or [])
    if not ids:
        raise VbonError("the actor's tokenizer has no EOS token: responses could never end")
    return sorted(ids)


def _policy(
    cfg: ExperimentConfig,
    sizes: BatchSizes,
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    gguf_file: str,
    trainable: bool,
    lora: bool = False,
) -> PolicyEngine:
    load = functools.partial(
        load_causal_lm, path, trust_remote_code=cfg.model.trust_remote_code, gguf_file=gguf_file
    )
    engine, hf_ds_config = _initialize(
        cfg, sizes, path, load, trainable=trainable, lr=cfg.train.lr, gguf_file=gguf_file, lora=lora
    )
    return PolicyEngine(
        engine,
        hf_ds_config,
        trainable=trainable,
        eos_ids=generation_eos_ids(engine.module, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )


def build_actor(
    cfg: ExperimentConfig, sizes: BatchSizes, tokenizer: PreTrainedTokenizerBase, trainable: bool = True
) -> PolicyEngine:
    """The policy (model.actor): trainable, or frozen for evaluation (weights loaded from a checkpoint)."""
    return _policy(
        cfg, sizes, tokenizer, cfg.model.actor, cfg.model.gguf_file, trainable=trainable, lora=True
    )


def build_reference(
    cfg: ExperimentConfig,
    sizes: BatchSizes,
    tokenizer: PreTrainedTokenizerBase,
    actor: PolicyEngine | None = None,
) -> PolicyEngine | AdapterReference:
    """The frozen reference policy (model.reference, else the actor checkpoint); same vocabulary required.

    With LoRA and the actor's checkpoint as reference, a given `actor` with its adapters off is the
    reference: no second engine, no second copy of the weights.
    """
    if not cfg.model.reference or cfg.model.reference == cfg.model.actor:
        if actor is not None and cfg.model.lora_rank:
            return AdapterReference(actor)
        return _policy(cfg, sizes, tokenizer, cfg.model.actor, cfg.model.gguf_file, trainable=False)
    check_same_vocab(
        tokenizer, load_tokenizer(cfg.model.reference, trust_remote_code=cfg.model.trust_remote_code)
    )
    return _policy(cfg, sizes, tokenizer, cfg.model.reference, "", trainable=False)


def build_critic(
    cfg: ExperimentConfig, sizes: BatchSizes, tokenizer: PreTrainedTokenizerBase
) -> CriticEngine:
    """The PPO value model, trunk from the reward model or the actor (model.critic_init), lr train.critic_lr.

    It reads the policy's token ids, so a reward-model trunk must share the actor's vocabulary. With a rule
    reward there is no reward model, and the trunk comes from the actor.
    """
    from_reward = cfg.model.critic_init == "reward" and bool(cfg.reward.model) and not cfg.reward.function
    if cfg.model.critic_init == "reward" and not from_reward:
        log.warning(
            "model.critic_init=reward but the reward is a rule function: the critic starts from the actor"
        )
    path = cfg.reward.model if from_reward else cfg.model.actor
    gguf_file = "" if from_reward else cfg.model.gguf_file
    if from_reward:
        reward_tok = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
        check_same_vocab(tokenizer, reward_tok, other="critic (model.critic_init=reward)")
    load = functools.partial(
        load_value_model, path, trust_remote_code=cfg.model.trust_remote_code, gguf_file=gguf_file
    )
    engine, hf_ds_config = _initialize(
        cfg,
        sizes,
        path,
        load,
        trainable=True,
        lr=cfg.train.critic_lr,
        gguf_file=gguf_file,
        wrap=TokenValueModel,
    )
    return CriticEngine(engine, hf_ds_config, trainable=True)


def build_reward(cfg: ExperimentConfig, sizes: BatchSizes) -> RewardScorer:
    """reward.function when set, else the reward.model classifier as a frozen ZeRO-3 engine."""
    if cfg.reward.function:
        return RewardScorer(
            function=get_reward_function(cfg.reward.function), missing_eos_score=cfg.reward.missing_eos_score
        )
    if not cfg.reward.model:
        raise VbonError("reward: set reward.model (a 1-output classifier) or reward.function (a rule)")
    trust = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(cfg.reward.model, trust_remote_code=trust)
    # Right padding: the score is read where the mask ends; cut the prompt's start, never the answer.
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"

    def load(*, dtype: torch.dtype) -> PreTrainedModel:
        model = load_reward_model(cfg.reward.model, dtype=dtype, trust_remote_code=trust)
        model.config.pad_token_id = tokenizer.pad_token_id  # encoders' forward wants one; never pooled on
        return model

    engine, hf_ds_config = _initialize(
        cfg, sizes, cfg.reward.model, load, trainable=False, wrap=LastTokenReward
    )
    return RewardScorer(
        model=DeepSpeedModel(engine, hf_ds_config, trainable=False),
        tokenizer=tokenizer,
        batch_size=cfg.reward.batch_size,
        missing_eos_score=cfg.reward.missing_eos_score,
    )
