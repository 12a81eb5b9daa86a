"""What a checkpoint's weights mean: recorded at every save, compared before resume or evaluation loads them.

The record (trainer_state["weights_settings"]) and why each entry is in it:
    model.actor, model.actor content   the base the trained weights belong to (with LoRA or top-K training
                                       most of the actor *is* the base); the content id (the digests the
                                       reference cache records too) catches files overwritten in place
    model.gguf_file                    one directory can hold several GGUF files
    model.tokenizer                    which text each token id of the embeddings and head stands for
    model.lora_rank, model.lora_alpha, model.lora_target_modules
                                       the adapters' shapes, their scale (alpha / rank) and where they sit
and, for resume only (the optimizer state and engines must match; evaluation reads full weights, which
these leave unchanged):
    model.trainable_layers             which parameters the optimizer state covers
    model.dtype                        as resolved on this machine: the optimizer keeps another state layout
                                       per precision
    critic                             an algorithm with a critic (PPO) saves a critic engine, its trunk
                                       chosen by model.critic_init
    world size                         ZeRO partitions the optimizer state (and at stage 3 the weights) over
                                       the ranks that wrote it, and DeepSpeed cannot re-split them; the
                                       nodes x GPUs per node may differ, their product may not
Not recorded: model.reference and every objective setting (they change the training, not what the saved
weights are), model.gradient_checkpointing and logprob_backend (same weights either way).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from vbon_ds.config import ExperimentConfig
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import accelerator_support
from vbon_ds.engines.ds_config import precision
from vbon_ds.errors import VbonError
from vbon_ds.models.content_digest import ModelNotDownloaded, checkpoint_content

SETTINGS_KEY = "weights_settings"
CONTENT = "model.actor content"
CRITIC = "critic (algo.name=ppo, model.critic_init)"
WORLD = "world size (ranks)"
_CONFIG_FIELDS = ("actor", "gguf_file", "tokenizer", "lora_rank", "lora_alpha", "lora_target_modules")
_LAYOUT_CONFIG_FIELDS = ("trainable_layers",)
TRAINING_ONLY = frozenset({"model.trainable_layers", "model.dtype", CRITIC, WORLD})


def model_content_id(path: str, gguf_file: str = "") -> str | None:
    """An id of what the actor's checkpoint holds (`content_digest.checkpoint_content`: sampled
    digests of a local directory's files, or the commit a hub id resolves to); None for a hub id not
    downloaded yet."""
    try:
        content = checkpoint_content(path, gguf_file)
    except ModelNotDownloaded:
        return None
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _critic(cfg: ExperimentConfig, critic: bool) -> str:
    return f"from the {cfg.model.critic_init}" if critic else "none"


def _from_model_section(model: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {f"model.{name}": model[name] for name in fields if name in model}


def weights_settings(cfg: ExperimentConfig, critic: bool) -> dict[str, Any]:
    """The settings that decide what the weights saved by a run of `cfg` on this machine mean (see the
    module docstring); `critic`: whether cfg.algo.name trains a critic (the algorithm registry's needs)."""
    model = vars(cfg.model)
    return {
        **_from_model_section(model, _CONFIG_FIELDS + _LAYOUT_CONFIG_FIELDS),
        CONTENT: model_content_id(cfg.model.actor, cfg.model.gguf_file),
        "model.dtype": precision(cfg, *accelerator_support()),  # auto resolved as the engines do
        CRITIC: _critic(cfg, critic),
        WORLD: distributed.world_size(),
    }


def recorded_settings(state: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings a checkpoint's trainer state records. Checkpoints of older versions lack the record:
    the model section of their saved config stands in for it, with a warning (no content id, dtype or
    critic to compare)."""
    if SETTINGS_KEY in state:
        return state[SETTINGS_KEY]
    model = state.get("config", {}).get("model", {})
    print(
        f"vbon: warning: {where} records no weights settings (written by an older vbon_ds); "
        + ("only its saved model.* settings are compared" if model else "nothing is compared"),
        file=sys.stderr,
    )
    return _from_model_section(model, _CONFIG_FIELDS + _LAYOUT_CONFIG_FIELDS)


def differences(recorded: dict[str, Any], current: dict[str, Any], training: bool) -> list[str]:
    """'field: checkpoint X, now Y' for each setting recorded in both that differs (training: the optimizer
    layout too)."""
    return [
        f"{key}: checkpoint {recorded[key]!r}, now {current[key]!r}"
        for key in recorded
        if key in current and (training or key not in TRAINING_ONLY) and recorded[key] != current[key]
    ]


def check_resume_compatible(
    recorded: dict[str, Any], current: dict[str, Any], where: str, training: bool = True
) -> None:
    """Raise a VbonError naming every setting in which the checkpoint at `where` (its `recorded`
    settings) and this run (`current`, from `weights_settings`) differ, with what to do."""
    differ = differences(recorded, current, training)
    if not differ:
        return
    advice = (
        "resume with the checkpoint's settings, or give this run a new train.output_dir "
        "(train.resume=none starts fresh here, replacing its checkpoints)"
        if training
        else "evaluate it with the config it was trained with"
    )
    raise VbonError(f"{where} was trained with other weights settings ({'; '.join(differ)}); {advice}")
