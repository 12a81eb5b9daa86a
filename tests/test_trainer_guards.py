"""Training-loop guards, in process: non-finite rewards name the prompt, skip the update, stop the run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from vbon_ds.batching import batch_sizes
from vbon_ds.commands.demo import demo_config
from vbon_ds.config import ConfigError, ExperimentConfig, load_config
from vbon_ds.data.refcache import done_prompt_ids, refcache_dir
from vbon_ds.data.rewards import register_reward
from vbon_ds.errors import VbonError
from vbon_ds.jobs import build_refcache, evaluate
from vbon_ds.jobs.train import Trainer, objective_beta
from vbon_ds.models.tiny_models import make_tiny_causal_lm
from vbon_ds.monitor import read_scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """Made once, before any engine exists: while a ZeRO-3 engine lives in this process, transformers
    builds every new model partitioned, and saving one then would write empty tensors."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def tiny_config(out: Path, model: Path, *overrides: str) -> ExperimentConfig:
    shutil.copytree(model, out / "model")  # the tiny preset uses output_dir/model when it exists
    return demo_config("tiny", out, list(overrides))


@register_reward("nan_for_tests")
def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan") if "movie" in p else 0.5 for p in prompts]


def test_nan_rewards_skip_updates_and_stop_after_max_bad_steps(tmp_path, tiny_model):
    cfg = tiny_config(
        tmp_path / "nan",
        tiny_model,
        *["reward.function=nan_for_tests", "vbon.objective=kl_rl", "vbon.beta=0.1", "train.max_bad_steps=2",
         "train.prompts_per_step=40", "train.micro_batch_size=40", "train.steps=5",
         "train.checkpoint_every=1"],
    )  # fmt: skip
    trainer = Trainer(cfg)
    with pytest.raises(VbonError) as err:
        trainer.run()
    # A skipped step still counts, logs and checkpoints on schedule (the run stops during step 2's record).
    out = tmp_path / "nan"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert read_scalars(out / "tensorboard")["train/skipped_steps"] == [(1, 1.0), (2, 2.0)]
    message = str(err.value)
    assert "2 consecutive steps had non-finite rewards or losses" in message
    assert "(train.max_bad_steps=2)" in message
    reported = re.findall(r"prompt (\d+) \('([0-9a-f#]+)'\)", message)
    assert reported, message
    for index, pid in reported:
        assert "movie" in trainer.prompts.texts[int(index)]
        assert trainer.prompts.ids[int(index)] == pid
    assert trainer.step == 2 and trainer.bad_steps == 2  # both steps were skipped


def test_nan_reward_in_refcache_names_the_prompt(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "nan_cache", tiny_model, "reward.function=nan_for_tests")
    with pytest.raises(VbonError) as err:
        build_refcache.run(cfg)
    named = re.search(r"reward is not finite for prompt (\d+) \('([0-9a-f#]+)'\): \[nan", str(err.value))
    assert named, str(err.value)
    prompts = build_refcache.all_prompts(cfg)
    index, pid = int(named[1]), named[2]
    assert prompts.ids[index] == pid and "movie" in prompts.texts[index]  # one that scores NaN
    assert pid not in done_prompt_ids(refcache_dir(cfg))  # and nothing was cached for it


def test_objective_beta():
    assert objective_beta(load_config(None, ["vbon.n=5"])) == pytest.approx(0.25)
    assert objective_beta(load_config(None, ["vbon.objective=kl_rl", "vbon.beta=0.03"])) == 0.03


def test_refcache_and_evaluate_do_not_need_valid_training_batch_sizes(tmp_path, tiny_model):
    # 3 prompts per step make 3 answers per minibatch, no multiple of 2 sequences per micro-batch:
    # training would refuse this config, the inference-only jobs must not care.
    cfg = tiny_config(
        tmp_path / "sizes", tiny_model, "train.prompts_per_step=3", "train.micro_batch_size=2",
        "algo.samples_per_prompt=1", "algo.name=ppo",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        batch_sizes(cfg, 1)
    summary = build_refcache.run(cfg)
    assert (summary.num_prompts, summary.num_ref_samples) == (48, 16)
    rows = evaluate.run(cfg)
    policy = next(row for row in rows if row.method == "policy")
    assert policy.kl == pytest.approx(0.0, abs=1e-5)  # untrained: the actor is the reference


# ---------------------------------------------------------------- resume: settings, other runs, fresh starts

KL_RL = ("vbon.objective=kl_rl", "vbon.beta=0.1", "train.steps=1", "train.checkpoint_every=1")  # no cache


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model) -> Path:
    """A finished one-step LoRA run (rank 4) with its checkpoint and final/."""
    out = tmp_path_factory.mktemp("lora") / "run"
    Trainer(tiny_config(out, tiny_model, *KL_RL, "model.lora_rank=4")).run()
    return out


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.lora_rank=8", "model.lora_rank: checkpoint 4, now 8"),
        ("model.lora_rank=0", "model.lora_rank: checkpoint 4, now 0"),
        ("model.lora_alpha=64", "model.lora_alpha: checkpoint 16.0, now 64.0"),
        ("model.trainable_layers=1", "model.trainable_layers: checkpoint 0, now 1"),
    ],
)
def test_resume_names_a_changed_weights_setting_and_keeps_the_checkpoint(lora_run, change, named):
    cfg = demo_config("tiny", lora_run, [*KL_RL, "model.lora_rank=4", change, "train.steps=2"])
    with pytest.raises(VbonError) as err:
        Trainer(cfg)
    message = str(err.value)
    assert f"checkpoint {lora_run / 'checkpoints' / 'step_00000001'} was trained with other" in message
    assert named in message and "remove" not in message
    assert (lora_run / "checkpoints" / "step_00000001").is_dir()


def test_evaluate_runs_refuses_a_changed_lora_alpha(lora_run):
    cfg = demo_config("tiny", lora_run, ["model.lora_rank=4", "model.lora_alpha=64"])
    with pytest.raises(VbonError, match=r"--runs .*model\.lora_alpha: checkpoint 16\.0, now 64\.0"):
        evaluate.run(cfg, run_dirs=[lora_run])


def test_resume_refuses_another_base_models_checkpoint(tmp_path, tiny_model, lora_run):
    other = tmp_path / "other"
    make_tiny_causal_lm(other / "model", seed=1)  # another base model, in a directory named like the first
    step = lora_run / "checkpoints" / "step_00000001"
    cfg = demo_config("tiny", other, [*KL_RL, "model.lora_rank=4", f"train.resume={step}"])
    with pytest.raises(
        VbonError, match=r"model\.actor: checkpoint '\S+/lora\d*/run/model', now '\S+/other/model'"
    ):
        Trainer(cfg)
    own = tmp_path / "own"
    Trainer(tiny_config(own, tiny_model, *KL_RL)).run()
    make_tiny_causal_lm(own / "model", seed=1)  # the actor's weights overwritten in place
    with pytest.raises(VbonError, match=r"model\.actor content: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        Trainer(demo_config("tiny", own, [*KL_RL, "train.steps=2"]))


def test_resume_none_says_what_it_replaces_and_keeps_final_until_the_new_one_is_written(
    tmp_path, tiny_model, capsys, monkeypatch
):
    out = tmp_path / "fresh"
    Trainer(tiny_config(out, tiny_model, *KL_RL, "train.steps=2")).run()
    old_final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    capsys.readouterr()
    trainer = Trainer(demo_config("tiny", out, [*KL_RL, "train.resume=none"]))
    warning = capsys.readouterr().err
    assert "train.resume=none starts fresh in" in warning
    assert "its earlier checkpoints (step_00000002) go as this run saves" in warning  # keep_checkpoints=1
    assert f"{out / 'final'} is replaced when this run finishes" in warning

    def export_dies_half_way(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half written")
        raise OSError("killed while exporting")

    monkeypatch.setattr(type(trainer.engines.actor.module), "save_pretrained", export_dies_half_way)
    with pytest.raises(OSError, match="killed while exporting"):
        trainer.run()
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == old_final
