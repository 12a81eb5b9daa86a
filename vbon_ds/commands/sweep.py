"""`vbon sweep --config SWEEP.yaml`: the reward-KL frontier in one command.

    one reference cache -> train every run on it (vBoN at several N, KL-RL over beta, the offline baselines)
    -> one `vbon evaluate` of all finished runs + the BoN(n) curve -> <output_dir>/frontier.{json,md,png}

Each stage is a subprocess (`python -m vbon_ds ...`, or behind `launcher`, e.g. `torchrun --nproc_per_node 2`)
logging to <output_dir>/logs/<stage>.log, so a failing run is reported and the others go on; it dies with
the sweep, however the sweep ends (see `run_to_the_end`). Rerunning the sweep resumes it: the cache is only
completed, a run whose training finished (its latest verified checkpoint is at train.steps and final/
exists) is not started again, an interrupted one resumes from its checkpoint.
Layout of <output_dir>: base.yaml (the base experiment, resolved), configs/<name>.yaml (each run's config),
refcache/ (the shared cache; its lock and its job's files), runs/<name>/ (checkpoints, tensorboard/, final/),
logs/, status.json (each stage's outcome and wall time), frontier.{json,md,png}.
The sweep YAML:

    output_dir: runs/sweep            # where everything goes (relative to the working directory)
    base:                             # the experiment every run starts from; at most one of preset / config
      preset: smollm2                 #   a `vbon demo` preset (tiny, smollm2), or
      config: ../launch/tldr_vbon.yaml  #   an experiment YAML (relative to the sweep file)
      set: [train.steps=20]           #   --set overrides for every run
    launcher: ""                      # optional command prefix of every stage
    evaluate:
      set: [generation.eval_samples=8]  # --set overrides of the evaluation only
    runs:                             # name (letters, digits, . _ -) + --set overrides, one per point
      - {name: vbon_n4, set: [vbon.n=4]}

The sweep places every run and the cache: train.output_dir and train.refcache_dir are refused in any `set`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vbon_ds.config import ConfigError, ExperimentConfig, _load_yaml, dump_config, load_config
from vbon_ds.data.refcache import fingerprint_from_config, open_refcache, prompt_texts
from vbon_ds.engines.checkpoint import read_trainer_state, resume_checkpoint
from vbon_ds.errors import VbonError, writing
from vbon_ds.runlock import run_lock

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_KEYS = ("output_dir", "base", "launcher", "evaluate", "runs")
# Paths every stage gets from the sweep: an override of them would be replaced, so it is refused.
SWEEP_PATHS = {
    "train.output_dir": "each run trains in <output_dir>/runs/<name>",
    "train.refcache_dir": "every run shares the cache in <output_dir>/refcache",
}


@dataclass
class SweepRun:
    """One point of the frontier: its name (directory runs/<name>) and its --set overrides."""

    name: str
    overrides: list[str]


@dataclass
class Sweep:
    """A validated sweep file."""

    output_dir: Path
    runs: list[SweepRun]
    preset: str = ""
    base_config: Path | None = None
    base_overrides: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)


def _mapping(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known keys: {', '.join(keys)})")
    return value


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings, got {value!r}")
    for override in value:
        key = override.split("=", 1)[0].strip()
        if key in SWEEP_PATHS:
            raise ConfigError(
                f"{where}: {key} is the sweep's to set ({SWEEP_PATHS[key]}); remove it, or change the "
                "sweep file's output_dir"
            )
    return value


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _launcher(text: str) -> list[str]:
    """The launcher's words, its program resolved on PATH or beside this Python (a venv not activated)."""
    words = shlex.split(text)
    if not words:
        return []
    beside = Path(sys.executable).parent / words[0]
    found = shutil.which(words[0]) or (str(beside) if shutil.which(beside) else None)
    if found is None:
        raise ConfigError(f"launcher: {words[0]!r} is not a command on PATH nor beside {sys.executable}")
    return [found, *words[1:]]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML; every message names the field (runs[i] for a run)."""
    from vbon_ds.commands.demo import PRESETS

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid YAML file: {' '.join(str(err).split())}") from None
    data = _mapping(data, f"{path}: ", TOP_KEYS)
    output_dir = _string(data.get("output_dir"), "output_dir").strip()
    if not output_dir:
        raise ConfigError("output_dir: required (the sweep's directory)")
    base = _mapping(data.get("base") or {}, "base.", ("preset", "config", "set"))
    preset = _string(base.get("preset"), "base.preset")
    config = _string(base.get("config"), "base.config")
    if preset and preset not in PRESETS:
        raise ConfigError(f"base.preset: {preset!r} is not allowed (allowed: {', '.join(PRESETS)})")
    if preset and config:
        raise ConfigError("base: give base.preset or base.config, not both")
    base_config = (path.parent / config) if config else None
    if base_config is not None and not base_config.is_file():
        raise ConfigError(f"base.config: {base_config} not found")
    evaluate = _mapping(data.get("evaluate") or {}, "evaluate.", ("set",))
    runs_value = data.get("runs")
    if not isinstance(runs_value, list) or not runs_value:
        raise ConfigError("runs: expected a non-empty list of {name, set} entries")
    runs, seen = [], set()
    for i, entry in enumerate(runs_value):
        entry = _mapping(entry, f"runs[{i}].", ("name", "set"))
        name = _string(entry.get("name"), f"runs[{i}].name")
        if not RUN_NAME.match(name):
            raise ConfigError(f"runs[{i}].name: {name!r} is not a directory name (letters, digits, . _ -)")
        if name in seen:
            raise ConfigError(f"runs[{i}].name: {name!r} is used twice")
        seen.add(name)
        runs.append(SweepRun(name, _overrides(entry.get("set"), f"runs[{i}] ({name}).set")))
    return Sweep(
        output_dir=Path(output_dir).expanduser().resolve(),
        runs=runs,
        preset=preset,
        base_config=base_config,
        base_overrides=_overrides(base.get("set"), "base.set"),
        launcher=_launcher(_string(data.get("launcher"), "launcher")),
        eval_overrides=_overrides(evaluate.get("set"), "evaluate.set"),
    )


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
        if not (self.cache_dir / "fingerprint.json").is_file():
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
        return trained


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
    print(f"\nsweep: {len(trained)} runs on the frontier plot ({sweep.output_dir}/frontier.png):\n{table}")
    if failed:
        raise VbonError(
            f"sweep: {len(failed)} of {len(sweep.runs)} runs failed ({', '.join(failed)}); see "
            f"{sweep.output_dir}/logs/ and rerun `vbon sweep` to retry them (finished runs are kept)"
        )
