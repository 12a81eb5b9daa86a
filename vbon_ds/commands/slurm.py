"""Slurm launch: the one place that turns a job's SLURM_* variables into the commands that run.

`launch/slurm_vbon.sbatch` execs `python -m vbon_ds.commands.slurm job [--launcher srun|deepspeed] STAGE
ARGS...`:

  job   runs as the batch script on the first node: starts one job step with srun and waits for it.
        Slurm's USR1 (`sbatch --signal=B:USR1@T`) reaches this process. For `train` it is forwarded to the
        step; the trainer checkpoints at the next step boundary and exits 0, and then the job requeues
        itself. If the trainer is still busy REQUEUE_MARGIN_S before the time limit (one step plus a save
        outlast the lead time T), the job requeues itself then anyway, and the next run resumes from the
        last complete checkpoint: a job still running at its limit would end in TIMEOUT, never requeued.
        Other stages are requeued at once (reference-cache shards are atomic; evaluation reruns).
        A restarted train job gets `--set train.resume=auto`; a job-array task of `refcache` gets
        `--part TASK/COUNT`.
  task  runs as every srun task and execs the real command, with USR1 ignored until the trainer installs
        its handler (so neither a launcher nor a trainer that is still loading dies of it):
        srun:      one task per GPU; the task is one rank: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
                   MASTER_PORT from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the node list.
        deepspeed: one task per node; a hostfile of the allocation and
                   `deepspeed --no_ssh --node_rank $SLURM_NODEID`, which starts that node's ranks.
  plan  prints what `task` would run here (the same derivation, to check an allocation by hand).

Only the standard library: this runs before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vbon_ds.errors import VbonError

LAUNCHERS = ("srun", "deepspeed")
STAGES = ("refcache", "train", "evaluate", "bon")
PORT_FIRST, PORT_COUNT = 10000, 20000
"""MASTER_PORT is PORT_FIRST + job id mod PORT_COUNT (10000-29999): the same for every task of a job and
for a requeued job, above the well-known ports and below Linux's ephemeral range (32768-60999), where the
kernel hands out ports to outgoing connections that could already hold it."""
REQUEUE_MARGIN_S = 30
"""After USR1 a train job requeues itself this long before its time limit even when the trainer has not
yet checkpointed and exited (a step plus a save that outlast the lead time): a job still running at its
limit ends in TIMEOUT and is never requeued. The next run resumes from the last complete checkpoint."""


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compact node list (`gpu[01-03,07],login1`) as host names, like `scontrol show hostnames`."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        pieces = []
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            pieces.append([literal])
            if ranges:
                pieces.append([name for part in ranges.split(",") for name in _expand_range(part)])
        hosts += ["".join(combo) for combo in itertools.product(*pieces)]
    return hosts


def _expand_range(part: str) -> list[str]:
    low, _, high = part.partition("-")
    if not high:
        return [low]
    return [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]


def _need(env: Mapping[str, str], name: str) -> str:
    if not env.get(name):
        raise VbonError(f"{name} is not set: run this inside a Slurm job (launch/slurm_vbon.sbatch)")
    return env[name]


def rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR (the job's first node) and MASTER_PORT (from the job id) for torch.distributed."""
    hosts = expand_hostlist(_need(env, "SLURM_JOB_NODELIST"))
    port = PORT_FIRST + int(_need(env, "SLURM_JOB_ID")) % PORT_COUNT
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(port)}


@dataclass(frozen=True)
class TaskLaunch:
    """What one srun task runs: `command` with `env` added to its environment, after writing `hostfile`."""

    command: list[str]
    env: dict[str, str]
    hostfile: Path | None = None
    hostfile_text: str = ""


def task_launch(
    launcher: str, vbon_args: Sequence[str], env: Mapping[str, str], python: str = sys.executable
) -> TaskLaunch:
    """The command and environment of this srun task (`env` is the task's SLURM_* environment)."""
    if launcher == "srun":
        added = {
            "RANK": _need(env, "SLURM_PROCID"),
            "LOCAL_RANK": _need(env, "SLURM_LOCALID"),
            "WORLD_SIZE": _need(env, "SLURM_NTASKS"),
            **rendezvous(env),
        }
        threads = int(env.get("SLURM_CPUS_PER_TASK", "1"))
        command = [python, "-m", "vbon_ds", *vbon_args]
        hostfile, text = None, ""
    elif launcher == "deepspeed":
        procs = env.get("VBON_PROCS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE")
        if not procs:
            raise VbonError(
                "the deepspeed launcher needs the number of processes per node: allocate GPUs "
                "(--gpus-per-node) or set VBON_PROCS_PER_NODE"
            )
        hosts = expand_hostlist(_need(env, "SLURM_JOB_NODELIST"))
        text = "".join(f"{host} slots={procs}\n" for host in hosts)
        node_rank = _need(env, "SLURM_NODEID")
        hostfile = Path(env.get("TMPDIR") or tempfile.gettempdir()) / (
            f"vbon-hostfile-{_need(env, 'SLURM_JOB_ID')}-{node_rank}"
        )
        master = rendezvous(env)
        # --no_ssh: this task starts its own node's ranks (no pdsh); --no_local_rank: vbon reads LOCAL_RANK.
        command = [
            python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", node_rank, "--master_addr", master["MASTER_ADDR"],
            "--master_port", master["MASTER_PORT"], "--no_local_rank", "--module", "vbon_ds", *vbon_args,
        ]  # fmt: skip
        added = {}
        threads = max(1, int(env.get("SLURM_CPUS_PER_TASK", "1")) // int(procs))
    else:
        raise VbonError(f"--launcher: unknown launcher {launcher!r} (allowed: {', '.join(LAUNCHERS)})")
    if "OMP_NUM_THREADS" not in env:  # a value the user exported wins, as with torchrun
        added["OMP_NUM_THREADS"] = str(threads)
    return TaskLaunch(command=command, env=added, hostfile=hostfile, hostfile_text=text)


def job_vbon_args(stage: str, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The `vbon` arguments of this run of the job: a restart resumes, an array task does its part."""
    out = [stage, *args]
    if stage == "train" and int(env.get("SLURM_RESTART_COUNT") or 0) > 0:
        out += ["--set", "train.resume=auto"]
    if stage == "refcache" and env.get("SLURM_ARRAY_TASK_ID"):
        count = env.get("VBON_REFCACHE_PARTS") or _need(env, "SLURM_ARRAY_TASK_COUNT")
        out += ["--part", f"{env['SLURM_ARRAY_TASK_ID']}/{count}"]
    return out


def step_command(
    launcher: str, vbon_args: Sequence[str], env: Mapping[str, str], python: str = sys.executable
) -> list[str]:
    """The srun command that starts the job step: every task runs `python -m vbon_ds.commands.slurm task`."""
    command = ["srun", "--kill-on-bad-exit=1"]
    if launcher == "deepspeed":
        nodes = _need(env, "SLURM_JOB_NUM_NODES")
        command += [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
        cpus = env.get("SLURM_CPUS_ON_NODE")  # the one task per node gets all of the node's CPUs
    else:
        cpus = env.get("SLURM_CPUS_PER_TASK")  # srun does not inherit sbatch's --cpus-per-task (22.05+)
    if cpus:
        command.append(f"--cpus-per-task={cpus}")
    return [*command, python, "-m", "vbon_ds.commands.slurm", "task", "--launcher", launcher, *vbon_args]


def run_task(launcher: str, vbon_args: Sequence[str]) -> None:
    """Replace this process by the task's command (same PID, so Slurm's signals reach it)."""
    launch = task_launch(launcher, vbon_args, os.environ)
    if launch.hostfile is not None:
        launch.hostfile.write_text(launch.hostfile_text)
    # Inherited through exec and fork: launchers never die of USR1; the trainer installs its own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    os.execvpe(launch.command[0], launch.command, {**os.environ, **launch.env})


def requeue(job_id: str) -> bool:
    """`scontrol requeue`: Slurm stops the job (this script included) and queues it again."""
    print(f"vbon slurm: requeueing job {job_id}", flush=True)
    if subprocess.run(["scontrol", "requeue", job_id]).returncode != 0:
        print(f"vbon slurm: `scontrol requeue {job_id}` failed; resubmit the job to continue", flush=True)
        return False
    return True


def seconds_left(job_id: str) -> float | None:
    """Seconds until the job's time limit (squeue's end time); None without a limit or an answer."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=60
        )
        end = datetime.fromisoformat(result.stdout.strip())
    except (OSError, subprocess.TimeoutExpired, ValueError):  # no squeue, no answer, or "N/A"
        return None
    return (end - datetime.now()).total_seconds()


def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _stop_step(stage: str, job_id: str, proc: subprocess.Popen) -> float:
    """Act on USR1; returns when (time.monotonic()) to requeue the job even if the step still runs."""
    if stage != "train":
        return time.monotonic()  # reference-cache shards are atomic, evaluation reruns: requeue at once
    proc.send_signal(signal.SIGUSR1)  # srun passes it to every process of the step
    left = seconds_left(job_id)
    if left is None:
        print("vbon slurm: USR1: the trainer checkpoints at the next step, then the job requeues", flush=True)
        return math.inf
    wait = max(0.0, left - REQUEUE_MARGIN_S)
    print(
        f"vbon slurm: USR1: the trainer checkpoints at the next step, then the job requeues; at the latest "
        f"in {wait:.0f} s ({REQUEUE_MARGIN_S} s before the time limit), whatever the trainer is doing",
        flush=True,
    )
    return time.monotonic() + wait


def run_job(launcher: str, stage: str, args: Sequence[str]) -> int:
    """Run the job step; on USR1 stop it the stage's way and requeue the job. Returns the exit code."""
    env = os.environ
    job_id = _need(env, "SLURM_JOB_ID")
    usr1: list[int] = []  # the handler only notes the signal; the loop below acts on it
    signal.signal(signal.SIGUSR1, lambda signum, frame: usr1.append(signum))
    vbon_args = job_vbon_args(stage, args, env)
    command = step_command(launcher, vbon_args, env)
    restarts = env.get("SLURM_RESTART_COUNT") or "0"
    print(f"vbon slurm: job {job_id} (restart {restarts}): {shlex.join(command)}", flush=True)
    proc = subprocess.Popen(command)
    requeue_at: float | None = None  # set when USR1 arrives
    requeued: bool | None = None  # set by the one attempt
    while (rc := _exit_code(proc, timeout=1.0)) is None:
        if usr1 and requeue_at is None:
            requeue_at = _stop_step(stage, job_id, proc)
        if requeue_at is not None and requeued is None and time.monotonic() >= requeue_at:
            if stage == "train":  # a job still running at its time limit ends in TIMEOUT, never requeued
                print(
                    "vbon slurm: warning: the trainer did not checkpoint and exit within the lead time; the "
                    "next run resumes from its last checkpoint. Give one step plus a checkpoint save "
                    "(time/step plus time/save in TensorBoard) more time: submit.sh --signal-seconds",
                    flush=True,
                )
            requeued = requeue(job_id)
    if requeue_at is not None and rc == 0 and requeued is None:  # the trainer stopped in time
        requeue(job_id)
    return rc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vbon_ds.commands.slurm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("job", "run a vbon stage as this Slurm batch job (the sbatch script execs this)"),
        ("task", "exec one srun task's command (started by `job`)"),
        ("plan", "print the command and environment `task` would use here"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--launcher", choices=LAUNCHERS, default="srun", help="one task per GPU or per node")
        p.add_argument("stage", choices=STAGES, help="the vbon subcommand")
        p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (--config FILE --set ...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "job":
            return run_job(args.launcher, args.stage, args.args)
        vbon_args = [args.stage, *args.args]
        if args.command == "task":
            run_task(args.launcher, vbon_args)
        launch = task_launch(args.launcher, vbon_args, os.environ)
        for name, value in launch.env.items():
            print(f"export {name}={shlex.quote(value)}")
        if launch.hostfile is not None:
            print(f"# hostfile {launch.hostfile}:")
            print("".join(f"#   {line}\n" for line in launch.hostfile_text.splitlines()), end="")
        print(shlex.join(launch.command))
    except VbonError as err:
        print(f"vbon slurm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
