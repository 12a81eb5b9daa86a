"""`vbon sweep`: the sweep file's checks, a tiny sweep end to end with a failing run, then resumed; the front
counts per method; the science sweep (benchmarks/gpu_science.py): its estimate, and the file at tiny size."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml

from vbon_ds.commands.sweep import SweepDriver
from vbon_ds.commands.sweep_file import load_sweep
from vbon_ds.config import ConfigError, load_config
from vbon_ds.data.prompts import load_prompts
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
    table = (root / "frontier.md").read_text().split("\n\n")[0]  # the table, then its caption
    assert len(table.splitlines()) == 2 + len(rows) and "| late | 1 |" in table
    counts = json.loads((root / "front_counts.json").read_text())["methods"]
    assert [(c["method"], c["runs"], c["points"]) for c in counts] == [
        ("vbon_n2", ["vbon_n2"], 1),
        ("late", ["late"], 1),
    ]
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


def test_a_runs_method_defaults_to_its_name_and_must_be_a_string(tmp_path):
    runs = [{"name": "a"}, {"name": "b_seed1", "method": "vBoN", "set": ["train.seed=1"]}]
    assert [(r.name, r.method) for r in load_sweep(write_sweep(tmp_path / "s.yaml", runs)).runs] == [
        ("a", "a"),
        ("b_seed1", "vBoN"),
    ]
    with pytest.raises(ConfigError, match=r"runs\[0\]\.method: expected a string"):
        load_sweep(write_sweep(tmp_path / "s.yaml", [{"name": "a", "method": 3}]))


def test_front_counts_group_runs_by_method_among_the_trained_runs():
    from vbon_ds.jobs.report import EvalRow, format_front_counts, method_front_counts

    def row(method, reward, kl, run="r", on_front=False):
        ids = ["p0", "p1", "p2"]
        per_prompt = {"reward": [reward - 0.1, reward, reward + 0.1], "kl": [kl, kl, kl]}  # paired SE 0
        return EvalRow(
            method, 1.0, reward, kl, 0.5, run=run, on_front=on_front, prompt_ids=ids, per_prompt=per_prompt
        )

    rows = [
        row("BoN(8)", 0.9, 0.1, run="", on_front=True),  # not a run: not counted, not on the runs' front
        row("v8", 0.5, 0.5),
        row("v8_seed1", 0.4, 0.6),  # dominated by v8: -0.1 reward and +0.1 KL on every prompt
        row("kl", 0.6, 0.9),
    ]
    methods = {"v8": "vBoN", "v8_seed1": "vBoN", "kl": "KL-RL"}
    counts = method_front_counts(rows, methods, {"v8": 0, "v8_seed1": 1, "kl": 0})
    assert counts == [
        {
            "method": "vBoN",
            "runs": ["v8", "v8_seed1"],
            "seeds": [0, 1],
            "points": 2,
            "on_front": 1,
            "on_table_front": 0,
        },
        {"method": "KL-RL", "runs": ["kl"], "seeds": [0], "points": 1, "on_front": 1, "on_table_front": 0},
    ]
    table = format_front_counts(counts)
    assert "| vBoN | v8 (0), v8_seed1 (1) | 1 of 2 (50%) | 0 of 2 |" in table
    assert "r_A - r_B > SE(r_A - r_B)" in table


REPO = Path(__file__).resolve().parent.parent


def gpu_science():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_science

    return gpu_science


def test_the_science_estimate_is_the_sweeps_totals_times_the_measured_pieces():
    science = gpu_science()
    pieces = science.Pieces(startup=10.0, per_sampled=0.002, per_trained=0.001, per_cached=None)
    on_policy = load_config(None, ["algo.name=rloo", "algo.samples_per_prompt=8", "algo.ppo_epochs=2",
                                   "train.prompts_per_step=4", "train.steps=3"])  # fmt: skip
    offline = load_config(None, ["algo.name=dpo", "algo.subsets_per_prompt=5", "algo.offline_epochs=1",
                                 "train.prompts_per_step=4", "train.steps=2"])  # fmt: skip
    assert science.step_work(on_policy) == science.StepWork(32, 64)
    assert science.step_work(on_policy, 8) == science.StepWork(64, 128)  # the fit's prompts per step
    assert science.step_work(offline) == science.StepWork(0, 40)  # two answers per N-subset, nothing sampled
    # on-policy, 3 steps: 10 + 3 x (32 x 0.002 + 64 x 0.001) = 10.384; offline: 10 + 3 x 40 x 0.001 = 10.12
    runs = [science.step_work(on_policy), science.step_work(offline)]
    assert science.run_seconds(runs[0], 3, pieces) == pytest.approx(10.384, abs=1e-12)
    # evaluation of 3 policies x 24 answers: 10 + 72 x 0.003 = 10.216; one at a time, or both runs at once
    serial = science.remaining_seconds(runs, 3, 1, 3, 24, pieces)
    assert serial == pytest.approx(10.384 + 10.12 + 10.216, abs=1e-12)
    assert science.remaining_seconds(runs, 3, 2, 3, 24, pieces) == pytest.approx(10.384 + 10.216, abs=1e-12)


def test_runs_are_scheduled_as_the_sweep_runs_them_and_the_fit_takes_the_most_steps_that_fit():
    science = gpu_science()
    # each run starts in the first free slot, in order: slots [5, 3] -> 3 + 4; [5, 7] -> 5 + 1 -> [6, 7]
    assert science.makespan([5.0, 3.0, 4.0, 1.0], 2) == 7.0
    assert science.makespan([5.0, 3.0, 4.0, 1.0], 1) == 13.0
    assert science.makespan([5.0, 3.0], 8) == 5.0 and science.makespan([], 4) == 0.0
    cost = lambda steps: 100.0 + 10.0 * steps  # noqa: E731
    assert science.fit_steps(600.0, 50.0, (8, 100), cost) == 45  # 50 + 100 + 450 = 600
    assert science.fit_steps(600.0, 50.0, (8, 40), cost) == 40  # the most the range allows
    assert science.fit_steps(600.0, 450.0, (8, 100), cost) is None  # 450 + 180 > 600
    assert science.fit_steps(None, 1e9, (8, 100), cost) == 100
    # prompts per step: raised to reach B_noise answers, never beyond the training prompts
    assert science.prompts_for_noise(600.0, 8, 128, 288) == 128
    assert science.prompts_for_noise(1500.0, 8, 128, 288) == 188
    assert science.prompts_for_noise(5000.0, 8, 128, 288) == 288
    assert science.prompts_for_noise(None, 8, 16, 288) == 16


def test_a_saved_fit_is_reused_for_its_budget_or_once_its_runs_started(tmp_path, capsys):
    science = gpu_science()
    pieces = science.Pieces(startup=1.0, per_sampled=0.1, per_trained=0.1, per_cached=None)
    fit = science.Fit("d", pieces, None, 0, 8, 8, 2, 2093.0, 237.0, 1500.0, False)
    saved = (fit, ["| noise |"])
    assert science.reusable_fit(None, 1500.0, tmp_path / "runs") is None
    assert science.reusable_fit(saved, 1500.0, tmp_path / "runs") is saved
    assert science.reusable_fit(saved, 2400.0, tmp_path / "runs") is None  # nothing ran yet: fit again
    assert "the budget changed from 1500.0 s; fitting again" in capsys.readouterr().out
    (tmp_path / "runs").mkdir()
    assert science.reusable_fit(saved, 2400.0, tmp_path / "runs") is saved  # the runs keep their steps
    assert "keeping the fit to 1500.0 s" in capsys.readouterr().out


def test_the_noise_scale_is_signal_and_noise_of_the_per_answer_gradients_in_float64():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gradient_noise

    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 5, generator=gen, dtype=torch.float64) + torch.linspace(-1, 1, 5)
    sums = gradient_noise.GradientSums({"w": [torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]})
    for g in grads:
        sums.groups["w"][0].grad = g.clone()
        sums.add()
    scale = sums.scales()["w"]
    n, mean = 12, grads.mean(0)
    trace = float(torch.cov(grads.T).trace())  # unbiased covariance of one gradient
    assert scale.answers == n and scale.noise == pytest.approx(trace, rel=1e-12)
    assert scale.signal == pytest.approx(float(mean @ mean) - trace / n, rel=1e-12)
    assert scale.scale == pytest.approx(scale.noise / scale.signal, rel=1e-12)
    # unbiased: over many batches of 4 draws of N(mu, I_5), the mean signal estimate is |mu|^2 = 0.5, the
    # mean noise estimate tr I = 5 (both within 4 standard errors of the mean of 20000 estimates)
    mu = torch.full((5,), math.sqrt(0.1), dtype=torch.float64)
    draws = torch.randn(20000, 4, 5, generator=gen, dtype=torch.float64) + mu
    total, squares = draws.sum(1).pow(2).sum(-1), draws.pow(2).sum((1, 2))
    estimates = [
        gradient_noise.noise_scale(float(a), float(b), 4) for a, b in zip(total, squares, strict=True)
    ]
    for field, truth in (("signal", 0.5), ("noise", 5.0)):
        values = torch.tensor([getattr(e, field) for e in estimates])
        assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / math.sqrt(len(values))
    assert gradient_noise.NoiseScale(8, -0.1, 3.0).scale is None  # no signal seen: no scale
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise.noise_scale(1.0, 1.0, 1)


def test_the_science_sweep_at_a_size_keeps_its_runs_and_adds_the_sizes_overrides(tmp_path):
    science = gpu_science()
    path = science.sized_sweep("tiny", tmp_path / "out", tmp_path / "tiny.yaml")
    sweep, original = load_sweep(path), load_sweep(REPO / "launch" / "sweep_science.yaml")
    assert [(r.name, r.method, r.overrides) for r in sweep.runs] == [
        (r.name, r.method, r.overrides) for r in original.runs
    ]
    assert sweep.preset == "tiny" and sweep.output_dir == tmp_path / "out"
    source = next(o for o in sweep.base_overrides if o.startswith("data.source="))
    assert Path(source.split("=", 1)[1]).is_file()  # absolute: the sweep may run from anywhere
    tiny = science.SIZES["tiny"]
    assert sweep.base_overrides[-len(tiny.overrides) :] == tiny.overrides and sweep.parallel == tiny.parallel
    fitted = load_sweep(science.sized_sweep("tiny", tmp_path / "out", tmp_path / "f.yaml", ["train.steps=7"]))
    assert fitted.base_overrides == [*sweep.base_overrides, "train.steps=7"]
    # what the issue asks of the full size: M >= 64, hundreds of training prompts, >= 64 held out, 2 seeds
    base = load_config(
        None, [o for o in original.base_overrides if not o.startswith("data.source=")] + [source]
    )
    assert base.vbon.num_ref_samples >= 64
    assert len(load_prompts(base.data, "train")) >= 200 and len(load_prompts(base.data, "eval")) >= 64
    assert base.train.prompts_per_step * base.algo.samples_per_prompt >= 900  # above the noise scale
    seeds = [r.overrides for r in original.runs if "train.seed=1" in r.overrides]
    assert {"vbon.n=8" in o or "vbon.beta=0.1" in o for o in seeds} == {True} and len(seeds) == 2


@pytest.mark.slow
def test_the_science_sweep_at_tiny_size_writes_its_table_front_counts_and_block(tmp_path):
    root = tmp_path / "science"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_science.py"), "--size", "tiny",
         "--output-dir", str(root)],
        capture_output=True, text=True, timeout=1800, env=launch_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu-science: estimate: " in proc.stdout and "ms per sampled answer" in proc.stdout
    fit = json.loads((root / "fit.json").read_text())["fit"]
    # the tiny size: 2 prompts x 2 answers measure the noise, 1 step per run, 2 probe runs side by side
    assert fit["noise_answers"] == 4 and fit["steps"] == 1 and fit["fits"] and fit["prompts_per_step"] >= 2
    for i in range(2):
        assert read_scalars(root / "probe" / "runs" / f"vbon_n2_{i}" / "tensorboard")["time/step"]
    status = json.loads((root / "status.json").read_text())
    assert status["refcache"]["status"] == "skipped"  # the calibration made it
    original = load_sweep(REPO / "launch" / "sweep_science.yaml").runs
    assert all(status[r.name]["status"] == "done" for r in original)
    for r in original:
        assert read_scalars(root / "runs" / r.name / "tensorboard")["time/step"][-1][0] == fit["steps"]
    rows = json.loads((root / "frontier.json").read_text())
    assert [r["method"] for r in rows if r["run"]] == [r.name for r in original]
    counts = json.loads((root / "front_counts.json").read_text())
    assert "r_A - r_B > SE(r_A - r_B)" in counts["rule"]
    by_method = {c["method"]: c for c in counts["methods"]}
    assert list(by_method) == list(dict.fromkeys(r.method for r in original))
    assert by_method["vBoN (bound)"]["seeds"] == [0, 0, 0, 1, 0] and by_method["KL-RL"]["points"] == 4
    # recomputed by hand from the rows' per-prompt values: a run is off the runs' front when another run
    # is better on reward and KL by more than one paired standard error
    runs = [r for r in rows if r["run"]]

    def paired(a, b, stat):
        diffs = [x - y for x, y in zip(a["per_prompt"][stat], b["per_prompt"][stat], strict=True)]
        return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))

    def dominated(row):
        return any(
            paired(o, row, "reward")[0] > paired(o, row, "reward")[1]
            and paired(row, o, "kl")[0] > paired(row, o, "kl")[1]
            for o in runs
            if o is not row
        )

    method = {r.name: r.method for r in original}
    for name, entry in by_method.items():
        mine = [r for r in runs if method[r["method"]] == name]
        assert entry["on_front"] == sum(not dominated(r) for r in mine)
        assert entry["on_table_front"] == sum(r["on_front"] for r in mine)
    block = (root / "RESULTS_block.md").read_text()
    assert "How often each method is on the Pareto front" in block and "| vBoN (exact) |" in block
    assert "Gradient noise scale of the trained weights at pi_ref, from 4 cached answers" in block
    assert matplotlib.image.imread(root / "frontier.png").ndim == 3
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_science.py"), "--size", "tiny",
         "--output-dir", str(root), "--estimate-only"],
        capture_output=True, text=True, timeout=600, env=launch_env(),
    )  # fmt: skip
    assert again.returncode == 0 and "reusing the fit" in again.stdout, again.stderr[-2000:]
    fit = json.loads((root / "fit.json").read_text())["fit"]
    rebudgeted = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_science.py"), "--size", "tiny",
         "--output-dir", str(root), "--estimate-only", "--budget", "5"],
        capture_output=True, text=True, timeout=600, env=launch_env(),
    )  # fmt: skip
    # the runs were started with the first fit: a resumed sweep keeps their steps whatever the budget
    assert rebudgeted.returncode == 0, rebudgeted.stderr[-2000:]
    assert "keeping the fit to 3600.0 s" in rebudgeted.stdout
    assert json.loads((root / "fit.json").read_text())["fit"] == fit
