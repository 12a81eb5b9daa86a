"""End to end on the tiny preset: refcache -> train -> evaluate through the CLI, 1 and 2 processes, resume.

Each test launches real `vbon` processes (DeepSpeed on CPU, gloo), so they are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vbon_ds.commands.demo import demo_config
from vbon_ds.config import dump_config
from vbon_ds.engines.distributed import free_port
from vbon_ds.monitor import read_scalars

pytestmark = pytest.mark.slow

REQUIRED_TAGS = [
    "train/reward",
    "train/log_F",
    "train/kl",
    "train/loss",
    "train/entropy",
    "train/lr",
    "perf/samples_per_sec",
    "train/clip_frac",
    "train/response_length",
    "time/rollout",
]


def assert_training_scalars(scalars: dict, steps: list[int], lr: float, num_refs: int) -> None:
    """The tiny preset's scalars: every required tag at every step, finite, and in its range."""
    for tag in REQUIRED_TAGS:
        assert [step for step, _ in scalars[tag]] == steps, tag
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag
    values = {tag: [value for _, value in scalars[tag]] for tag in scalars}
    assert all(0.0 <= r <= 1.0 for r in values["train/reward"])  # vowel_ratio is a share
    assert all(-math.log(num_refs + 1) - 1e-6 <= f <= 0.0 for f in values["train/log_F"])
    assert values["train/lr"] == pytest.approx([lr] * len(steps))
    assert all(0.0 <= c <= 1.0 for c in values["train/clip_frac"])
    assert all(n > 0 for n in values["train/response_length"])


def launch_env() -> dict[str, str]:
    """This environment without the process-group variables an in-process test may have left behind
    (a child would otherwise try to join this process's rendezvous port)."""
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


def start_vbon(*args: str, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vbon_ds", *args], env=launch_env(), **popen_kwargs)


def vbon(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "vbon_ds", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=launch_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"vbon {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def tiny_config_file(tmp_path: Path, name: str, *overrides: str) -> Path:
    """A YAML experiment config of the tiny preset writing under tmp_path/name."""
    cfg = demo_config("tiny", tmp_path / name, list(overrides))
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_config(cfg))
    return path


def test_demo_tiny_single_process(tmp_path):
    out = tmp_path / "demo"
    result = vbon("demo", "--preset", "tiny", "--output-dir", str(out), "--set", "train.steps=3")
    assert "| policy | 1 |" in result.stdout and "| BoN(4) |" in result.stdout
    evaluation = {row["method"]: row for row in json.loads((out / "eval" / "results.json").read_text())}
    # Under the table, one line for the trained policy (none for the fresh reference): its reward gain over
    # the cached reference as a share of BoN(vbon.n)'s, beside both KLs, the numbers results.json holds.
    policy, reference, bon4 = (evaluation[m] for m in ("policy", "reference", "BoN(4)"))
    gain, bon_gain = policy["reward"] - reference["reward"], bon4["reward"] - reference["reward"]
    (line,) = [x for x in result.stdout.splitlines() if "reward gain over the reference" in x]
    assert line.startswith("policy (T = 1)") and "of BoN(4)'s" in line
    stated = [float(x) for x in re.findall(r"[-+]?\d+\.\d+|[-+]?\d+(?=%)", line.split(":", 1)[1])]
    share, others = stated.pop(1), [gain, bon_gain, policy["kl"], bon4["kl"], bon4["kl_bound"]]
    assert share == pytest.approx(100 * gain / bon_gain, abs=0.5)  # printed in whole percent
    assert stated == pytest.approx(others, abs=5e-4)  # printed to 3 decimals
    scalars = read_scalars(out / "tensorboard")
    assert_training_scalars(scalars, [1, 2, 3], lr=3e-3, num_refs=16)
    # Before the first update actor == reference: the KL estimate is exactly 0; the update then moves it.
    assert scalars["train/kl"][0][1] == pytest.approx(0.0, abs=1e-5)
    assert any(abs(value) > 1e-4 for _, value in scalars["train/kl"][1:])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert [step for step, _ in scalars["time/save"]] == [3]  # the one checkpoint, with how long it took
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "eval" / "reward_kl.png").stat().st_size > 0
    assert set(evaluation) >= {"reference", "BoN(2)", "BoN(4)", "policy", "reference (fresh)"}
    # BoN from the cache: reward rises with n; the reference row is BoN(1), at KL 0 and win rate 1/2.
    bon_rewards = [evaluation[m]["reward"] for m in ("reference", "BoN(2)", "BoN(4)")]
    assert bon_rewards == sorted(bon_rewards) and bon_rewards[0] < bon_rewards[-1]
    assert evaluation["reference"]["kl"] == 0.0
    assert evaluation["reference"]["win_rate"] == pytest.approx(0.5)
    assert 0.0 <= evaluation["policy"]["reward"] <= 1.0 and evaluation["policy"]["kl"] > 0.0


def test_refcache_then_ppo_train_two_processes_zero3(tmp_path):
    # PPO with a critic (from the actor: the reward is a rule) over 2 ZeRO-3 ranks.
    config = tiny_config_file(
        tmp_path, "two", "train.steps=2", "train.checkpoint_every=1", "algo.name=ppo",
        "algo.samples_per_prompt=1", "train.micro_batch_size=2", "vbon.objective=vbon_exact",
    )  # fmt: skip
    env = {**launch_env(), "OMP_NUM_THREADS": "1"}
    for stage in ("refcache", "train"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "vbon_ds", stage, "--config", str(config),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "two"
    shards = sorted(p.name for p in (out / "refcache").glob("shard-*.parquet"))
    assert any("rank0" in s for s in shards) and any("rank1" in s for s in shards)
    scalars = read_scalars(out / "tensorboard")
    assert_training_scalars(scalars, [1, 2], lr=3e-3, num_refs=16)
    for tag in ["train/value_loss", "train/vf_clip_frac"]:
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    assert all(0.0 < value < math.inf for _, value in scalars["train/value_loss"])
    checkpoint = out / "checkpoints" / "step_00000002"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "actor",
        "critic",
        "trainer_state.json",
        "rng_rank0.json",
        "rng_rank1.json",
    }


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def kill_at_first_checkpoint_then_resume(config: Path, out: Path, step: int) -> None:
    """Start `vbon train`, SIGKILL it once `step` is checkpointed, then run it again to the end."""
    proc = start_vbon("train", "--config", str(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == f"step_{step:08d}"
    assert not (out / "final").exists(), "the run finished before it could be killed"
    result = vbon("train", "--config", str(config))
    assert "resumed from" in result.stdout and f"at step {step}" in result.stdout


def assert_same_final_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    straight = tiny_config_file(tmp_path, "straight", "train.steps=6", "train.checkpoint_every=3")
    vbon("refcache", "--config", str(straight))
    vbon("train", "--config", str(straight))

    killed = tiny_config_file(tmp_path, "killed", "train.steps=6", "train.checkpoint_every=3")
    vbon("refcache", "--config", str(killed))
    kill_at_first_checkpoint_then_resume(killed, tmp_path / "killed", step=3)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "killed")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One tiny model and its reference cache, reused by the offline-baseline runs."""
    root = tmp_path_factory.mktemp("offline")
    vbon("refcache", "--config", str(tiny_config_file(root, "shared")))
    return root / "shared"


# Few prompts, seen every step: the offline losses then move their quantity within a few steps.
OFFLINE_RUN = (
    "train.steps=4",
    "train.checkpoint_every=2",
    "data.max_train_prompts=4",
    "algo.offline_epochs=1",
)


@pytest.mark.parametrize(
    "algo, moved",
    [("bon_sft", "train/chosen_nll"), ("dpo", "train/reward_margin"), ("ipo", "train/reward_margin"),
     ("bonbon", "train/reward_margin")],
)  # fmt: skip
def test_offline_baseline_trains_and_resumes_bit_exactly(tmp_path, shared_cache, algo, moved):
    overrides = (f"algo.name={algo}", f"model.actor={shared_cache / 'model'}", *OFFLINE_RUN)
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tiny_config_file(tmp_path, name, *overrides)
        shutil.copytree(shared_cache / "refcache", tmp_path / name / "refcache")
    vbon("train", "--config", str(runs["straight"]))
    kill_at_first_checkpoint_then_resume(runs["killed"], tmp_path / "killed", step=2)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "killed")

    scalars = read_scalars(tmp_path / "straight" / "tensorboard")
    for tag in ["train/loss", "train/lr", "train/chosen_log_ratio", "perf/samples_per_sec", moved]:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    values = [value for _, value in scalars[moved]]
    # Step 1 is measured before any update: the actor is the reference, so the log-ratio is 0.
    assert scalars["train/chosen_log_ratio"][0][1] == pytest.approx(0.0, abs=1e-4)
    if algo == "bon_sft":
        assert values[-1] < values[0]  # the best answers' NLL falls
    else:
        assert values[0] == pytest.approx(0.0, abs=1e-4) and values[-1] > 0.1  # the margin opens
        assert scalars["train/reward_accuracy"][-1][1] > 0.5


def test_sigterm_checkpoints_at_step_boundary_and_exits_cleanly(tmp_path):
    # Long, as it is not resumed: the stop must land before the last step whatever the machine's speed.
    config = tiny_config_file(tmp_path, "term", "train.steps=500", "train.checkpoint_every=0")
    vbon("refcache", "--config", str(config))
    proc = start_vbon(
        "train", "--config", str(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    events = tmp_path / "term" / "tensorboard"
    deadline = time.time() + 300
    # Wait until the first step has been logged, then ask for a stop.
    while proc.poll() is None and time.time() < deadline and not (events.is_dir() and read_scalars(events)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop signal received" in stdout
    step = int((tmp_path / "term" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= step < 500


def test_refcache_interrupted_then_resumed_loses_and_duplicates_nothing(tmp_path):
    from vbon_ds.data.prompts import load_prompts
    from vbon_ds.data.refcache import RefCache
    from vbon_ds.jobs.build_refcache import all_prompts

    config = tiny_config_file(tmp_path, "cache", "train.refcache_shard_prompts=4")
    proc = start_vbon(
        "refcache", "--config", str(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    root = tmp_path / "cache" / "refcache"
    deadline = time.time() + 300
    while len(list(root.glob("shard-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_before = len(list(root.glob("shard-*.parquet")))
    assert 2 <= shards_before < 12, "the run should have been killed part-way"

    result = vbon("refcache", "--config", str(config))
    assert f"refcache: 48 prompts x M=16 in {root}" in result.stdout
    cfg = demo_config("tiny", tmp_path / "cache")
    expected = all_prompts(cfg).ids
    cache = RefCache(root)
    assert sorted(cache.record(pid).prompt_id for pid in expected) == sorted(expected)
    ids_on_disk = []
    import pyarrow.parquet as pq

    for shard in root.glob("shard-*.parquet"):
        ids_on_disk += pq.read_table(shard, columns=["prompt_id"])["prompt_id"].to_pylist()
    assert sorted(ids_on_disk) == sorted(expected), "a prompt was lost or written twice"
    assert len(load_prompts(cfg.data, "eval")) == 8


def test_bon_and_evaluate_from_the_cache_and_fingerprint_mismatch(tmp_path):
    config = tiny_config_file(tmp_path, "fp")
    vbon("refcache", "--config", str(config))
    bon = vbon("bon", "--config", str(config))
    assert "BoN(4) on 8 evaluation prompts" in bon.stdout
    answers = [
        json.loads(line) for line in (tmp_path / "fp" / "eval" / "bon_n4.jsonl").read_text().splitlines()
    ]
    assert len(answers) == 8 and all(isinstance(a["response"], str) for a in answers)
    evaluation = vbon("evaluate", "--config", str(config))
    assert "evaluation after 0 training steps" in evaluation.stdout and "| policy | 1 |" in evaluation.stdout

    result = vbon("train", "--config", str(config), "--set", "generation.temperature=0.5", check=False)
    assert result.returncode == 2
    assert "temperature: cached 1.0, now 0.5" in result.stderr


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "hello there"}], "no column 'prompt' (columns: text); set data.prompt_column"),
        ([{"prompt": "fine"}, {"prompt": "  "}, {"prompt": "also fine"}], "row 1"),
    ],
)
def test_bad_prompt_files_are_reported(tmp_path, rows, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tiny_config_file(tmp_path, "bad", f"data.source={data}")
    result = vbon("refcache", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_config_typo_is_reported(tmp_path):
    config = tiny_config_file(tmp_path, "typo")
    result = vbon("train", "--config", str(config), "--set", "train.setps=3", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "vbon: error: train.setps: unknown key; did you mean 'steps'?"
