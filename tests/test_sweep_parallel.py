"""`parallel: K` in a sweep file: its checks, K stages at a time, the environment of stages going at once,
the vLLM memory rule; tiny sweeps training two runs at a time: overlapping, one failing, the weights of a
serial sweep, stopped by SIGTERM and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import alive, launch_env, read_scalars_if_any, sweep_cli, wait_for, write_sweep

from vbon_ds.commands import sweep as sweep_module
from vbon_ds.commands.sweep import SweepDriver, check_vllm_memory, stage_environment
from vbon_ds.commands.sweep_file import load_sweep
from vbon_ds.config import ConfigError, load_config
from vbon_ds.runlock import LOCK_FILE

# The tiny preset, trained for a step or two: seconds per stage on CPU.
TINY_BASE = {
    "preset": "tiny",
    "set": ["train.steps=2", "data.max_train_prompts=4", "generation.eval_samples=2",
            "logging.progress_bar=false"],
}  # fmt: skip


@pytest.mark.parametrize(
    "top, message",
    [
        ({"parallel": 0}, "parallel: 0 is not allowed (allowed: an integer >= 1)"),
        ({"parallel": "2"}, "parallel: '2' is not allowed (allowed: an integer >= 1)"),
        ({"parallel": True}, "parallel: True is not allowed (allowed: an integer >= 1)"),
        ({"parallel": 1.5}, "parallel: 1.5 is not allowed (allowed: an integer >= 1)"),
        (
            {"parallel": 2, "launcher": "torchrun --nproc_per_node 2"},
            "parallel: 2 runs at once is refused with a launcher: launcher stages are multi-process",
        ),
    ],
)
def test_parallel_errors_name_the_key(tmp_path, top, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path / "s.yaml", [{"name": "a"}], **top))
    assert message in str(err.value)


def test_parallel_defaults_to_one_and_goes_with_no_launcher(tmp_path):
    assert load_sweep(write_sweep(tmp_path / "s.yaml", [{"name": "a"}])).parallel == 1
    assert load_sweep(write_sweep(tmp_path / "s.yaml", [{"name": "a"}], parallel=3)).parallel == 3
    one = write_sweep(
        tmp_path / "s.yaml", [{"name": "a"}], parallel=1, launcher="torchrun --nproc_per_node 2"
    )
    assert load_sweep(one).parallel == 1


def test_stages_run_k_at_a_time_in_order_the_next_as_soon_as_one_ends(tmp_path, monkeypatch):
    driver = SweepDriver(load_sweep(write_sweep(tmp_path / "s.yaml", [{"name": "a"}])))
    # A stage here sleeps for its first argument's seconds, then exits with its second.
    stage = "import sys, time; time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))"
    monkeypatch.setattr(driver, "command", lambda *args: [sys.executable, "-c", stage, *args])
    jobs = [("long", ["3", "0"]), ("short", ["0.5", "0"]), ("fails", ["0.5", "3"]), ("last", ["0", "0"])]
    succeeded = driver.run_stages([(name, args, f"stage {name}") for name, args in jobs], parallel=2)
    assert succeeded == {"long": True, "short": True, "fails": False, "last": True}
    status = json.loads((tmp_path / "sweep" / "status.json").read_text())
    assert status["fails"]["status"] == "failed" and status["fails"]["detail"].startswith("exit 3")
    end = {name: s["started"] + s["seconds"] for name, s in status.items()}
    # two at once from the start; "fails" started when "short" ended, "last" when "fails" did, "long" running
    assert abs(status["short"]["started"] - status["long"]["started"]) < 1.0
    assert end["short"] - 0.2 <= status["fails"]["started"] < end["long"]
    assert end["fails"] - 0.2 <= status["last"]["started"] < end["long"]


# A sweep (its driver) running two stages that note Ctrl-C in their log and go on; it exits 130 on Ctrl-C.
CTRL_C_SWEEP = """
import sys
from vbon_ds.commands.sweep import SweepDriver
from vbon_ds.commands.sweep_file import load_sweep

stage = ("import os, signal, time; print(os.getpid(), flush=True); "
         "signal.signal(signal.SIGINT, lambda *_: print('Ctrl-C', flush=True)); time.sleep(600)")
driver = SweepDriver(load_sweep(sys.argv[1]))
driver.command = lambda *args: [sys.executable, "-c", stage]
try:
    driver.run_stages([("a", [], "stage a"), ("b", [], "stage b")], parallel=2)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_reaches_every_running_stage_and_again_kills_them(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", [{"name": "a"}])
    logs = [tmp_path / "sweep" / "logs" / f"{name}.log" for name in ("a", "b")]
    sweep = subprocess.Popen([sys.executable, "-c", CTRL_C_SWEEP, str(path)], env=launch_env())
    try:
        pids = [
            int(wait_for(lambda log=log: stage_output(log)[:1], "the stage to start", seconds=60)[0])
            for log in logs
        ]
        sweep.send_signal(signal.SIGINT)
        for log in logs:
            wait_for(lambda log=log: "Ctrl-C" in stage_output(log), "the stage to get Ctrl-C", seconds=60)
        assert sweep.poll() is None and all(alive(pid) for pid in pids)  # they go on: the sweep waits
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(timeout=60) == 130
    finally:
        sweep.kill()
    wait_for(lambda: not any(alive(pid) for pid in pids), "the stages to be killed", seconds=60)
    status = json.loads((tmp_path / "sweep" / "status.json").read_text())
    assert [status[name]["status"] for name in ("a", "b")] == ["stopped", "stopped"]


def stage_output(log: Path) -> list[str]:
    """The lines a stage wrote to its log, after the command line the sweep writes first."""
    return log.read_text().splitlines()[1:] if log.is_file() else []


def test_stages_going_at_once_are_each_a_world_of_one_with_their_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(sweep_module, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "12345",
    }.items():
        monkeypatch.setenv(key, value)
    assert stage_environment(1) is None  # one at a time: the sweep's own environment, as before
    env = stage_environment(3)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["OMP_NUM_THREADS"] == "5" and env["PATH"]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    assert stage_environment(3)["OMP_NUM_THREADS"] == "2"


def test_runs_at_once_may_take_at_most_nine_tenths_of_the_gpu_for_vllm():
    def configs(fraction: float, engine: str = "vllm") -> dict:
        overrides = [f"generation.engine={engine}", f"generation.vllm_gpu_memory_utilization={fraction}"]
        return {"a": load_config(None, overrides)}

    check_vllm_memory(configs(0.3), 3)
    check_vllm_memory(configs(0.1), 9)  # 9 x 0.1 is 0.9000000000000001 in floats: it fits
    check_vllm_memory(configs(0.95), 1)  # one at a time: the run's own setting, as before
    check_vllm_memory(configs(0.6, engine="hf"), 4)  # no vLLM engine
    with pytest.raises(ConfigError) as err:
        check_vllm_memory(configs(0.1), 10)
    assert "set parallel to 9 at most" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_vllm_memory(configs(0.5), 2)
    assert str(err.value) == (
        "parallel: 2 runs at once, each taking generation.vllm_gpu_memory_utilization 0.5 of the GPU for "
        "vLLM (run a), would take 1.00 of it, over 0.9; set parallel to 1 at most, or lower "
        "generation.vllm_gpu_memory_utilization"
    )


def test_the_driver_refuses_too_many_vllm_runs_at_once_before_any_work(tmp_path):
    base = {"preset": "tiny", "set": ["generation.engine=vllm", "generation.vllm_gpu_memory_utilization=0.4"]}
    runs = [{"name": "a"}, {"name": "b", "set": ["vbon.n=4"]}]
    driver = SweepDriver(load_sweep(write_sweep(tmp_path / "s.yaml", runs, base=base, parallel=3)))
    with pytest.raises(ConfigError, match=r"^parallel: 3 runs at once, .* set parallel to 2 at most"):
        driver.run_configs(driver.base_config())
    assert not (tmp_path / "sweep" / "configs").exists()


def overlap(a: dict, b: dict) -> float:
    """Seconds two stages of status.json ran at once."""
    return min(a["started"] + a["seconds"], b["started"] + b["seconds"]) - max(a["started"], b["started"])


def one_thread_env() -> dict[str, str]:
    """On CPU the thread count changes a run's float sums: both sweeps compared use one thread a stage."""
    return {**launch_env(), "OMP_NUM_THREADS": "1"}


def run_sweep_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)],
        capture_output=True, text=True, timeout=900, env=one_thread_env(),
    )  # fmt: skip


@pytest.mark.slow
def test_two_runs_at_once_overlap_one_fails_and_the_weights_are_a_serial_sweeps(tmp_path):
    runs = [
        {"name": "vbon_n2", "set": ["vbon.n=2", "train.steps=4"]},
        {"name": "late", "set": ["model.trainable_layers=9"]},  # fails: the tiny model has 2 layers
        {"name": "vbon_n4", "set": ["vbon.n=4"]},
    ]
    path = write_sweep(tmp_path / "sweep.yaml", runs, base=TINY_BASE, parallel=2)
    root = tmp_path / "sweep"
    first = run_sweep_cli(path)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "sweep: 1 of 3 runs failed (late)" in first.stderr
    assert (
        "sweep: [2/3] train late: failed in" in first.stdout
        and "sweep: [3/3] train vbon_n4: done in" in first.stdout
    )
    status = json.loads((root / "status.json").read_text())
    assert [status[n]["status"] for n in ("refcache", "vbon_n2", "late", "vbon_n4", "evaluate")] == [
        "done", "done", "failed", "done", "done"
    ]  # fmt: skip
    assert "model.trainable_layers: 9 is out of range" in status["late"]["detail"]
    # the first two started at once; the third when the failed one ended (two at a time), the cache before
    # them and the evaluation after them alone
    assert overlap(status["vbon_n2"], status["late"]) > 0
    assert overlap(status["late"], status["vbon_n4"]) <= 0.1
    assert overlap(status["refcache"], status["vbon_n2"]) <= 0.1
    assert max(overlap(status["evaluate"], status[n]) for n in ("vbon_n2", "vbon_n4")) <= 0.1
    rows = json.loads((root / "frontier.json").read_text())
    assert [r["method"] for r in rows if r["run"]] == ["vbon_n2", "vbon_n4"]

    # The same runs one at a time (the cache kept): byte for byte the same weights.
    (root / "runs").rename(root / "runs_at_once")
    write_sweep(path, [runs[0], runs[2]], base=TINY_BASE, parallel=1)
    serial = run_sweep_cli(path)
    assert serial.returncode == 0, serial.stderr[-3000:]
    for name in ("vbon_n2", "vbon_n4"):
        weights = Path("final") / "model.safetensors"
        at_once, alone = root / "runs_at_once" / name / weights, root / "runs" / name / weights
        assert at_once.read_bytes() == alone.read_bytes(), name


def trainer_pid(run_dir: Path) -> int:
    holder = wait_for(
        lambda: (run_dir / LOCK_FILE).is_file() and (run_dir / LOCK_FILE).read_text(),
        f"the training run in {run_dir} to take its lock",
    )
    assert holder.startswith("vbon train")
    return int(holder.split("(pid ")[1].split()[0])


@pytest.mark.slow
def test_sigterm_stops_both_runs_at_a_checkpoint_and_the_rerun_resumes_them(tmp_path):
    long = ["train.steps=500", "train.checkpoint_every=0"]
    runs = [{"name": "short", "set": ["train.steps=1"]}, {"name": "long1", "set": long},
            {"name": "long2", "set": [*long, "vbon.n=4"]}]  # fmt: skip
    path = write_sweep(tmp_path / "sweep.yaml", runs, base=TINY_BASE, parallel=2)
    root = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vbon_ds", "sweep", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=launch_env(),
    )  # fmt: skip
    try:
        trainers = [trainer_pid(root / "runs" / name) for name in ("long1", "long2")]
        for name in ("long1", "long2"):  # both trained a step: a stop now checkpoints
            wait_for(
                lambda n=name: read_scalars_if_any(root / "runs" / n / "tensorboard"), f"{name}'s first step"
            )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "sweep: stopped by SIGTERM" in stderr, stderr[-3000:]
    assert not [pid for pid in trainers if alive(pid)]  # nothing left running
    status = json.loads((root / "status.json").read_text())
    assert [status[n]["status"] for n in ("short", "long1", "long2")] == ["done", "stopped", "stopped"]
    assert overlap(status["long1"], status["long2"]) > 0
    steps = {}
    for name in ("long1", "long2"):
        steps[name] = int((root / "runs" / name / "checkpoints" / "latest").read_text().strip().split("_")[1])
        assert 1 <= steps[name] < 500
    kept = (root / "runs" / "short" / "checkpoints" / "latest").stat().st_mtime_ns

    # The rerun resumes both for one more step each and leaves the finished run alone.
    for run in runs[1:]:
        run["set"] = [*run["set"][2:], f"train.steps={steps[run['name']] + 1}"]
    write_sweep(path, runs, base=TINY_BASE, parallel=2)
    rerun = sweep_cli(path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    status = json.loads((root / "status.json").read_text())
    assert [status[n]["status"] for n in ("refcache", "short", "long1", "long2")] == [
        "skipped", "skipped", "done", "done"
    ]  # fmt: skip
    for name in ("long1", "long2"):
        log = (root / "logs" / f"{name}.log").read_text()
        assert f"resumed from {root / 'runs' / name / 'checkpoints'}" in log
    assert (root / "runs" / "short" / "checkpoints" / "latest").stat().st_mtime_ns == kept
    rows = json.loads((root / "frontier.json").read_text())
    assert [r["steps"] for r in rows if r["run"]] == [1, steps["long1"] + 1, steps["long2"] + 1]
