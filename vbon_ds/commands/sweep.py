"""`vbon sweep --config SWEEP.yaml`: the reward-KL frontier in one command.

    one reference cache -> train every run on it (vBoN at several N, KL-RL over beta, the offline baselines)
    -> one `vbon evaluate` of all finished runs + the BoN(n) curve -> <output_dir>/frontier.{json,md,png}
    -> how often each method's runs are on the Pareto front -> <output_dir>/front_counts.{json,md}

Each stage is a subprocess (`python -m vbon_ds ...`, or behind `launcher`, e.g. `torchrun --nproc_per_node 2`)
logging to <output_dir>/logs/<stage>.log, so a failing run is reported and the others go on; it dies with
the sweep, however the sweep ends (see `StageProcesses`). The training runs go `parallel` at once (the
sweep file's); the cache before them and the evaluation after them run alone. Rerunning the sweep resumes
it: the cache is only completed, a run whose training finished (its latest verified checkpoint is at
train.steps and final/ exists) is not started again, an interrupted one resumes from its checkpoint.
Layout of <output_dir>: base.yaml (the base experiment, resolved), configs/<name>.yaml (each run's config),
refcache/ (the shared cache; its lock and its job's files), runs/<name>/ (checkpoints, tensorboard/, final/),
logs/, status.json (each stage's outcome and wall time), frontier.{json,md,png}, front_counts.{json,md}.
The sweep YAML, and its checks, are in sweep_file.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
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
from vbon_ds.engines.distributed import threads_per_rank, usable_cores
from vbon_ds.errors import VbonError, writing
from vbon_ds.jobs.report import EvalRow, format_front_counts, method_front_counts
from vbon_ds.models.sampler_choice import resolved_engine
from vbon_ds.runlock import run_lock

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 0.1
"""How often the sweep looks whether a running stage has ended."""
VLLM_MEMORY_LIMIT = 0.9
"""The share of the GPU the vLLM engines of the runs going at once may claim together."""
DISTRIBUTED_VARIABLES = frozenset(
    ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
)
"""What makes a process join a torch.distributed world of several."""


@dataclass
class Stage:
    """One subprocess of the sweep and how it went."""

    name: str
    status: str = "pending"
    """pending, running, done, skipped (finished before), failed, stopped (Ctrl-C or SIGTERM)."""
    seconds: float = 0.0
    log: str = ""
    detail: str = ""
    started: float = 0.0
    """When it started, in unix seconds (0: not in this sweep), so status.json shows which stages overlap."""


StageJob = tuple[str, list[str], str]
"""A stage to run: its name, its `vbon` arguments, what to print about it."""


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
        check_vllm_memory(configs, self.sweep.parallel)
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
        return self.run_stages([(name, args, what)], parallel=1)[name]

    def run_stages(self, jobs: list[StageJob], parallel: int) -> dict[str, bool]:
        """Run `jobs` (name, vbon arguments, what to print) up to `parallel` at once, in their order, the next
        starting as soon as one ends; each logs to logs/<name>.log. Returns whether each succeeded; a failed
        stage does not stop the others. Ctrl-C or SIGTERM is passed on to every running stage and starts no
        other; once all stopped, it is raised (see `StageProcesses`)."""
        waiting, succeeded = list(jobs), {}
        what = {name: text for name, _, text in jobs}
        env = stage_environment(parallel)
        with StageProcesses(self.death_signal()) as processes:
            try:
                while processes.running or (waiting and not processes.stopping):
                    while waiting and len(processes.running) < parallel and not processes.stopping:
                        name, args, _ = waiting.pop(0)
                        self.start_stage(processes, name, args, what[name], env)
                    for ended in processes.wait():
                        succeeded[ended.name] = self.end_stage(ended, what[ended.name])
            finally:  # left by an exception (a second Ctrl-C): the stages still running are being killed
                for name in processes.running:
                    self.end_stage(EndedStage(name, None, processes.seconds(name)), what[name])
        processes.raise_if_stopped()
        return succeeded

    def start_stage(
        self, processes: StageProcesses, name: str, args: list[str], what: str, env: dict[str, str] | None
    ) -> None:
        stage = self.stages.setdefault(name, Stage(name))
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        stage.log, stage.detail = str(log), ""
        print(f"sweep: {what} ...", flush=True)
        stage.status, stage.started = "running", round(time.time(), 3)
        self.save_status()
        command = self.command(*args)
        with writing(log), log.open("w") as out:  # the stage writes to its own copy of the file
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            processes.start(name, command, out, env)

    def end_stage(self, ended: EndedStage, what: str) -> bool:
        """Record and print how a stage ended; True when it succeeded."""
        stage, code = self.stages[ended.name], ended.code
        stage.seconds = round(ended.seconds, 1)
        if code is None:
            stage.status = "stopped"
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
            stage.status = "done" if code == 0 else "failed"
            stage.detail = "" if code == 0 else f"{how}: {_last_error(Path(stage.log))}"
        reason = f" ({stage.detail})" if stage.status == "failed" else ""
        print(f"sweep: {what}: {stage.status} in {stage.seconds:.0f} s{reason}", flush=True)
        self.save_status()
        return stage.status == "done"

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
        jobs = []
        for i, (name, cfg) in enumerate(configs.items(), 1):
            what = f"[{i}/{len(configs)}] train {name}"
            steps = self.finished(cfg)
            if steps is None:
                jobs.append((name, ["train", "--config", str(self.config_path(name))], what))
                continue
            self.stages[name] = Stage(name, "skipped", detail=f"finished earlier at step {steps}")
            print(f"sweep: {what}: skipped (finished earlier at step {steps})")
        self.run_stages(jobs, self.sweep.parallel)
        trained = [name for name in configs if self.stages[name].status in ("done", "skipped")]
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


@dataclass
class EndedStage:
    """A stage whose process ended."""

    name: str
    code: int | None
    """Its exit status; None when the sweep's stop signal was passed on to it (it stopped)."""
    seconds: float


class StageProcesses:
    """The stages running at once, each a subprocess in a session (process group) of its own.

    Inside `with`, Ctrl-C and SIGTERM stop the sweep gently: the signal is passed on to every running stage
    (a training run checkpoints at its next step boundary and exits), `stopping` turns true so that no
    stage starts, and `raise_if_stopped` raises it once all ended; Ctrl-C again kills them at once. A stage's
    process group is killed when the stage ends and on leaving `with`, however that happens; if the sweep
    itself is killed (SIGKILL, which no handler sees) the kernel sends each stage `death_signal`. Linux sends
    it when the *thread* that started the stage ends: every stage is started from the main thread.
    """

    def __init__(self, death_signal: int = signal.SIGKILL) -> None:
        self.death_signal = death_signal
        self.running: dict[str, subprocess.Popen] = {}
        self.stop_signal: int | None = None  # the first Ctrl-C (SIGINT) or SIGTERM
        self._clocks: dict[str, float] = {}
        self._told: set[str] = set()  # the stages the stop signal was passed on to
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StageProcesses:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for proc in self.running.values():
            _kill_group(proc)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.stopping:
            raise KeyboardInterrupt  # Ctrl-C again: leaving `with` kills every stage
        if self.stopping:
            return
        self.stop_signal = signum
        if signum == signal.SIGINT:  # os.write: the handler may interrupt a print
            os.write(
                1, b"sweep: interrupted; the stages stop at their next checkpoint (Ctrl-C again: kill)\n"
            )

    def start(self, name: str, command: list[str], out: Any, env: dict[str, str] | None = None) -> None:
        self.running[name] = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,  # outside the terminal's foreground group, a read stops it (SIGTTIN)
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # the terminal's Ctrl-C reaches the sweep only, which passes it on
            preexec_fn=_die_with_parent(self.death_signal),
        )
        self._clocks[name] = time.monotonic()

    def seconds(self, name: str) -> float:
        return time.monotonic() - self._clocks[name]

    def wait(self) -> list[EndedStage]:
        """Block until a running stage ends (passing a stop on to every running stage meanwhile); the stages
        that ended, their process groups killed."""
        while True:
            # passed on here, not in the handler: a stage started as the signal came gets it too
            for name, proc in self.running.items():
                if self.stopping and name not in self._told:
                    proc.send_signal(self.stop_signal)
                    self._told.add(name)
            ended = [name for name, proc in self.running.items() if proc.poll() is not None]
            if ended:
                return [self._ended(name) for name in ended]
            time.sleep(POLL_SECONDS)

    def _ended(self, name: str) -> EndedStage:
        proc = self.running.pop(name)
        _kill_group(proc)
        return EndedStage(name, None if name in self._told else proc.returncode, self.seconds(name))

    def raise_if_stopped(self) -> None:
        """Raise the stop the sweep was asked for, if any: KeyboardInterrupt for Ctrl-C, VbonError for
        SIGTERM."""
        if self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.stop_signal == signal.SIGTERM:
            raise VbonError("sweep: stopped by SIGTERM; rerun `vbon sweep` to resume it")


def run_to_the_end(command: list[str], out: Any, death_signal: int = signal.SIGKILL) -> int:
    """Run one stage to its end (see `StageProcesses`) and return its exit status."""
    with StageProcesses(death_signal) as processes:
        processes.start("stage", command, out)
        [ended] = processes.wait()
    processes.raise_if_stopped()
    return ended.code


def stage_environment(parallel: int) -> dict[str, str] | None:
    """The environment of stages going `parallel` at once; None (the sweep's own) for one at a time.

    Each stage going beside others is a torch.distributed world of its own process, which picks a free
    MASTER_PORT as it starts (engines/distributed.py): an inherited RANK or MASTER_PORT (`vbon slurm`, a
    launcher) would put them all on one rendezvous port, and a port the sweep picked for each could be taken
    during the stage's start-up, seconds longer than the stage's own pick stays exposed.
    Unless OMP_NUM_THREADS is set, the stages share the cores out: threads contending for a core only wait
    on each other (two 12-step tiny runs on 2 cores: 16 s at once with 2 threads each, 10 s one after the
    other, 6 s at once with 1 thread each). On CPU the thread count changes the float sums, so a run's
    weights match those of a serial sweep's with the same OMP_NUM_THREADS.
    """
    if parallel == 1:
        return None
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_VARIABLES}
    threads = threads_per_rank(usable_cores(), parallel, env.get("OMP_NUM_THREADS"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_vllm_memory(configs: dict[str, ExperimentConfig], parallel: int) -> None:
    """Refuse `parallel` runs at once whose vLLM engines (each takes generation.vllm_gpu_memory_utilization
    of the GPU) would together take more than VLLM_MEMORY_LIMIT of it."""
    claims = {
        name: cfg.generation.vllm_gpu_memory_utilization
        for name, cfg in configs.items()
        if resolved_engine(cfg.generation) == "vllm"
    }
    if parallel == 1 or not claims:
        return
    name = max(claims, key=claims.__getitem__)
    fits = max(1, math.floor(round(VLLM_MEMORY_LIMIT / claims[name], 6)))  # round: 0.9 / 0.1 is 9.000...02
    if parallel > fits:
        raise ConfigError(
            f"parallel: {parallel} runs at once, each taking generation.vllm_gpu_memory_utilization "
            f"{claims[name]:g} of the GPU for vLLM (run {name}), would take {parallel * claims[name]:.2f} "
            f"of it, over {VLLM_MEMORY_LIMIT}; set parallel to {fits} at most, or lower "
            "generation.vllm_gpu_memory_utilization"
        )


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
