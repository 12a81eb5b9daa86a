"""End to end on the real architecture: Pythia-style (GPT-NeoX, GPT-2's 50k BPE, no pad token) policy and
reward model on the TL;DR fixtures, refcache -> PPO train -> evaluate; and the tiny pipeline in bfloat16.

Each test launches real `vbon` processes (DeepSpeed on CPU), so they are marked slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import vbon
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from vbon_ds.config import dump_config, load_config
from vbon_ds.data.refcache import RefCache
from vbon_ds.data.tldr import fit_query
from vbon_ds.models.tiny_models import make_tiny_causal_lm, make_tiny_reward_model
from vbon_ds.monitor import read_scalars

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tldr"
MISSING_EOS_SCORE = -1.0
MAX_PROMPT_TOKENS = 64


def favour_eos(path: Path, logit: float) -> None:
    """Add `logit` to the EOS logit at every position (a random 50k-vocab model would almost never stop):
    one channel of the final layer norm is made constant 1 and only EOS reads it."""
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = model.config.eos_token_id
    with torch.no_grad():
        norm, head = model.base_model.final_layer_norm, model.get_output_embeddings()
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        head.weight[:, 0] = 0.0
        head.weight[eos, 0] = logit
    model.save_pretrained(path)


def test_pythia_style_models_on_tldr_refcache_ppo_evaluate(tmp_path):
    policy = make_tiny_causal_lm(tmp_path / "policy", "gpt_neox", tokenizer="gpt2")
    favour_eos(policy, 5.0)
    reward = make_tiny_reward_model(tmp_path / "reward", "gpt_neox", tokenizer="gpt2")
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.actor={policy}", f"reward.model={reward}", "model.critic_init=reward",
            f"data.source={FIXTURES / 'oai_fields'}", f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}",
            "data.max_train_prompts=6", "data.max_eval_prompts=2",
            f"reward.missing_eos_score={MISSING_EOS_SCORE}", "vbon.n=4", "vbon.num_ref_samples=8",
            "algo.name=ppo", "algo.ppo_epochs=1", "generation.max_new_tokens=6", "generation.temperature=0.7",
            "generation.eval_samples=2", "train.steps=2", "train.prompts_per_step=2",
            "train.micro_batch_size=2", "train.checkpoint_every=0", "train.lr=1e-3",
            f"train.output_dir={out}", "logging.sample_every=1", "logging.progress_bar=false",
        ],
    )  # fmt: skip
    config = tmp_path / "tldr.yaml"
    config.write_text(dump_config(cfg))
    for stage in ("refcache", "train", "evaluate"):
        vbon(stage, "--config", str(config))

    # The cache: every reward is the reward model's score of the fitted query + answer, read at the EOS the
    # reward tokenizer appends for answers that ended with it; answers cut off get the fixed score.
    tok = AutoTokenizer.from_pretrained(policy)
    classifier = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    cache = RefCache(out / "refcache")
    ended = cut_off = 0
    for record in cache.records():
        assert len(record.rewards) == 8
        prompt = fit_query(record.prompt, tok, MAX_PROMPT_TOKENS)
        assert len(tok(prompt).input_ids) <= MAX_PROMPT_TOKENS and prompt.endswith("\n\nTL;DR:")
        for ids, text, score in zip(record.token_ids, record.texts, record.rewards, strict=True):
            if ids[-1] != tok.eos_token_id:
                cut_off += 1
                assert len(ids) == 6 and score == MISSING_EOS_SCORE
                continue
            ended += 1
            row = torch.tensor([[*tok(prompt + text).input_ids, tok.eos_token_id]])
            with torch.no_grad():
                want = classifier.score(classifier.base_model(row).last_hidden_state)[0, -1, 0].item()
            assert math.isclose(score, want, rel_tol=1e-4, abs_tol=1e-4)
    assert ended >= 5 and cut_off >= 5  # both kinds of answer occurred

    scalars = read_scalars(out / "tensorboard")
    for tag in (
        "train/reward",
        "train/objective_reward",
        "train/kl",
        "train/value_loss",
        "train/eos_fraction",
    ):
        assert len(scalars[tag]) == 2 and all(math.isfinite(v) for _, v in scalars[tag]), tag
    # Under vbon an answer never scores below -log(M+1), the value of one cut off before EOS.
    assert min(v for _, v in scalars["train/objective_reward"]) >= -math.log(9) - 1e-6
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert {row["method"] for row in rows} >= {"reference", "BoN(2)", "policy"}
    assert load_file(out / "final" / "model.safetensors")["embed_out.weight"].shape == (50304, 32)


def test_tiny_pipeline_in_bfloat16(tmp_path):
    out = tmp_path / "bf16"
    result = vbon(
        "demo", "--preset", "tiny", "--output-dir", str(out),
        "--set", "model.dtype=bfloat16", "--set", "train.steps=2", "--set", "data.max_train_prompts=8",
        "--set", "data.max_eval_prompts=2", "--set", "algo.name=ppo", "--set", "algo.samples_per_prompt=1",
        "--set", "vbon.num_ref_samples=8", "--set", "generation.eval_samples=2",
        "--set", "train.micro_batch_size=4",
    )  # fmt: skip
    assert "| policy | 1 |" in result.stdout
    final = load_file(out / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    scalars = read_scalars(out / "tensorboard")
    for tag in ("train/reward", "train/kl", "train/loss", "train/value_loss", "train/entropy"):
        assert len(scalars[tag]) == 2 and all(math.isfinite(v) for _, v in scalars[tag]), tag
    # Actor and reference are the same bf16 weights at the first rollout: their log-probs agree exactly.
    assert scalars["train/kl"][0][1] == 0.0
