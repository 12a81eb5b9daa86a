"""Trainable subsets in process: top-K layers on a tied-head GPT-2, LoRA merge with Conv1D weights, errors;
LoRA runs through the pipeline and its evaluation."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from vbon_ds.config import load_config
from vbon_ds.errors import VbonError
from vbon_ds.models.adapters import add_lora, apply_trainable_subset, lora_layers, merge_lora
from vbon_ds.models.tiny_models import make_tiny_causal_lm
from vbon_ds.monitor import read_scalars


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("gpt2") / "actor", "gpt2", n_layer=2)


def model_cfg(*overrides):
    return load_config(None, list(overrides)).model


def test_top_layer_of_a_tied_head_model(gpt2):
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    apply_trainable_subset(model, model_cfg("model.trainable_layers=1"), seed=0, lora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # GPT-2's head is the input embedding matrix (tied): frozen with the embeddings.
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith(("transformer.h.1.", "transformer.ln_f."))
    }


def test_lora_merge_folds_conv1d_adapters_into_a_plain_model(gpt2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    add_lora(model, model_cfg("model.lora_rank=2", "model.lora_alpha=4"), seed=0)
    assert list(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            p.data.normal_()
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        for layer in lora_layers(model).values():
            layer.enable_adapters(False)
        base = model(ids).logits
    with torch.no_grad():
        assert torch.equal(base, AutoModelForCausalLM.from_pretrained(gpt2)(ids).logits)
        assert (adapted - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "merged", state_dict=merge_lora(model, model.state_dict()))
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted)


def test_errors_name_the_field(gpt2):
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    with pytest.raises(
        VbonError, match=r"model\.trainable_layers: 3 is out of range \(the model has 2 layers\)"
    ):
        apply_trainable_subset(model, model_cfg("model.trainable_layers=3"), seed=0, lora=False)
    with pytest.raises(VbonError, match=r"model\.lora_target_modules: .*nope"):
        add_lora(model, model_cfg("model.lora_rank=2", "model.lora_target_modules=nope"), seed=0)


@pytest.mark.slow
def test_lora_through_the_whole_tiny_pipeline(tmp_path):
    """refcache -> train (reference = adapters off) -> evaluate, then a plain merged export."""
    out = tmp_path / "demo"
    lora = ["model.lora_rank=4", "model.lora_alpha=8", "train.steps=2"]
    cmd = [sys.executable, "-m", "vbon_ds", "demo", "--preset", "tiny", "--output-dir", str(out)]
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    }
    proc = subprocess.run(
        [*cmd, *(arg for s in lora for arg in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| policy | 1 |" in proc.stdout and "| reference (fresh) | 1 |" in proc.stdout
    kl = read_scalars(out / "tensorboard")["train/kl"]
    assert kl[0][1] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at 0: the actor is the reference
    assert abs(kl[1][1]) > 1e-6  # after an update the adapters move the actor away from it
    exported, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info.values()) and not [n for n, _ in exported.named_parameters() if "lora" in n]


@pytest.mark.slow
def test_lora_evaluation_gives_the_same_numbers_twice(tmp_path):
    """Two evaluations of one LoRA run, whatever the random state before each: the same table."""
    from vbon_ds.commands.demo import demo_config
    from vbon_ds.engines.build import build_engines
    from vbon_ds.jobs import build_refcache, evaluate, report

    saved_env = dict(os.environ)
    try:
        cfg = demo_config(
            "tiny", tmp_path / "run",
            ["model.lora_rank=4", "model.lora_alpha=8", "data.max_train_prompts=2", "data.max_eval_prompts=4",
             "generation.eval_temperatures=[1.0, 0.7]", "logging.progress_bar=false"],
        )  # fmt: skip
        build_refcache.run(cfg)
        engines = build_engines(cfg, actor="frozen", reference=True, scorer=True)
        tables = []
        for seed in (1, 2):  # e.g. the state other work left behind
            torch.manual_seed(seed)
            tables.append(report.format_table(evaluate.evaluate(cfg, engines)))
    finally:  # as test_evaluate's fixture: no process-group variables for later tests' children
        local_rank = os.environ.get("LOCAL_RANK", "0")
        os.environ.clear()
        os.environ.update(saved_env, LOCAL_RANK=local_rank)
    assert tables[0] == tables[1]
    assert "| policy | 0.7 |" in tables[0]
