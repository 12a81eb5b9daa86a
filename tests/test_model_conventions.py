"""Model conventions the engines must honour, on tiny models in process (a world of one, stage 0):

- dropout driven by config floats (OPT's dropout and layerdrop, the attention_dropout of LLaMA and GPT-NeoX)
  is off in training forwards, so the first PPO epoch's ratio is exactly 1;
- models that scale their logits after the lm head (Granite's logits_scaling, Cohere's logit_scale) get
  their own log-probs from the fused path; logits that are no fixed multiple of the head's are refused.
"""

from __future__ import annotations

import pytest
import torch
from test_evaluate import world_of_one_not_exported
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaForCausalLM

from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.data.prompts import DEMO_PROMPTS
from vbon_ds.engines import builders, distributed
from vbon_ds.engines.builders import build_actor, load_policy_tokenizer, switch_off_dropout
from vbon_ds.engines.lm_head import logit_scale
from vbon_ds.errors import VbonError
from vbon_ds.jobs.train import Trainer
from vbon_ds.models.tiny_models import make_tiny_causal_lm, make_tiny_tokenizer, tiny_config

DROPOUT_MODELS = {
    "opt": ("opt", {"dropout": 0.3, "attention_dropout": 0.3, "layerdrop": 0.3}),
    "llama": ("llama", {"attention_dropout": 0.5}),
    "gpt_neox": ("gpt_neox", {"attention_dropout": 0.3, "hidden_dropout": 0.3}),
}
SCALED_MODELS = {
    "granite": ("granite", {"logits_scaling": 8.0}),  # logits = head / 8
    "cohere": ("cohere", {"logit_scale": 0.3}),  # logits = head x 0.3
    "falcon_h1": ("falcon_h1", {"lm_head_multiplier": 0.3}),  # logits = head x 0.3
}


@pytest.fixture(scope="module")
def world_of_one():
    """Engines built here make a world of one in this process and export its RANK, MASTER_PORT, ...: the
    processes later tests launch must not inherit them (as in test_evaluate.py)."""
    with world_of_one_not_exported():
        distributed.init_distributed()
        yield


def _config(tmp_path, model_dir, *overrides):
    return load_config(
        None,
        [
            f"model.actor={model_dir}", f"data.source={DEMO_PROMPTS}", "data.max_prompt_tokens=64",
            "reward.function=vowel_ratio", "vbon.objective=kl_rl", "vbon.beta=0.1", "algo.name=ppo",
            "algo.samples_per_prompt=2", "algo.ppo_epochs=1", "algo.num_minibatches=1",
            "generation.max_new_tokens=8", "generation.temperature=0.7", "train.steps=1",
            "train.prompts_per_step=4", "train.micro_batch_size=8", "train.resume=none",
            f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=0", "deepspeed.config=zero3",
            "logging.tensorboard=false", "logging.progress_bar=false", *overrides,
        ],
    )  # fmt: skip


def _tiny_model(tmp_path, arch: str, overrides: dict) -> str:
    return str(make_tiny_causal_lm(tmp_path / arch, arch, config_overrides=overrides))


@pytest.mark.parametrize("name", DROPOUT_MODELS)
def test_switch_off_dropout_makes_training_forwards_repeatable(name):
    arch, overrides = DROPOUT_MODELS[name]
    config = tiny_config(arch, vocab_size=64, eos_id=0)
    config.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.arange(1, 17)[None]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    assert not torch.equal(logits(), logits())  # the model as configured is random in training mode
    switched_off = switch_off_dropout(model)
    assert set(switched_off) >= {f"{arch}.{field}={value}" for field, value in overrides.items()}
    assert torch.equal(logits(), logits())
    assert all(getattr(model.config, field) == 0.0 for field in overrides)


@pytest.mark.parametrize("old_logprobs", ["forward", "sampling"])
@pytest.mark.parametrize("name", [*DROPOUT_MODELS, "granite"])
def test_first_ppo_epoch_ratio_is_one(world_of_one, tmp_path, name, old_logprobs):
    arch, overrides = {**DROPOUT_MODELS, **SCALED_MODELS}[name]
    algo = "rloo" if name == "granite" else "ppo"  # transformers has no Granite classifier for a critic
    model_dir = _tiny_model(tmp_path, arch, overrides)
    cfg = _config(tmp_path, model_dir, f"algo.name={algo}", f"algo.old_logprobs={old_logprobs}")
    stats, problem = Trainer(cfg).train_step()
    assert problem == ""
    # One epoch, one minibatch, one micro-batch: every ratio is taken before the optimizer step.
    assert stats["train/clip_frac"] == 0.0
    if old_logprobs == "forward":  # the same forward twice (the no-grad one, then the training one)
        assert stats["train/approx_kl"] == 0.0
    else:  # the sampling logits (KV cache, the model's own head) against the fused forward: rounding only
        assert stats["train/approx_kl"] < 1e-9


@pytest.mark.parametrize("name", ["llama", *SCALED_MODELS])
def test_fused_logprobs_are_log_softmax_of_the_models_own_logits(world_of_one, tmp_path, name):
    arch, overrides = {**DROPOUT_MODELS, **SCALED_MODELS}[name]
    model_dir = _tiny_model(tmp_path, arch, overrides)
    cfg = _config(tmp_path, model_dir)
    tokenizer = load_policy_tokenizer(cfg)
    actor = build_actor(cfg, batch_sizes(cfg, 1), tokenizer, trainable=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = tokenizer(["the movie was", "a lovely evening with"], return_tensors="pt", padding=True)
    rollout = actor.generate(prompts.input_ids, prompts.attention_mask, temperature=0.7, max_new_tokens=6)
    seq, mask, p = rollout.sequences, rollout.attention_mask, rollout.prompt_length
    fused, entropy = actor.response_logprobs(seq, mask, p, 0.7, return_entropy=True)
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = hf(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, p - 1 : -1]
    want = torch.log_softmax(logits.double() / 0.7, -1)
    token_logp = want.gather(-1, seq[:, p:, None])[..., 0] * rollout.response_mask
    torch.testing.assert_close(fused.double(), token_logp, atol=1e-5, rtol=1e-5)
    want_entropy = -(want.exp() * want).sum(-1) * rollout.response_mask
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-5)
    expected_scale = {"granite": 1 / 8, "cohere": 0.3, "falcon_h1": 0.3}.get(name, 1.0)
    assert actor.logit_scale == pytest.approx(expected_scale, rel=1e-6)


def test_logits_that_are_no_multiple_of_the_head_output_are_refused():
    head = torch.randn(2, 5, 40) * 20
    assert logit_scale(head * 0.25, head, "granite") == 0.25
    assert logit_scale(head, head, "llama") == 1.0
    capped = torch.tanh(head / 30.0) * 30.0  # Gemma-2's final_logit_softcapping
    for logits in (capped, head + 1.0, -head, head[..., :30]):
        with pytest.raises(ValueError, match=r"model type 'gemma2'.*not a fixed positive multiple"):
            logit_scale(logits, head, "gemma2")


def test_randomness_left_in_a_training_forward_is_refused(world_of_one, tmp_path, monkeypatch):
    # As if the OPT's dropout were driven by a setting switch_off_dropout does not know.
    monkeypatch.setattr(builders, "switch_off_dropout", lambda model: [])
    arch, overrides = DROPOUT_MODELS["opt"]
    cfg = _config(tmp_path, _tiny_model(tmp_path, arch, overrides))
    with pytest.raises(VbonError, match=r"actor \(opt\): two training-mode forwards .* differ"):
        build_actor(cfg, batch_sizes(cfg, 1), load_policy_tokenizer(cfg))


def test_logits_changed_after_the_head_are_refused_by_model_type(world_of_one, tmp_path, monkeypatch):
    cfg = _config(tmp_path, _tiny_model(tmp_path, "llama", {}))
    forward = LlamaForCausalLM.forward

    def soft_capped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = torch.tanh(out.logits)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", soft_capped)
    with pytest.raises(VbonError, match=r"model type 'llama': its logits are not a fixed positive multiple"):
        build_actor(cfg, batch_sizes(cfg, 1), load_policy_tokenizer(cfg), trainable=False)


def test_a_soft_capping_config_is_refused(world_of_one, tmp_path):
    config = Gemma2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=30.0,
    )  # fmt: skip
    model_dir = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    make_tiny_tokenizer(model_dir)
    cfg = _config(tmp_path, model_dir)
    with pytest.raises(VbonError, match=r"Gemma2ForCausalLM soft-caps its logits"):
        build_actor(cfg, batch_sizes(cfg, 1), load_policy_tokenizer(cfg), trainable=False)
