"""`vbon sweep`: the sweep file's checks, and a tiny sweep end to end with a failing run, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from vbon_ds.commands.sweep import SweepDriver
from vbon_ds.commands.sweep_file import load_sweep
from vbon_ds.config import ConfigError, load_config
from vbon_ds.errors import VbonError
from vbon_ds.monitor import read_scalars


def write_sweep(path: Path, runs: list[dict], **top) -> Path:
    body = {"output_dir": str(path.parent / "sweep"), "base": {"preset": "tiny"}, "runs": runs, **top}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    "top, runs, message",
    [
        ({}, [], "runs: expected a non-empty list"),
        ({}, [{"name": "a"}, {"name": "a"}], "runs[1].name: 'a' is used twice"),
        ({}, [{"name": "a/b"}], "runs[0].name: 'a/b' is not a directory name"),
        ({}, [{"name": "a", "set": "vbon.n=4"}], "runs[0] (a).set: expected a list of KEY=VALUE strings"),
        (
            {},
            [{"name": "a"}, {"name": "b", "set": ["vbon.n=4", "train.output_dir=/tmp/b"]}],
            "runs[1] (b).set: train.output_dir is the sweep's to set (each run trains in <output_dir>/runs/",
        ),
        (
            {},
            [{"name": "a", "set": [" train.refcache_dir = /tmp/c"]}],
            "runs[0] (a).set: train.refcache_dir is the sweep's to set (every run shares the cache in",
        ),
        (
            {"base": {"preset": "tiny", "set": ["train.refcache_dir=/tmp/c"]}},
            [{"name": "a"}],
            "base.set: train.refcache_dir is the sweep's to set",
        ),
        ({}, [{"name": "a", "sett": []}], "runs[0].sett: unknown key"),
        ({"base": {"preset": "huge"}}, [{"name": "a"}], "base.preset: 'huge' is not allowed"),
        ({"base": {"preset": "tiny", "config": "x.yaml"}}, [{"name": "a"}], "base: give base.preset or"),
        ({"output_dir": ""}, [{"name": "a"}], "output_dir: required"),
        ({"evaluation": {}}, [{"name": "a"}], "evaluation: unknown key"),
        (
            {"launcher": "no-such-launcher -n 2"},
            [{"name": "a"}],
            "launcher: 'no-such-launcher' is not a command",
        ),
    ],
)
def test_sweep_file_errors_name_the_field(tmp_path, top, runs, message):
    path = write_sweep(tmp_path / "sweep.yaml", runs, **top)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)


def test_run_configs_are_checked_before_any_work_and_share_one_cache(tmp_path):
    runs = [{"name": "n4", "set": ["vbon.n=4"]}, {"name": "hot", "set": ["generation.temperature=0.5"]}]
    driver = SweepDriver(load_sweep(write_sweep(tmp_path / "s.yaml", runs)))
    with pytest.raises(ConfigError, match=r"runs\[1\] \(hot\): .*cache's settings \(temperature\)"):
        driver.run_configs(driver.base_config())
    assert not (tmp_path / "sweep" / "configs").exists()  # nothing written for any run
    runs[1] = {"name": "typo", "set": ["vbon.nn=4"]}
    driver = SweepDriver(load_sweep(write_sweep(tmp_path / "s.yaml", runs)))
    with pytest.raises(ConfigError, match=r"runs\[1\] \(typo\): vbon.nn: unknown key"):
        driver.run_configs(driver.base_config())
    runs.pop()
    driver = SweepDriver(load_sweep(write_sweep(tmp_path / "s.yaml", runs)))
    configs = driver.run_configs(driver.base_config())
    cfg = load_config(tmp_path / "sweep" / "configs" / "n4.yaml")
    assert cfg == configs["n4"] and cfg.vbon.n == 4
    assert cfg.train.output_dir == str(tmp_path / "sweep" / "runs" / "n4")
    assert cfg.train.refcache_dir == str(tmp_path / "sweep" / "refcache")


def test_the_sweeps_directory_is_named_as_its_output_dir(tmp_path):
    from vbon_ds.commands.sweep import run_sweep

    (tmp_path / "file").write_text("x")
    path = write_sweep(tmp_path / "s.yaml", [{"name": "a"}], output_dir=str(tmp_path / "file" / "sweep"))
    with pytest.raises(
        VbonError, match=rf"^output_dir {tmp_path / 'file' / 'sweep'}: .* is a file, not a dir"
    ):
        run_sweep(path)


def test_a_stage_leaves_no_process_behind(tmp_path):
    from vbon_ds.commands.sweep import run_to_the_end

    # The stage starts a helper of its own and exits: the helper must not outlive the stage.
    helper = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', sys.argv[1]]).pid)"
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        code = run_to_the_end([sys.executable, "-c", helper, "import time; time.sleep(600)"], out)
    assert code == 0
    pid = int(log.read_text())
    wait_for(
        lambda: not alive(pid), "the stage's helper to be killed", seconds=60
    )  # SIGKILL takes effect when it runs


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_for(condition, what: str, seconds: float = 600):
    """Poll `condition` until it returns something truthy; a deadline only keeps a broken run from hanging."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_stage_dies_with_a_killed_sweep(tmp_path):
    # A sweep process (here: the function that runs its stages) killed with SIGKILL, which it cannot handle.
    sweep = (
        "import sys; from vbon_ds.commands.sweep import run_to_the_end\n"
        "stage = [sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(600)']\n"
        "run_to_the_end(stage, open(sys.argv[1], 'w'))\n"
    )
    log = tmp_path / "stage.log"
    proc = subprocess.Popen([sys.executable, "-c", sweep, str(log)], env=launch_env())
    try:
        stage = int(wait_for(lambda: log.exists() and log.read_text().strip(), "the stage to start"))
        assert alive(stage)
        proc.kill()
        proc.wait()
        wait_for(lambda: not alive(stage), "the stage to die with the sweep", seconds=60)
    finally:
        proc.kill()


def launch_env() -> dict[str, str]:
    """This environment without the process-group variables an in-process test may have left behind."""
    dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


def sweep_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=launch_env(),
    )


@pytest.mark.slow
def test_tiny_sweep_reports_a_failed_run_survives_sigterm_and_resumes_without_retraining(tmp_path):
    base = {
        "preset": "tiny",
        "set": ["train.steps=1", "data.max_train_prompts=4", "generation.eval_samples=2",
                "logging.progress_bar=false"],
    }  # fmt: skip
    runs = [
        {"name": "vbon_n2", "set": ["vbon.n=2"]},
        {"name": "late", "set": ["model.trainable_layers=9"]},  # fails: the tiny model has 2 layers
    ]
    path = write_sweep(tmp_path / "sweep.yaml", runs, base=base)
    root = tmp_path / "sweep"
    first = sweep_cli(path)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "sweep: 1 of 2 runs failed (late)" in first.stderr
    status = json.loads((root / "status.json").read_text())
    assert [status[n]["status"] for n in ("refcache", "vbon_n2", "late", "evaluate")] == [
        "done", "done", "failed", "done"
    ]  # fmt: skip
    assert "model.trainable_layers: 9 is out of range" in status["late"]["detail"]
    rows = json.loads((root / "frontier.json").read_text())
    assert [r["method"] for r in rows if r["run"]] == ["vbon_n2"]  # one row per finished run (T = 1)
    assert (root / "runs" / "vbon_n2" / "tensorboard").is_dir()
    kept = (root / "runs" / "vbon_n2" / "checkpoints" / "latest").stat().st_mtime_ns

    # Fixed, and long: SIGTERM to the sweep reaches the trainer, which checkpoints at its next step.
    runs[1]["set"] = ["train.steps=500", "train.checkpoint_every=0"]
    write_sweep(path, runs, base=base)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=launch_env(),
    )  # fmt: skip
    events = root / "runs" / "late" / "tensorboard"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not read_scalars_if_any(events):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "sweep: stopped by SIGTERM" in stderr, stderr[-3000:]
    assert json.loads((root / "status.json").read_text())["late"]["status"] == "stopped"
    step = int((root / "runs" / "late" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= step < 500

    runs[1]["set"] = [f"train.steps={step + 1}"]  # the rerun resumes it for one more step
    write_sweep(path, runs, base=base)
    third = sweep_cli(path)
    assert third.returncode == 0, third.stderr[-3000:]
    status = json.loads((root / "status.json").read_text())
    assert [status[n]["status"] for n in ("refcache", "vbon_n2", "late")] == ["skipped", "skipped", "done"]
    assert (
        f"resumed from {root / 'runs' / 'late' / 'checkpoints'}" in (root / "logs" / "late.log").read_text()
    )
    assert (root / "runs" / "vbon_n2" / "checkpoints" / "latest").stat().st_mtime_ns == kept
    rows = json.loads((root / "frontier.json").read_text())
    policy_rows = [r for r in rows if r["run"]]
    assert [r["method"] for r in policy_rows] == ["vbon_n2", "late"]
    assert [r["setting"] for r in policy_rows] == ["vBoN (bound) N=2 (rloo)", "vBoN (bound) N=4 (rloo)"]
    assert [r["steps"] for r in policy_rows] == [1, step + 1]
    table = (root / "frontier.md").read_text()
    assert len(table.splitlines()) == 2 + len(rows) and "| late | 1 |" in table
    png = root / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3


@pytest.mark.slow
def test_sigkill_of_the_sweep_kills_its_training_run_and_frees_the_run_lock(tmp_path):
    from vbon_ds.runlock import LOCK_FILE

    base = {"preset": "tiny", "set": ["data.max_train_prompts=4", "logging.progress_bar=false"]}
    runs = [{"name": "long", "set": ["train.steps=500", "train.checkpoint_every=0"]}]
    path = write_sweep(tmp_path / "sweep.yaml", runs, base=base)
    run_dir = tmp_path / "sweep" / "runs" / "long"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=launch_env(),
    )  # fmt: skip
    try:
        holder = wait_for(lambda: (run_dir / LOCK_FILE).is_file() and (run_dir / LOCK_FILE).read_text(),
                          "the training run to take its lock")  # fmt: skip
        trainer = int(holder.split("(pid ")[1].split()[0])
        assert holder.startswith("vbon train") and alive(trainer)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        wait_for(lambda: not alive(trainer), "the training run to die with the sweep", seconds=60)
    finally:
        sweep.kill()
    # The rerun is not refused. The lock goes with the trainer's last thread, which can outlive the thread
    # /proc shows as dead by a moment on a busy machine: poll, but only for as long as a teardown takes.
    wait_for(lambda: lock_is_free(run_dir), "the run lock to be released", seconds=30)


def lock_is_free(run_dir: Path) -> bool:
    from vbon_ds.runlock import run_lock

    try:
        with run_lock(run_dir, "vbon train"):
            return True
    except VbonError:
        return False


def read_scalars_if_any(events: Path) -> dict:
    return read_scalars(events) if events.is_dir() else {}


def test_run_settings_name_method_n_and_beta():
    from vbon_ds.config import config_to_dict
    from vbon_ds.jobs.evaluate import run_setting

    def setting(*overrides: str) -> str:
        return run_setting(config_to_dict(load_config(None, list(overrides))))

    assert setting("vbon.n=16", "algo.name=rloo", "algo.samples_per_prompt=2") == "vBoN (bound) N=16 (rloo)"
    assert setting("vbon.objective=vbon_exact") == "vBoN (exact) N=8 (ppo)"
    assert setting("vbon.objective=kl_rl", "vbon.beta=0.05") == "KL-RL beta=0.05 (ppo)"
    assert setting("algo.name=bon_sft") == "bon_sft N=8"
    assert setting("algo.name=dpo") == "dpo N=8 beta=0.1"
    assert setting("algo.name=bonbon", "vbon.n=4") == "bonbon N=4"


def test_evaluate_names_a_missing_run_directory(tmp_path, capsys):
    from vbon_ds.cli import main
    from vbon_ds.config import dump_config

    config = tmp_path / "c.yaml"
    config.write_text(dump_config(load_config(None, [f"train.output_dir={tmp_path / 'out'}"])))
    assert main(["evaluate", "--config", str(config), "--runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"vbon: error: --runs {tmp_path / 'nope'}: no such run directory\n"


def test_a_launcher_beside_this_python_is_found(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", [{"name": "a"}], launcher="torchrun --nproc_per_node 2")
    launcher = load_sweep(path).launcher
    assert Path(launcher[0]).name == "torchrun" and Path(launcher[0]).is_file()
    assert launcher[1:] == ["--nproc_per_node", "2"]
