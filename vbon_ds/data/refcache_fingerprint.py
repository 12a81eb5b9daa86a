"""The reference cache's fingerprint: what its samples depend on, recorded in `<refcache>/fingerprint.json`.

The fingerprint holds the settings (the models' paths, generation, M; `fingerprint_from_config`), the
models' content (`models_content`: a path records where a model is, the content what is there) and the
format version. It is written once the cache's first shard is complete, every shard carries its hash
(`settings_hash`), and a cache opened under another fingerprint is refused, naming each differing field.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vbon_ds.config import ExperimentConfig, RewardConfig
from vbon_ds.data.rewards import get_reward_function
from vbon_ds.errors import VbonError, writing
from vbon_ds.models.content_digest import ModelNotDownloaded, checkpoint_content
from vbon_ds.models.sampler_choice import sampling_precision

# 4: it records the sampler's precision; 3: the models' content (model_content); 2: their paths only.
FORMAT_VERSION = 4
FINGERPRINT_FILE = "fingerprint.json"
# Where to put a cache made under new settings: train.refcache_dir names it, whether set or not.
ANOTHER_CACHE = "set train.refcache_dir to another directory"
# Extra packages whose version changes what a registered reward function returns.
REWARD_PACKAGES = {"vader": ("vaderSentiment",)}


def fingerprint_from_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings the cached samples and rewards depend on; changing any of them invalidates the cache."""
    model, gen, reward = cfg.model, cfg.generation, cfg.reward
    return {
        "reference": model.reference or model.actor,
        "gguf_file": model.gguf_file,
        "tokenizer": model.tokenizer or model.actor,
        "reward_model": reward.model,
        "reward_function": reward.function,
        "missing_eos_score": reward.missing_eos_score,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "top_k": gen.top_k,
        # The engine (hf or vllm) is not recorded: both sample softmax(logits / T) of the same weights, and
        # the logits' precision is what changes the distribution (a bf16 sampler is another policy).
        "sampling_precision": sampling_precision(cfg),
        "num_ref_samples": cfg.vbon.num_ref_samples,
    }


# ---------------------------------------------------------------- the models' content


def _reward_content(reward: RewardConfig) -> dict[str, Any]:
    """The reward's identity: a model's content, or a function's name, source and package versions."""
    if not reward.function:
        return checkpoint_content(reward.model) if reward.model else {}
    function = get_reward_function(reward.function)
    versions = {}
    for package in REWARD_PACKAGES.get(reward.function, ()):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "function": reward.function,
        "source_sha256": hashlib.sha256(inspect.getsource(function).encode()).hexdigest(),
        "packages": versions,
    }


def models_content(cfg: ExperimentConfig) -> dict[str, Any]:
    """Content fingerprints of the reference, the tokenizer and the reward (see `checkpoint_content`):
    a path records where a model is, this records what is there."""
    model = cfg.model
    separate_reference = bool(model.reference) and model.reference != model.actor
    return {
        "reference": checkpoint_content(
            model.reference if separate_reference else model.actor,
            "" if separate_reference else model.gguf_file,
        ),
        "tokenizer": checkpoint_content(
            model.tokenizer or model.actor, "" if model.tokenizer else model.gguf_file, weights=False
        ),
        "reward": _reward_content(cfg.reward),
    }


def local_cache_fingerprint(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """`cache_fingerprint(cfg)`, or None while some model of it is a hub id not downloaded yet (its content
    is known once loading has downloaded it)."""
    try:
        return cache_fingerprint(cfg)
    except ModelNotDownloaded:
        return None


def cache_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the cache of this config records and is checked against: its settings and its models' content."""
    return {**fingerprint_from_config(cfg), "model_content": models_content(cfg)}


# ---------------------------------------------------------------- fingerprint.json


def stored_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it is written to disk: JSON values (tuples become lists) plus the format version."""
    if not isinstance(fingerprint.get("num_ref_samples"), int):
        raise ValueError("the reference cache fingerprint needs an int 'num_ref_samples' (M)")
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **fingerprint}))


def settings_hash(stored: Mapping[str, Any]) -> str:
    """What every shard records about the settings it was made under (a fingerprint as stored)."""
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def load_fingerprint(root: Path) -> dict[str, Any]:
    """The fingerprint stored in the cache at `root`, refused when missing, corrupt or of another format."""
    path = root / FINGERPRINT_FILE
    if not path.is_file():
        raise VbonError(
            f"no reference cache in {root} ({FINGERPRINT_FILE} is missing); run `vbon refcache` first"
        )
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        stored = err
    if not isinstance(stored, dict):
        raise VbonError(f"{path} is corrupt (not a JSON object); delete {root} to rebuild the cache")
    version = stored.get("format_version")
    if version != FORMAT_VERSION:
        # Older versions lack something the samples depend on: they cannot be tied to the models or sampler.
        lacks = (
            {2: "the models' content", 3: "the sampler's precision"}.get(version)
            if isinstance(version, int)
            else None
        )
        why = f" (it does not record {lacks})" if lacks else ""
        raise VbonError(
            f"the reference cache in {root} has format version {version}, this vbon_ds reads version "
            f"{FORMAT_VERSION}{why}; delete {root} to rebuild it"
        )
    return stored


def write_fingerprint(root: Path, stored: Mapping[str, Any]) -> None:
    """Write fingerprint.json atomically (racing ranks write identical content)."""
    path = root / FINGERPRINT_FILE
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        partial.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


def check_fingerprint(root: Path, expected: dict[str, Any]) -> None:
    """Refuse the cache at `root` unless it was made under `expected` (a fingerprint as stored), naming
    every field that differs."""
    stored, expected = _flat(load_fingerprint(root)), _flat(expected)
    absent = "<absent>"
    differing = [
        f"{key}: cached {stored.get(key, absent)!r}, now {expected.get(key, absent)!r}"
        for key in sorted(stored.keys() | expected.keys())
        if stored.get(key, absent) != expected.get(key, absent)
    ]
    if differing:
        raise VbonError(
            f"the reference cache in {root} was made with other settings ({'; '.join(differing)}); "
            f"{ANOTHER_CACHE}, or delete {root} to rebuild it"
        )


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with '.', so that a mismatch names the file that differs."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat
