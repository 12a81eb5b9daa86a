"""Checkpoints: verified saves, pruning by recency, fallback on resume, no pickle, a full disk, and kills at
every stage of a save (tests/dist/checkpoint_run.py) followed by a resume to the same weights.

The in-process tests save with no engines (only the trainer's own state and RNG files), which exercises the
whole save protocol without DeepSpeed; the kill test trains a real DeepSpeed engine in forked children.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vbon_ds.algorithms.registry import algorithm_of
from vbon_ds.config import config_to_dict, load_config
from vbon_ds.engines.checkpoint import load_checkpoint, save_checkpoint
from vbon_ds.engines.checkpoint_layout import (
    KILLED_EXIT_CODE,
    MANIFEST,
    SAVE_STAGES,
    TRAINER_STATE,
    build_manifest,
    latest_checkpoint,
    resume_checkpoint,
    step_dirs,
    verify_checkpoint,
)
from vbon_ds.engines.run_settings import (
    CONTENT,
    SETTINGS_KEY,
    check_resume_compatible,
    recorded_settings,
    weights_settings,
)
from vbon_ds.engines.weights import load_trained_weights
from vbon_ds.errors import VbonError

REPO = Path(__file__).resolve().parent.parent


def save(root: Path, step: int, run_id: str = "run", keep: int = 2) -> Path:
    return save_checkpoint(root, step, {}, {"step": step, "run": run_id}, keep_last=keep, run_id=run_id)


def names(root: Path) -> list[str]:
    return [d.name for d in step_dirs(root)]


def test_pruning_keeps_this_runs_checkpoints_when_higher_steps_exist(tmp_path):
    for step in (10, 11):  # a previous run in the same directory (the new one has train.resume=none)
        save(tmp_path, step, run_id="old")
    for step in (1, 2, 3):
        path = save(tmp_path, step, run_id="new")
        assert path.is_dir() and latest_checkpoint(tmp_path) == path
    assert names(tmp_path) == ["step_00000002", "step_00000003"]
    assert resume_checkpoint(tmp_path) == tmp_path / "step_00000003"


def test_pruning_keeps_the_written_checkpoint_with_keep_one(tmp_path):
    save(tmp_path, 5, run_id="old")
    save(tmp_path, 1, run_id="new", keep=1)
    assert names(tmp_path) == ["step_00000001"] and latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def _garbage_latest(root: Path) -> None:
    (root / "latest").write_bytes(b"\xff\x00garbage")


def _latest_names_removed_dir(root: Path) -> None:
    (root / "latest").write_text("step_00000009")


def _removed_step_dir(root: Path) -> None:
    os.rename(root / "step_00000002", root / "elsewhere")


def _file_deleted(root: Path) -> None:
    (root / "step_00000002" / "rng_rank0.json").unlink()


def _file_truncated(root: Path) -> None:
    state = root / "step_00000002" / TRAINER_STATE
    state.write_bytes(state.read_bytes()[:-3])


def _file_tampered(root: Path) -> None:  # same size, other bytes
    state = root / "step_00000002" / TRAINER_STATE
    state.write_text(state.read_text().replace('"step": 2', '"step": 7'))


def _manifest_deleted(root: Path) -> None:
    (root / "step_00000002" / MANIFEST).unlink()


@pytest.mark.parametrize(
    ("damage", "usable"),
    [
        (_garbage_latest, 2),
        (_latest_names_removed_dir, 2),
        (_removed_step_dir, 1),
        (_file_deleted, 1),
        (_file_truncated, 1),
        (_file_tampered, 1),
        (_manifest_deleted, 1),
    ],
)
def test_resume_falls_back_to_the_newest_verified_checkpoint_and_says_so(tmp_path, capsys, damage, usable):
    save(tmp_path, 1)
    save(tmp_path, 2)
    damage(tmp_path)
    assert resume_checkpoint(tmp_path) == tmp_path / f"step_{usable:08d}"
    assert f"resuming from the newest verified checkpoint, step_{usable:08d}" in capsys.readouterr().err
    assert load_checkpoint(tmp_path, {})["step"] == usable
    # The next save replaces the broken step 2, never touching the one it resumed from.
    save(tmp_path, 2)
    assert names(tmp_path) == ["step_00000001", "step_00000002"]
    assert resume_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_resume_refuses_when_checkpoints_exist_but_none_is_usable(tmp_path):
    assert resume_checkpoint(tmp_path) is None and resume_checkpoint(tmp_path / "absent") is None
    save(tmp_path, 1)
    (tmp_path / "step_00000001" / MANIFEST).write_text("{not json")
    with pytest.raises(
        VbonError, match=r"no usable checkpoint in .*step_00000001: manifest.json is unreadable"
    ):
        resume_checkpoint(tmp_path)
    with pytest.raises(VbonError, match=r"no usable checkpoint"):
        load_checkpoint(tmp_path, {})
    (tmp_path / "step_00000001").rename(tmp_path / "gone")  # only a dangling `latest` is left
    with pytest.raises(VbonError, match=r"no usable checkpoint .*latest names no step directory"):
        resume_checkpoint(tmp_path)
    with pytest.raises(VbonError, match=r"checkpoint .*gone is unusable: manifest.json is unreadable"):
        resume_checkpoint(tmp_path / "gone")


def test_saving_the_same_step_twice_is_a_no_op_for_the_same_run(tmp_path):
    first = save(tmp_path, 3)
    stamp = json.loads((first / MANIFEST).read_text())["saved_at"]
    assert save(tmp_path, 3) == first
    assert json.loads((first / MANIFEST).read_text())["saved_at"] == stamp
    # Another run's step 3 is replaced (a run started with train.resume=none over an old directory).
    save(tmp_path, 3, run_id="other")
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["run_id"] == "other" and manifest["saved_at"] > stamp
    assert latest_checkpoint(tmp_path) == first and verify_checkpoint(first) is None


def test_state_and_rng_round_trip_without_pickle(tmp_path, monkeypatch):
    state = {"step": 4, "losses": [0.5, 0.25], "nested": {"t": torch.arange(3.0)}, "none": None}
    save_checkpoint(tmp_path, 4, {}, state, keep_last=1, run_id="r")
    draws = (random.random(), np.random.rand(), torch.rand(2))
    files = {p.name for p in (tmp_path / "step_00000004").iterdir()}
    assert files == {"manifest.json", "rng_rank0.json", "trainer_state.json", "trainer_state.safetensors"}

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading a checkpoint's own state must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    loaded = load_checkpoint(tmp_path, {})
    assert torch.equal(loaded["nested"]["t"], torch.arange(3.0))
    assert {k: v for k, v in loaded.items() if k != "nested"} == {
        k: v for k, v in state.items() if k != "nested"
    }
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(2), draws[2])


def test_full_disk_during_a_save_is_one_line_naming_the_file(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == TRAINER_STATE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(VbonError, match=r"^no space left on device while writing \S+/trainer_state.json"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert resume_checkpoint(tmp_path) == tmp_path / "step_00000001"


@pytest.mark.slow
def test_a_kill_at_every_stage_of_a_save_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "dist" / "checkpoint_run.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "4", "2", "3"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == list(SAVE_STAGES)
    for stage, r in results.items():
        latest_moved = SAVE_STAGES.index(stage) >= SAVE_STAGES.index("latest_moved")
        assert r["killed_exit_code"] == KILLED_EXIT_CODE, stage
        assert r["latest"] == ("step_00000003" if latest_moved else "step_00000002"), stage
        assert r["latest_verified"], stage
        assert (r["resumed_exit_code"], r["resumed_at"]) == (0, 3 if latest_moved else 2), stage
        assert r["same_weights"], stage
        assert r["steps_left"] == ["step_00000003", "step_00000004"] and r["hidden_left"] == [], stage


@pytest.mark.slow
def test_train_reruns_a_finished_run_as_a_no_op_and_resumes_past_a_broken_latest(tmp_path):
    from test_pipeline import tiny_config_file, vbon

    config = tiny_config_file(
        tmp_path, "run", "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2"
    )
    root = tmp_path / "run" / "checkpoints"
    vbon("refcache", "--config", str(config))
    vbon("train", "--config", str(config))
    assert (
        names(root) == ["step_00000001", "step_00000002"]
        and latest_checkpoint(root) == root / "step_00000002"
    )
    stamp = json.loads((root / "step_00000002" / MANIFEST).read_text())["saved_at"]

    rerun = vbon("train", "--config", str(config))  # the last step is not saved again
    assert "at step 2" in rerun.stdout
    assert json.loads((root / "step_00000002" / MANIFEST).read_text())["saved_at"] == stamp

    _file_tampered(root)  # step 2's trainer state no longer matches its manifest
    longer = vbon("train", "--config", str(config), "--set", "train.steps=3")
    assert "resuming from the newest verified checkpoint, step_00000001" in longer.stderr
    assert "at step 1" in longer.stdout
    assert (
        names(root) == ["step_00000002", "step_00000003"]
        and latest_checkpoint(root) == root / "step_00000003"
    )
    assert all(verify_checkpoint(d) is None for d in step_dirs(root))


# ---------------------------------------------------------------- weights settings


def settings(*overrides: str) -> dict:
    cfg = load_config(None, ["model.actor=gpt2", *overrides])
    return weights_settings(cfg, critic=algorithm_of(cfg).needs.critic)


def test_a_changed_weights_setting_is_named_with_both_values_and_no_advice_to_delete():
    recorded = settings("model.lora_rank=4")
    check_resume_compatible(recorded, settings("model.lora_rank=4"), "checkpoint c")  # the same: accepted
    for override, named in [
        ("model.lora_rank=8", "model.lora_rank: checkpoint 4, now 8"),
        ("model.lora_rank=0", "model.lora_rank: checkpoint 4, now 0"),
        ("model.lora_alpha=64", "model.lora_alpha: checkpoint 16.0, now 64.0"),
        ("model.lora_target_modules=c_attn", "model.lora_target_modules: checkpoint [], now ['c_attn']"),
        ("model.trainable_layers=1", "model.trainable_layers: checkpoint 0, now 1"),
        ("model.dtype=bfloat16", "model.dtype: checkpoint 'float32', now 'bfloat16'"),
        ("model.actor=other/model", "model.actor: checkpoint 'gpt2', now 'other/model'"),
        (
            "algo.name=dpo",
            "critic (algo.name=ppo, model.critic_init): checkpoint 'from the reward', now 'none'",
        ),
    ]:
        with pytest.raises(VbonError) as err:
            check_resume_compatible(recorded, settings("model.lora_rank=4", override), "checkpoint c")
        message = str(err.value)
        assert message.startswith("checkpoint c was trained with other weights settings") and named in message
        assert "new train.output_dir" in message and "remove" not in message


def test_evaluation_refuses_what_changes_the_weights_meaning_only():
    recorded = settings("model.lora_rank=4")
    # The optimizer layout does not change the saved weights: evaluation accepts it.
    check_resume_compatible(recorded, settings("model.lora_rank=4", "model.trainable_layers=1"), "r", False)
    with pytest.raises(VbonError, match=r"model\.lora_alpha: checkpoint 16\.0, now 64\.0.*trained with"):
        check_resume_compatible(recorded, settings("model.lora_rank=4", "model.lora_alpha=64"), "r", False)


def test_overwritten_actor_weights_change_the_content_id(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = {"w": torch.zeros(1000, 100)}
    save_file(weights, str(model / "model.safetensors"))
    before = settings(f"model.actor={model}")
    assert before[CONTENT] == settings(f"model.actor={model}")[CONTENT]
    weights["w"][-1, -1] = 1.0  # the last value only: same size, same header
    save_file(weights, str(model / "model.safetensors"))
    with pytest.raises(
        VbonError, match=r"model\.actor content: checkpoint '[0-9a-f]{64}', now '[0-9a-f]{64}'"
    ):
        check_resume_compatible(before, settings(f"model.actor={model}"), "checkpoint c")


def test_checkpoints_without_the_record_are_checked_by_their_saved_config(capsys):
    old_cfg = load_config(None, ["model.actor=gpt2", "model.lora_rank=4"])
    recorded = recorded_settings({"step": 3, "config": config_to_dict(old_cfg)}, "checkpoint c")
    assert "checkpoint c records no weights settings" in capsys.readouterr().err
    check_resume_compatible(recorded, settings("model.lora_rank=4"), "checkpoint c")
    with pytest.raises(VbonError, match=r"model\.lora_alpha: checkpoint 16\.0, now 2\.0"):
        check_resume_compatible(recorded, settings("model.lora_rank=4", "model.lora_alpha=2"), "checkpoint c")
    assert (
        recorded_settings({"step": 3}, "checkpoint c") == {}
    )  # nothing to compare: accepted, with a warning
    assert "nothing is compared" in capsys.readouterr().err
    assert recorded_settings({SETTINGS_KEY: {"model.actor": "x"}}, "c") == {"model.actor": "x"}


def test_a_verified_checkpoint_deepspeed_cannot_load_is_kept_not_called_broken(tmp_path):
    step_dir = save(tmp_path, 1)
    (step_dir / "actor").mkdir()

    def load_checkpoint_fails(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for GPT2LMHeadModel:\n\tsize mismatch")

    engine = type(
        "Engine", (), {"ds": type("DS", (), {"load_checkpoint": staticmethod(load_checkpoint_fails)})}
    )
    with pytest.raises(VbonError) as err:
        load_checkpoint(tmp_path, {"actor": engine})
    message = str(err.value)
    assert (
        "matches its manifest, yet DeepSpeed could not load it" in message
        and "Error(s) in loading" in message
    )
    assert "it is kept" in message and "remove" not in message
    assert verify_checkpoint(step_dir) is None


# ---------------------------------------------------------------- no code runs when a checkpoint loads


class WritesAFile:
    """A pickled object that creates a file when unpickled (what a hostile checkpoint could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "files",
    [
        ["mp_rank_00_model_states.pt"],  # stages 0 to 2: the module whole
        ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],  # ZeRO-3
    ],
)
def test_evaluation_reads_checkpoint_weights_without_running_pickled_code(tmp_path, files):
    marker = tmp_path / "pwned"
    state = tmp_path / "actor" / "state"
    state.mkdir(parents=True)
    for name in files:
        torch.save({"module": WritesAFile(marker), "optimizer_state_dict": WritesAFile(marker)}, state / name)
    engine = type("Engine", (), {"module": torch.nn.Linear(2, 2), "zero3": False})()
    with pytest.raises(VbonError, match=r"actor: a DeepSpeed file holds a pickled object .* could run code"):
        load_trained_weights(engine, tmp_path / "actor")
    assert not marker.exists()


@pytest.mark.slow
def test_resume_reads_deepspeed_files_without_running_pickled_code(tmp_path):
    import deepspeed

    from vbon_ds.engines import distributed
    from vbon_ds.engines.base import DeepSpeedModel

    distributed.init_distributed()
    model = torch.nn.Linear(4, 2)
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engines = {"actor": DeepSpeedModel(engine, None, trainable=True)}
    step_dir = save_checkpoint(tmp_path, 1, engines, {"step": 1}, keep_last=1, run_id="r")
    assert load_checkpoint(tmp_path, engines)["step"] == 1  # DeepSpeed's own files pass the safe loader
    marker = tmp_path / "pwned"
    torch.save({"module": WritesAFile(marker)}, step_dir / "actor" / "state" / "mp_rank_00_model_states.pt")
    (step_dir / MANIFEST).unlink()  # the sender's own manifest, matching the files sent
    (step_dir / MANIFEST).write_text(json.dumps(build_manifest(step_dir, 1, "r")))
    with pytest.raises(VbonError, match=r"actor: a DeepSpeed file holds a pickled object .* could run code"):
        load_checkpoint(tmp_path, engines)
    assert not marker.exists()
