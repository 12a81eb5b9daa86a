"""Slurm launch: the derivation in vbon_ds/commands/slurm.py, and the real scripts on a running one-node
cluster.

The fast tests check what each task of a 2-node x 8-GPU allocation runs, for both launchers. The slow test
installs Debian's slurm-wlm when it is missing, starts slurmctld and slurmd on loopback (free ports, a
config in a temporary directory), submits launch/submit.sh jobs with the tiny preset on CPU and always
stops the daemons it started, by their PIDs.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
from test_pipeline import REQUIRED_TAGS, final_weights, launch_env, tiny_config_file, vbon

from vbon_ds.commands.slurm import (
    REQUEUE_MARGIN_S,
    expand_hostlist,
    job_vbon_args,
    rendezvous,
    step_command,
    task_launch,
)
from vbon_ds.engines.distributed import free_port
from vbon_ds.jobs.build_refcache import part_indices
from vbon_ds.monitor import read_scalars

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launch" / "submit.sh"
PY = sys.executable

# What Slurm sets for `sbatch --nodes 2 --gpus-per-node 8` (job 4242 on gpu07 and gpu08), per task.
ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}
VBON = ["train", "--config", "launch/tldr_vbon.yaml", "--set", "train.steps=3"]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[07-08]", ["gpu07", "gpu08"]),
        ("n[008-011],login9", ["n008", "n009", "n010", "n011", "login9"]),
        ("x[9-11]", ["x9", "x10", "x11"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("foo,bar[1,3]", ["foo", "bar1", "bar3"]),
        ("node1", ["node1"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_srun_launcher_one_rank_per_task_on_two_nodes_of_eight_gpus():
    # Task 13 of 16: the sixth GPU of the second node.
    env = {**ALLOCATION, "SLURM_NODEID": "1", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
    env.update(SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="12")
    launch = task_launch("srun", VBON, env)
    assert launch.command == [PY, "-m", "vbon_ds", *VBON]
    assert launch.env == {
        "RANK": "13",
        "LOCAL_RANK": "5",
        "WORLD_SIZE": "16",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "14242",
        "OMP_NUM_THREADS": "12",
    }
    assert launch.hostfile is None
    # An OMP_NUM_THREADS the user exported wins (as with torchrun).
    assert "OMP_NUM_THREADS" not in task_launch("srun", VBON, {**env, "OMP_NUM_THREADS": "3"}).env


def test_deepspeed_launcher_one_task_per_node_on_two_nodes_of_eight_gpus(tmp_path):
    from deepspeed.launcher import runner

    env = {**ALLOCATION, "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    env.update(SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="96", TMPDIR=str(tmp_path))
    launch = task_launch("deepspeed", VBON, env)
    hostfile = tmp_path / "vbon-hostfile-4242-1"
    assert launch.hostfile == hostfile
    assert launch.hostfile_text == "gpu07 slots=8\ngpu08 slots=8\n"
    assert launch.command == [
        PY, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
        "--node_rank", "1", "--master_addr", "gpu07", "--master_port", "14242", "--no_local_rank",
        "--module", "vbon_ds", *VBON,
    ]  # fmt: skip
    assert launch.env == {"OMP_NUM_THREADS": "12"}  # 96 cores for the node's 8 ranks
    # The installed DeepSpeed reads it as meant: node 1 of the hostfile's two, no ssh, our rendezvous.
    hostfile.write_text(launch.hostfile_text)
    args = runner.parse_args(launch.command[4:])
    assert (args.node_rank, args.no_ssh, args.no_local_rank, args.module) == (1, True, True, True)
    assert (args.master_addr, args.master_port) == ("gpu07", 14242)
    assert (args.user_script, args.user_args) == ("vbon_ds", VBON)
    assert dict(runner.fetch_hostfile(str(hostfile))) == {"gpu07": 8, "gpu08": 8}


def ephemeral_ports() -> range:
    """The ports Linux gives outgoing connections (this machine's setting; the kernel default elsewhere)."""
    setting = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = map(int, setting.read_text().split()) if setting.is_file() else (32768, 60999)
    return range(low, high + 1)


def test_master_port_is_fixed_per_job_and_outside_the_ephemeral_range():
    def port(job_id: int) -> int:
        return int(rendezvous({"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "gpu07"})["MASTER_PORT"])

    ports = {port(job_id) for job_id in range(50_000)}
    assert len(ports) == 20_000  # jobs with nearby ids get different ports
    ephemeral = ephemeral_ports()
    assert all(1024 <= p < 65536 and p not in ephemeral for p in ports)


def test_job_step_and_arguments():
    batch = {**ALLOCATION, "SLURM_CPUS_PER_TASK": "12", "SLURM_CPUS_ON_NODE": "96"}
    task = [PY, "-m", "vbon_ds.commands.slurm", "task"]
    assert step_command("srun", VBON, batch) == [
        "srun", "--kill-on-bad-exit=1", "--cpus-per-task=12", *task, "--launcher", "srun", *VBON,
    ]  # fmt: skip
    assert step_command("deepspeed", VBON, batch) == [
        "srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
        "--cpus-per-task=96", *task, "--launcher", "deepspeed", *VBON,
    ]  # fmt: skip
    config = ["--config", "c.yaml"]
    assert job_vbon_args("train", config, batch) == ["train", *config]
    restarted = {**batch, "SLURM_RESTART_COUNT": "2"}
    assert job_vbon_args("train", config, restarted) == ["train", *config, "--set", "train.resume=auto"]
    assert job_vbon_args("evaluate", config, restarted) == ["evaluate", *config]
    array_task = {**batch, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert job_vbon_args("refcache", config, array_task) == ["refcache", *config, "--part", "3/4"]
    # submit.sh names the part count explicitly: resubmitting one task of the array keeps its share.
    one_task = {**array_task, "SLURM_ARRAY_TASK_COUNT": "1", "VBON_REFCACHE_PARTS": "4"}
    assert job_vbon_args("refcache", config, one_task) == ["refcache", *config, "--part", "3/4"]


@pytest.mark.parametrize("num_prompts, parts", [(48, 2), (10, 3), (2, 4), (7, 1)])
def test_refcache_parts_cover_every_prompt_once(num_prompts, parts):
    covered = [i for p in range(parts) for i in part_indices(num_prompts, (p, parts))]
    assert covered == list(range(num_prompts))


def test_refcache_part_must_be_i_of_n():
    command = [PY, "-m", "vbon_ds", "refcache", "--config", "x.yaml", "--part", "4/4"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert "argument --part: expected I/N with 0 <= I < N (e.g. 0/4), got '4/4'" in result.stderr


def test_submit_all_stages_dry_run(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("{}\n")
    result = subprocess.run(
        [str(SUBMIT), str(config), "--nodes", "2", "--launcher", "deepspeed", "--parts", "3", "--dry-run",
         "--", "--set", "train.steps=9"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    common = "--nodes=2 --ntasks-per-node=1 --cpus-per-task=64 --gpus-per-node=8 --time=24:00:00"
    common += " --signal=B:USR1@300"
    script = f"{REPO}/launch/slurm_vbon.sbatch --launcher deepspeed"
    tail = f"--config {config} --set train.steps=9 "
    assert lines == [
        f"sbatch --parsable --job-name=vbon-refcache-array-exp {common} "
        f"--export=ALL\\,VBON_PROCS_PER_NODE=8\\,VBON_REFCACHE_PARTS=3 --array=0-2 {script} refcache {tail}",
        f"sbatch --parsable --job-name=vbon-refcache-merge-exp {common} --export=ALL\\,VBON_PROCS_PER_NODE=8 "
        f"--dependency=afterany:\\<refcache-array\\> {script} refcache {tail}",
        f"sbatch --parsable --job-name=vbon-train-exp {common} --export=ALL\\,VBON_PROCS_PER_NODE=8 "
        f"--dependency=afterok:\\<refcache-merge\\> --kill-on-invalid-dep=yes {script} train {tail}",
        f"sbatch --parsable --job-name=vbon-evaluate-exp {common} --export=ALL\\,VBON_PROCS_PER_NODE=8 "
        f"--dependency=afterok:\\<train\\> --kill-on-invalid-dep=yes {script} evaluate {tail}",
    ]


# Stand-ins for Slurm's commands: a job step that ignores USR1 and outlasts the lead time, a time limit
# REQUEUE_MARGIN_S + 2 s away, and an `scontrol` that notes whether the step was still running.
FAKE_SLURM = {
    "srun": "trap '' USR1\nsleep 60\ntouch \"$FAKE/step_done\"\n",
    "squeue": 'date -d "+$FAKE_END_IN seconds" +%Y-%m-%dT%H:%M:%S\n',
    "scontrol": '[ -e "$FAKE/step_done" ] && s=yes || s=no\necho "$* step_done=$s" >> "$FAKE/calls"\n',
}


def test_train_job_requeues_before_its_time_limit_when_the_step_outlasts_the_lead_time(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    env = {**launch_env(), **ALLOCATION, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path)}
    env["FAKE_END_IN"] = str(REQUEUE_MARGIN_S + 2)
    job = subprocess.Popen(
        [PY, "-m", "vbon_ds.commands.slurm", "job", "train", "--config", "c.yaml"],
        env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    calls = tmp_path / "calls"
    try:
        assert job.stdout.readline().startswith("vbon slurm: job 4242 (restart 0): srun ")
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@T sends T seconds before the limit
        wait_until(calls.exists, "the job requeues itself")
        assert calls.read_text() == "requeue 4242 step_done=no\n"  # before the time limit, step or not
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the wrapper and its fake step, as Slurm's requeue would
        out = job.communicate()[0]
    assert "the trainer did not checkpoint and exit within the lead time" in out


# ---------------------------------------------------------------- a real cluster

SLURM_CONF = """\
ClusterName=vbontest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=4
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# CPUs=4 (config_overrides) lets two 2-rank jobs run side by side on a 2-core machine.


def install_slurm() -> None:
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"


class Cluster:
    """A running one-node cluster: `env` points Slurm's commands (and the jobs) at it."""

    def __init__(self, root: Path):
        self.root = root
        conf = root / "slurm.conf"
        for sub in ("state", "spool", "tmp"):
            (root / sub).mkdir()
        conf.write_text(SLURM_CONF.format(dir=root, ctld_port=free_port(), slurmd_port=free_port()))
        base = {k: v for k, v in launch_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        pythonpath = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
        self.env = {**base, "SLURM_CONF": str(conf), "VBON_PYTHON": PY, "PYTHONPATH": pythonpath}
        self.env["TMPDIR"] = str(root / "tmp")  # the jobs' hostfiles land here, not in /tmp

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=600, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the job is gone)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)

    def job_id(self, name: str) -> str:
        while not (ids := self.run("squeue", "-h", "-n", name, "-o", "%i").stdout.split()):
            time.sleep(0.2)
        return ids[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("installing slurm-wlm and running slurmd (SlurmdUser=root) need root")
    install_slurm()
    cl = Cluster(tmp_path_factory.mktemp("slurm"))
    daemons = []
    try:
        for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"]):
            log = (cl.root / f"{command[0]}.out").open("w")
            daemons.append(subprocess.Popen(command, env=cl.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while cl.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() != "idle":
            assert time.time() < deadline, (cl.root / "slurmd.out").read_text()[-3000:]
            time.sleep(0.5)
        yield cl
    finally:
        # Jobs first (their slurmstepd processes outlive slurmd), then the daemons, by PID.
        if daemons:
            cl.run("scancel", "--user", "root", check=False)
            deadline = time.time() + 60
            while cl.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(daemons):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_scontrol_expands_node_lists_like_vbon(cluster):
    for nodelist in ("gpu[07-08]", "n[008-011],login9", "x[9-11]", "a[1-2]b[3-4]", "foo,bar[1,3]"):
        expanded = cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        assert expanded == expand_hostlist(nodelist), nodelist


def submit(cluster: Cluster, config: Path, *options: str) -> subprocess.Popen:
    """launch/submit.sh on the tiny preset's CPU layout, waiting for the last job."""
    return subprocess.Popen(
        [str(SUBMIT), str(config), "--no-gpus", "--cpus-per-gpu", "1", "--time", "30", "--wait", *options],
        cwd=config.parent, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def logged_steps(out: Path) -> list[int]:
    events = out / "tensorboard"
    return [step for step, _ in read_scalars(events).get("train/reward", [])] if events.is_dir() else []


def wait_until(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.3)


def restart_now(cluster: Cluster, job_id: str, restarts: int) -> None:
    """Skip the two minutes Slurm holds a requeued job back (its Reason is BeginTime meanwhile)."""
    wait_until(lambda: cluster.job(job_id).get("Restarts") == str(restarts), f"job {job_id} is requeued")

    def held() -> bool:
        return cluster.job(job_id).get("Reason") == "BeginTime"

    wait_until(lambda: held() or cluster.job(job_id).get("JobState") == "RUNNING", f"job {job_id} is pending")
    if held():
        # A credential issued in the second of the requeue counts as revoked: start it in a later second.
        time.sleep(2)
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.mark.slow
def test_refcache_array_then_training_preempted_and_requeued(cluster):
    tmp = cluster.root / "runs"
    tmp.mkdir()
    # Steps take about 0.2 s: the stop must come between the first logged step and the last one, after the
    # events file is read, scancel, and the signal's way through the launcher (8 steps lost that race in CI).
    steps = 40
    straight = tiny_config_file(tmp, "straight", f"train.steps={steps}")
    model = tmp / "straight" / "model"
    preempted = tiny_config_file(tmp, "preempted", f"train.steps={steps}", f"model.actor={model}")

    # The reference cache as a 2-task job array, then the merge job that validates it whole.
    out = finish(submit(cluster, straight, "--stage", "refcache", "--parts", "2", "--gpus-per-node", "1"))
    logs = {p.name: p.read_text() for p in tmp.glob("vbon-refcache-*.out")}
    assert len(logs) == 3, out
    lines = [line for text in logs.values() for line in text.splitlines()]
    parts = [line.split("(part ")[1] for line in lines if "(part " in line]
    assert sorted(parts) == ["0/2: 24 prompts)", "1/2: 24 prompts)"]
    merge = next(text for name, text in logs.items() if name.startswith("vbon-refcache-merge-"))
    assert f"refcache: 48 prompts x M=16 in {tmp / 'straight' / 'refcache'}\n" in merge
    assert "refcache (" not in merge, "the merge job found nothing to sample: it loads no model"
    # Same model and sampling settings: the same cache serves the second run.
    shutil.copytree(tmp / "straight" / "refcache", tmp / "preempted" / "refcache")

    # One run straight through (srun, a task per rank) beside one that is preempted (deepspeed launcher).
    train = ["--stage", "train", "--gpus-per-node", "2"]
    runs = {
        "straight": submit(cluster, straight, *train),
        "preempted": submit(cluster, preempted, *train, "--launcher", "deepspeed"),
    }
    job = cluster.job_id("vbon-train-preempted")
    wait_until(lambda: logged_steps(tmp / "preempted"), "the first step is logged")
    # What --signal=B:USR1@T does at T seconds before the time limit: USR1 to the batch script.
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    restart_now(cluster, job, restarts=1)
    outputs = {name: finish(proc) for name, proc in runs.items()}

    log = (tmp / f"vbon-train-preempted-{job}.out").read_text()
    stopped_at = int(log.split("checkpoint saved at step ")[1].split(",")[0])
    assert 1 <= stopped_at < steps, log
    assert "vbon slurm: requeueing job" in log and "(restart 1)" in log and "train.resume=auto" in log
    checkpoint = tmp / "preempted" / "checkpoints" / f"step_{stopped_at:08d}"
    assert f"train: resumed from {checkpoint} at step {stopped_at}" in log
    for name, output in outputs.items():
        out = tmp / name
        assert output.startswith("train "), output
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
        scalars = read_scalars(out / "tensorboard")
        for tag in REQUIRED_TAGS:
            assert [step for step, _ in scalars[tag]] == list(range(1, steps + 1)), (name, tag)
    hostfile = cluster.root / "tmp" / f"vbon-hostfile-{job}-0"
    assert hostfile.read_text() == "localhost slots=2\n"
    a, b = final_weights(tmp / "straight"), final_weights(tmp / "preempted")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def step_processes(config: Path) -> list[int]:
    """PIDs of the `python -m vbon_ds train --config CONFIG` ranks (not the launch wrappers around them)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")
        except OSError:  # the process ended meanwhile
            continue
        if argv[1:4] == ["-m", "vbon_ds", "train"] and str(config) in argv:
            pids.append(int(cmdline.parent.name))
    return pids


def end_soon(cluster: Cluster, job_id: str) -> None:
    """Move the job's time limit to between 45 and 105 s after REQUEUE_MARGIN_S from now (whole minutes)."""
    started = datetime.fromisoformat(cluster.job(job_id)["StartTime"])
    elapsed = (datetime.now() - started).total_seconds()
    minutes = math.ceil((elapsed + REQUEUE_MARGIN_S + 45) / 60)
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")


@pytest.mark.slow
def test_training_is_requeued_when_a_step_outlasts_the_lead_time(cluster):
    tmp = cluster.root / "slow_step"
    tmp.mkdir()
    steps = 30  # the tiny trainer makes ~15 steps a second: enough left after the first checkpoint to stop it
    config = tiny_config_file(tmp, "run", f"train.steps={steps}", "train.checkpoint_every=1")
    vbon("refcache", "--config", str(config))
    run = submit(cluster, config, "--stage", "train", "--gpus-per-node", "1")
    job = cluster.job_id("vbon-train-run")
    latest = tmp / "run" / "checkpoints" / "latest"
    wait_until(latest.exists, "the first checkpoint is saved")
    # A step (or a save) that lasts past the time limit: the trainer never reaches its next step boundary.
    ranks = step_processes(config)
    assert ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = int(latest.read_text().split("_")[1])
    end_soon(cluster, job)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@T does
    wait_until(lambda: cluster.job(job).get("Restarts") == "1", "the job requeues itself")
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")  # the next run has its time again
    restart_now(cluster, job, restarts=1)
    assert run.communicate(timeout=600)[0].startswith("train "), "the job did not complete after a requeue"
    assert run.returncode == 0

    log = (tmp / f"vbon-train-run-{job}.out").read_text()
    assert "the trainer did not checkpoint and exit within the lead time" in log
    assert "vbon slurm: requeueing job" in log and "(restart 1)" in log
    # Slurm's requeue sends SIGCONT and SIGTERM: the trainer may still save a later step within KillWait.
    resumed = re.search(r"train: resumed from (\S+) at step (\d+)", log)
    assert resumed and stopped_at <= int(resumed[2]) < steps, log
    assert resumed[1] == str(latest.parent / f"step_{int(resumed[2]):08d}")
    assert latest.read_text().strip() == f"step_{steps:08d}"
    assert (tmp / "run" / "final" / "model.safetensors").is_file()
