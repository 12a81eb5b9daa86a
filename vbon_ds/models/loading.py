"""Load tokenizers, causal LMs and reward models by hub id or local path (layer 3: no DeepSpeed here).

Every loader turns "not found / not loadable" into a `VbonError` naming the path. Custom modelling code runs
only with `trust_remote_code=True`; local directories holding safetensors load from them (never pickles).

Offline machines: before a hub id is resolved, `hub_unavailable` asks the hub once per process (one request,
no retries; none at all under HF_HUB_OFFLINE=1). When it does not answer, the Hugging Face libraries run in
offline mode (the local cache only) instead of retrying each file for a minute and a half, and an id that is
not cached fails at once with one line saying what to do.
The engines call these loaders while a DeepSpeed ZeRO-3 config is alive, which makes Hugging Face's
`from_pretrained` partition the weights as they load.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vbon_ds.config import ConfigError, ExperimentConfig
from vbon_ds.errors import VbonError

# "gpt2" or "org/name": what the hub accepts; anything else that does not exist locally is a typo'd path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one request that checks the hub may take (a firewall that drops packets never refuses)."""


@functools.cache
def _endpoint_silent(endpoint: str) -> bool:
    """Whether one HEAD request to `endpoint` gets no HTTP answer at all (memoised: asked once a process)."""
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return False  # an error status is still an answer
    except (OSError, ValueError):  # DNS, refused, timeout, TLS; ValueError: a malformed HF_ENDPOINT
        return True
    return False


def hub_unavailable() -> str:
    """Why the Hugging Face hub cannot be used by this process ("" when it can): HF_HUB_OFFLINE is set, or
    the endpoint (HF_ENDPOINT) did not answer the one quick request made to check it."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = huggingface_hub.constants.ENDPOINT
    return f"the hub at {endpoint} does not answer" if _endpoint_silent(endpoint) else ""


@contextlib.contextmanager
def hub_cache_only() -> Iterator[str]:
    """Run hub lookups from the local cache alone when the hub is unavailable (no network, hence no retries);
    yields the reason ("" when the hub answers and lookups go online as usual)."""
    reason = hub_unavailable()
    # transformers and huggingface_hub read this flag at call time, datasets from its own copy.
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE")]
    if "datasets" in sys.modules:
        flags.append((sys.modules["datasets"].config, "HF_HUB_OFFLINE"))
    saved = [getattr(module, name) for module, name in flags]
    try:
        if reason:
            for module, name in flags:
                setattr(module, name, True)
        yield reason
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


def not_cached_error(what: str, hub_id: str, reason: str, repo_type: str = "model") -> VbonError:
    """The one-line error for a hub id that is not in the local cache while the hub is unavailable."""
    download = f"hf download {hub_id}" + (f" --repo-type {repo_type}" if repo_type != "model" else "")
    return VbonError(
        f"cannot load {what} {hub_id!r}: it is not in the local Hugging Face cache and {reason}; give a "
        f"local path instead, or download it where there is network (`{download}`) into the cache this "
        "machine reads (HF_HOME), and set HF_HUB_OFFLINE=1 on machines without network"
    )


def _source(path: str, gguf_file: str) -> dict[str, Any]:
    """from_pretrained kwargs locating the checkpoint; raises when `path` is neither a path nor a hub id."""
    if not path:
        raise VbonError("no model given: set a hub id or a local directory")
    local = Path(path).expanduser()
    if not local.exists() and not _HUB_ID.match(path):
        raise VbonError(f"model path {path!r} does not exist and is not a hub id (org/name)")
    kwargs: dict[str, Any] = {"pretrained_model_name_or_path": str(local) if local.exists() else path}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif local.is_dir() and any(local.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    return kwargs


def _load(loader: Any, path: str, what: str, gguf_file: str = "", **kwargs: Any) -> Any:
    source = _source(path, gguf_file)
    from_hub = not Path(path).expanduser().exists()
    with hub_cache_only() if from_hub else contextlib.nullcontext("") as offline_reason:
        try:
            loaded = loader.from_pretrained(**source, **kwargs)
        except (OSError, ValueError) as err:
            if offline_reason:
                raise not_cached_error(what, path, offline_reason) from err
            # Hub misses and malformed checkpoints: one line naming what failed, the cause after it.
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VbonError(f"cannot load {what} from {path!r}: {first_line}") from err
    if gguf_file and isinstance(loaded, PreTrainedModel):
        # GGUF weights arrive de-quantized in `dtype`, yet transformers keeps the model tagged as quantized
        # and then refuses save_pretrained: drop the tag so checkpoints and the final export work as usual.
        loaded.hf_quantizer = None
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
    return loaded


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, gguf_file: str = ""
) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (batched generation) and a pad token (eos, else unk, when missing)."""
    tok = _load(AutoTokenizer, path, "tokenizer", gguf_file, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise VbonError(f"tokenizer {path!r} has no pad, eos or unk token to pad batches with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model_config(path: str, *, trust_remote_code: bool = False, gguf_file: str = "") -> PretrainedConfig:
    """The model config alone (sizes for the DeepSpeed config before the weights load)."""
    return _load(AutoConfig, path, "model config", gguf_file, trust_remote_code=trust_remote_code)


def load_causal_lm(
    path: str, *, dtype: torch.dtype, trust_remote_code: bool = False, gguf_file: str = ""
) -> PreTrainedModel:
    """AutoModelForCausalLM in `dtype` (actor and reference)."""
    return _load(
        AutoModelForCausalLM, path, "causal LM", gguf_file, dtype=dtype, trust_remote_code=trust_remote_code
    )


def _causal_lm_architecture(config: PretrainedConfig) -> str | None:
    """The architecture name when a checkpoint is a language model (LM head, no score head), else None."""
    names = getattr(config, "architectures", None) or []
    return next((n for n in names if n.endswith(("ForCausalLM", "LMHeadModel"))), None)


def _no_score_head(path: str, architecture: str) -> VbonError:
    return VbonError(
        f"reward.model {path!r} is a causal language model ({architecture}) with no score head; give a "
        "sequence classifier with 1 output (num_labels=1), or a rule in reward.function"
    )


def load_reward_model(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """A trained sequence classifier with exactly one output (the scalar reward)."""
    architecture = _causal_lm_architecture(load_model_config(path, trust_remote_code=trust_remote_code))
    if architecture:
        raise _no_score_head(path, architecture)
    model, info = _load(
        AutoModelForSequenceClassification,
        path,
        "reward model",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    if model.config.num_labels != 1:
        raise VbonError(
            f"reward model {path!r} has {model.config.num_labels} outputs; a reward model needs a score head "
            "with exactly 1 output (num_labels=1)"
        )
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"]))
        raise VbonError(
            f"reward model {path!r} has no trained score head (missing {missing}); "
            "give a sequence-classification checkpoint with 1 output"
        )
    return model


def load_value_model(
    path: str, *, dtype: torch.dtype, trust_remote_code: bool = False, gguf_file: str = ""
) -> PreTrainedModel:
    """A 1-output sequence classifier for the PPO critic: a reward model as is, or a causal LM's trunk with a
    freshly initialised score head."""
    return _load(
        AutoModelForSequenceClassification,
        path,
        "critic trunk",
        gguf_file,
        dtype=dtype,
        num_labels=1,
        trust_remote_code=trust_remote_code,
    )


def check_same_vocab(
    actor_tok: PreTrainedTokenizerBase, ref_tok: PreTrainedTokenizerBase, *, other: str = "reference"
) -> None:
    """Actor and reference (or critic) read the same token ids, so their vocabularies must be identical."""
    actor_vocab, ref_vocab = actor_tok.get_vocab(), ref_tok.get_vocab()
    if actor_vocab == ref_vocab:
        return
    differing = sorted(set(actor_vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])[:3]
    raise VbonError(
        f"actor and {other} tokenizers differ ({len(actor_vocab)} vs {len(ref_vocab)} tokens; e.g. "
        f"{', '.join(f'{t!r}->{i}' for t, i in differing)}): the {other} must share the actor's vocabulary"
    )


def check_models_fit(cfg: ExperimentConfig) -> None:
    """Checks on the model configs alone, before any weights load: prompt plus answer fit each policy's
    context (data.max_prompt_tokens + generation.max_new_tokens), and reward.model has a score head."""
    trust = cfg.model.trust_remote_code
    # A GGUF actor is skipped: transformers reads its config by parsing the whole file (tens of seconds).
    policies = {} if cfg.model.gguf_file else {"model.actor": cfg.model.actor}
    if cfg.model.reference and cfg.model.reference != cfg.model.actor:
        policies["model.reference"] = cfg.model.reference
    needed = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    for field_name, path in policies.items():
        config = load_model_config(path, trust_remote_code=trust)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(positions, int) and needed > positions:
            raise ConfigError(
                f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + generation.max_new_tokens "
                f"({cfg.generation.max_new_tokens}) = {needed} exceeds the {positions} positions of "
                f"{field_name} {path!r}; lower one of them"
            )
    if cfg.reward.model and not cfg.reward.function:
        architecture = _causal_lm_architecture(load_model_config(cfg.reward.model, trust_remote_code=trust))
        if architecture:
            raise _no_score_head(cfg.reward.model, architecture)
