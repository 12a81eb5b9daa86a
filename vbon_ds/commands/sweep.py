"""`vbon sweep --config SWEEP.yaml`: the reward-KL frontier in one command.

    one reference cache -> train every run on it (vBoN at several N, KL-RL over beta, the offline baselines)
    -> one `vbon evaluate` of all finished runs + the BoN(n) curve -> <output_dir>/frontier.{json,md,png}
    -> how often each method's runs are on the Pareto front -> <output_dir>/front_counts.{json,md}

Each stage is a subprocess (`python -m vbon_ds ...`, or behind `launcher`, e.g. `torchrun --nproc_per_node 2`)
logging to <output_dir>/logs/<stage>.log, so a failing run is reported and the others go on; it dies with
the sweep, however the sweep ends (see `run_to_the_end`). Rerunning the sweep resumes it: the cache is only
completed, a run whose training finished (its latest verified checkpoint is at train.steps and final/
exists) is not started again, an interrupted one resumes from its checkpoint.
Layout of <output_dir>: base.yaml (the base experiment, resolved), configs/<name>.yaml (each run's config),
refcache/ (the shared cache; its lock and its job's files), runs/<name>/ (checkpoints, tensorboard/, final/),
logs/, status.json (each stage's outcome and wall time), frontier.{json,md,png}, front_counts.{json,md}.
The sweep YAML, and its checks, are in sweep_file.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vbon_ds.commands.sweep_file import Sweep, load_sweep
from vbon_ds.config import ConfigError, ExperimentConfig, dump_config, load_config
from vbon_ds.core.frontier import DOMINANCE_RULE
from vbon_ds.data.refcache import open_refcache, prompt_texts
from vbon_ds.data.refcache_fingerprint import FINGERPRINT_FILE, fingerprint_from_config
from vbon_ds.engines.checkpoint_layout import read_trainer_state, resume_checkpoint
from vbon_ds.errors import VbonError, writing
from vbon_ds.jobs.report import EvalRow, format_front_counts, method_front_counts
from vbon_ds.runlock import run_lock

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Stage:
    """One subprocess of the sweep and how it went."""

    name: str
    status: str = "pending"
    """pending, running, done, skipped (finished before), failed, stopped (Ctrl-C or SIGTERM)."""
    seconds: float = 0.0
    log: str = ""
    detail: str = ""


class SweepDriver:
    """Builds every stage's config up front (so a bad run fails before any work), then runs the stages."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.root = sweep.output_dir
        self.cache_dir = self.root / "refcache"
        self.stages: dict[str, Stage] = {}

    # ------------------------------------------------------------ configs

    def base_config(self) -> ExperimentConfig:
        """The base experiment, written to base.yaml: its output directory is refcache/ (the cache job's),
        which is also the shared cache every run reads."""
        sweep, path = self.sweep, self.root / "base.yaml"
        shared = [f"train.output_dir={self.cache_dir}", f"train.refcache_dir={self.cache_dir}"]
        try:
            if sweep.preset:
                from vbon_ds.commands.demo import demo_config

                # The tiny preset makes its model under the directory given: the sweep's own.
                _write_config(path, demo_config(sweep.preset, self.root, sweep.base_overrides))
                cfg = load_config(path, shared)
            else:
                cfg = load_config(sweep.base_config, [*sweep.base_overrides, *shared])
        except VbonError as err:
            raise ConfigError(f"base: {err}") from None
        _write_config(path, cfg)
        return cfg

    def run_configs(self, base: ExperimentConfig) -> dict[str, ExperimentConfig]:
        """Each run's config (written to configs/<name>.yaml): the base, the run's overrides, its own
        output directory, the shared cache. Every run is checked before any is written."""
        configs = {}
        cached = fingerprint_from_config(base)
        for i, run in enumerate(self.sweep.runs):
            where = f"runs[{i}] ({run.name})"
            placed = [f"train.output_dir={self.run_dir(run.name)}", f"train.refcache_dir={self.cache_dir}"]
            try:
                cfg = load_config(self.root / "base.yaml", [*run.overrides, *placed])
            except VbonError as err:
                raise ConfigError(f"{where}: {err}") from None
            changed = [k for k, v in fingerprint_from_config(cfg).items() if cached[k] != v]
            if changed:
                raise ConfigError(
                    f"{where}: its overrides change the reference cache's settings ({', '.join(changed)}); "
                    "every run of a sweep shares one cache: set these in base.set"
                )
            configs[run.name] = cfg
        for name, cfg in configs.items():
            _write_config(self.config_path(name), cfg)
        return configs

    def config_path(self, name: str) -> Path:
        return self.root / "configs" / f"{name}.yaml"

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    # ------------------------------------------------------------ stages

    def command(self, *args: str) -> list[str]:
        """`python -m vbon_ds ARGS`, or `LAUNCHER -m vbon_ds ARGS` behind a launcher."""
        head = self.sweep.launcher or [sys.executable]
        return [*head, "-m", "vbon_ds", *args]

    def death_signal(self) -> int:
        """What a stage gets when the sweep is killed: SIGKILL, which ends it at once and frees its run lock;
        a launcher gets SIGTERM instead, on which it stops its workers (they are not in its process group)."""
        return signal.SIGTERM if self.sweep.launcher else signal.SIGKILL

    def stage(self, name: str, args: list[str], what: str) -> bool:
        """Run one stage, its output in logs/<name>.log; record how it went; True when it succeeded."""
        stage = self.stages.setdefault(name, Stage(name))
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        stage.log = str(log)
        print(f"sweep: {what} ...", flush=True)
        start = time.monotonic()
        stage.status = "running"
        self.save_status()
        with writing(log), log.open("w") as out:
            out.write(f"$ {shlex.join(self.command(*args))}\n")
            out.flush()
            try:
                code = run_to_the_end(self.command(*args), out, self.death_signal())
            except (KeyboardInterrupt, VbonError):
                stage.status, stage.seconds = "stopped", round(time.monotonic() - start, 1)
                self.save_status()
                raise
        stage.seconds = round(time.monotonic() - start, 1)
        ok = code == 0
        stage.status = "done" if ok else "failed"
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        stage.detail = "" if ok else f"{how}: {_last_error(log)}"
        print(
            f"sweep: {what}: {stage.status} in {stage.seconds:.0f} s" + ("" if ok else f" ({stage.detail})")
        )
        self.save_status()
        return ok

    def finished(self, cfg: ExperimentConfig) -> int | None:
        """The step count of a run whose training is complete (None: it is not, or cannot be read)."""
        out = Path(cfg.train.output_dir)
        try:
            checkpoint = resume_checkpoint(out / "checkpoints")
            step = int(read_trainer_state(checkpoint)["step"]) if checkpoint is not None else -1
        except (VbonError, OSError, ValueError, KeyError):
            return None
        return step if step >= cfg.train.steps and (out / "final").is_dir() else None

    def cache_complete(self, base: ExperimentConfig) -> bool:
        """Whether the shared cache already holds every prompt, made under the base's settings."""
        if not (self.cache_dir / FINGERPRINT_FILE).is_file():
            return False
        try:
            cache = open_refcache(base)
        except VbonError:
            return False  # other settings or a damaged shard: the refcache stage says what is wrong
        return all(pid in cache for pid in prompt_texts(base))

    def save_status(self) -> None:
        path = self.root / "status.json"
        with writing(path):
            path.write_text(json.dumps({name: asdict(s) for name, s in self.stages.items()}, indent=2) + "\n")

    def run(self) -> list[str]:
        """Every stage in order; returns the names of the runs that ended trained."""
        base = self.base_config()
        configs = self.run_configs(base)
        base_yaml = str(self.root / "base.yaml")
        if self.cache_complete(base):
            self.stages["refcache"] = Stage("refcache", "skipped", detail="complete")
            print("sweep: reference cache: complete, skipped")
        elif not self.stage("refcache", ["refcache", "--config", base_yaml], "reference cache"):
            raise VbonError(
                f"sweep: the reference cache failed ({self.stages['refcache'].detail}); see its log"
            )
        trained = []
        for i, (name, cfg) in enumerate(configs.items(), 1):
            what = f"[{i}/{len(configs)}] train {name}"
            steps = self.finished(cfg)
            if steps is not None:
                self.stages[name] = Stage(name, "skipped", detail=f"finished earlier at step {steps}")
                print(f"sweep: {what}: skipped (finished earlier at step {steps})")
                trained.append(name)
                continue
            if self.stage(name, ["train", "--config", str(self.config_path(name))], what):
                trained.append(name)
        self.save_status()
        if not trained:
            raise VbonError("sweep: no run finished training; see the logs in " + str(self.root / "logs"))
        evaluate = ["evaluate", "--config", base_yaml, "--out", str(self.root / "frontier")]
        evaluate += [arg for o in self.sweep.eval_overrides for arg in ("--set", o)]
        evaluate += ["--runs", *(str(self.run_dir(name)) for name in trained)]
        if not self.stage("evaluate", evaluate, f"evaluate {len(trained)} runs + BoN(n)"):
            raise VbonError(f"sweep: the evaluation failed ({self.stages['evaluate'].detail}); see its log")
        self.write_front_counts(configs)
        return trained

    def write_front_counts(self, configs: dict[str, ExperimentConfig]) -> None:
        """front_counts.{json,md} from frontier.json: per method, how many of its runs' points are on the
        front of the trained runs, and on the table's front (with BoN(n) and the reference)."""
        rows = [EvalRow(**row) for row in json.loads((self.root / "frontier.json").read_text())]
        methods = {run.name: run.method for run in self.sweep.runs}
        counts = method_front_counts(rows, methods, {name: cfg.train.seed for name, cfg in configs.items()})
        for ext, text in (
            ("json", json.dumps({"rule": DOMINANCE_RULE, "methods": counts}, indent=2) + "\n"),
            ("md", format_front_counts(counts)),
        ):
            path = self.root / f"front_counts.{ext}"
            with writing(path):
                path.write_text(text)


def run_to_the_end(command: list[str], out: Any, death_signal: int = signal.SIGKILL) -> int:
    """Run a stage; on Ctrl-C or SIGTERM (passed on to it) wait until it stops by itself, so a training run
    checkpoints at its next step boundary, then stop the sweep.

    The stage dies with the sweep: it runs in its own process group (so the terminal's Ctrl-C reaches the
    sweep only, which passes it on), the group is killed whenever this returns or raises, and if the sweep
    itself is killed (SIGKILL, which no handler sees) the kernel sends the stage `death_signal`.
    """
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,  # outside the terminal's foreground group a read would stop it (SIGTTIN)
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent(death_signal),
    )
    stopped: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        stopped.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            print(
                "sweep: interrupted; the running stage stops at its next checkpoint (Ctrl-C again: kill it)"
            )
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _kill_group(proc)
    if stopped:
        raise VbonError("sweep: stopped by SIGTERM; rerun `vbon sweep` to resume it")
    return code


def _die_with_parent(death_signal: int) -> Callable[[], None] | None:
    """A Popen preexec_fn asking Linux to send the child `death_signal` when the sweep's main thread (the
    one that starts every stage) ends; None where there is no prctl (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # the sweep died before the request was in place
            os.kill(os.getpid(), death_signal)

    return arm


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a stage's process group (its leader has been waited for, or is being killed)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _write_config(path: Path, cfg: ExperimentConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        path.write_text(dump_config(cfg))


def _last_error(log: Path) -> str:
    """The last `vbon: error:` line of a stage's log, else its last line (for the one-line report)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("vbon: error:")]
    return (errors or lines or ["no output"])[-1][:300]


def run_sweep(path: str | Path) -> None:
    """Load the sweep file, hold the sweep directory's lock, run every stage, report."""
    sweep = load_sweep(path)
    with run_lock(sweep.output_dir, "vbon sweep", setting="output_dir"):
        driver = SweepDriver(sweep)
        trained = driver.run()
    failed = [s.name for s in driver.stages.values() if s.status == "failed"]
    table = (sweep.output_dir / "frontier.md").read_text()
    counts = (sweep.output_dir / "front_counts.md").read_text()
    print(f"\nsweep: {len(trained)} runs on the frontier plot ({sweep.output_dir}/frontier.png):\n{table}")
    print(f"sweep: how often each method is on the Pareto front (front_counts.md):\n{counts}")
    if failed:
        raise VbonError(
            f"sweep: {len(failed)} of {len(sweep.runs)} runs failed ({', '.join(failed)}); see "
            f"{sweep.output_dir}/logs/ and rerun `vbon sweep` to retry them (finished runs are kept)"
        )
