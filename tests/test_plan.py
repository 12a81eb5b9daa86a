"""`vbon plan`: CLI exit codes and verdict, offload and LoRA in the arithmetic, the offline Pythia table.
(Exact agreement with measured ZeRO-3 partitions: tests/test_engines.py, the partial-training checks.)"""

import subprocess
import sys

import huggingface_hub.constants
import pytest

from vbon_ds.config import load_config
from vbon_ds.engines.plan import GIB, PYTHIA, memory_plan
from vbon_ds.tiny import make_tiny_causal_lm, make_tiny_reward_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return make_tiny_causal_lm(root / "actor", "llama", n_layer=3), make_tiny_reward_model(root / "reward")


@pytest.mark.slow
def test_cli_prints_the_plan_and_exits_2_on_batch_errors(models, tmp_path):
    actor, reward = models
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{actor: {actor}}}\nreward: {{model: {reward}}}\n"
        "train: {prompts_per_step: 8, micro_batch_size: 2}\n"
    )
    run = [sys.executable, "-m", "vbon_ds", "plan", "--config", str(config)]
    ok = subprocess.run([*run, "--world-size", "2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    for engine in ("actor", "critic", "reference", "reward"):
        assert f"| {engine} | 3 |" in ok.stdout
    assert "fits a 80 GB card" in ok.stdout
    tight = subprocess.run(
        [*run, "--world-size", "2", "--gpu-memory-gb", "1e-9"], capture_output=True, text=True
    )
    assert tight.returncode == 0 and "does NOT fit a 1e-09 GB card" in tight.stdout
    bad = subprocess.run([*run, "--world-size", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "train.prompts_per_step: 8 is not divisible by the world size 3" in bad.stderr


def test_offload_lora_and_frozen_layers_in_the_arithmetic(models):
    actor, reward = models
    base = [
        f"model.actor={actor}",
        f"reward.model={reward}",
        "train.prompts_per_step=8",
        "train.micro_batch_size=2",
    ]
    full = memory_plan(load_config(None, base), 2)
    assert [e.name for e in full.engines] == ["actor", "critic", "reference", "reward"]
    offload = memory_plan(load_config(None, [*base, "deepspeed.config=zero3_offload"]), 2).engines[0]
    assert offload.params == offload.grads == offload.optimizer == 0.0  # all on the CPU

    lora = memory_plan(load_config(None, [*base, "model.lora_rank=2", "model.lora_target_modules=q_proj"]), 2)
    assert [e.name for e in lora.engines] == ["actor", "critic", "reward"]  # reference: adapters off
    adapters = 3 * 2 * (32 + 32)  # 3 layers x rank 2 x (in + out) of a 32 x 32 projection
    assert lora.engines[0].shape.trainable_total == adapters
    assert lora.engines[0].elements["adam"] == 2 * adapters // 2  # two moments, half of them per rank

    top = memory_plan(load_config(None, [*base, "model.trainable_layers=1"]), 2).engines[0]
    assert top.shape.trained_layers == 1 and top.activations < full.engines[0].activations


def test_pythia_shapes_without_the_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rule_reward = ["reward.function=vowel_ratio", "algo.name=rloo", "algo.samples_per_prompt=2"]
    cfg = load_config(None, ["model.actor=EleutherAI/pythia-2.8b", *rule_reward])
    plan = memory_plan(cfg, 8)
    actor = plan.engines[0]
    assert actor.shape.total == 2_775_208_960 and actor.shape.layers == PYTHIA["pythia-2.8b"][0]
    assert "model shapes from the built-in Pythia table (hub unreachable)" in plan.notes
    # ZeRO-3 over 8 ranks: 1/8 of the bf16 weights, plus whole copies of the small (persistent) tensors.
    assert actor.params / GIB == pytest.approx(2_775_208_960 * 2 / 8 / GIB, rel=0.01)
