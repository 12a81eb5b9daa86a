"""Multi-node training on one machine: two "nodes" of one rank each on 127.0.0.1, started as two launcher
processes with node ranks 0 and 1, the way a multi-node job starts them:

- DeepSpeed's launcher with the hostfile and the `--no_ssh --node_rank N` command that vbon_ds.commands.slurm
derives
  for `--launcher deepspeed` (each Slurm node's task runs exactly this);
- `torchrun --nnodes 2 --node_rank N`.

ZeRO-3 over gloo trains with a checkpoint; the run then resumes on one node of two ranks (another node
count; the same world size, since a ZeRO-3 checkpoint is partitioned for the world that wrote it) and
continues from the saved step; a world of one is refused naming the world size.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import launch_env, tiny_config_file, vbon

from vbon_ds.commands.slurm import PORT_COUNT, PORT_FIRST, task_launch
from vbon_ds.engines.distributed import free_port
from vbon_ds.monitor import read_scalars

pytestmark = pytest.mark.slow

PY = sys.executable
Command = tuple[list[str], dict[str, str]]


def free_port_for_a_slurm_job() -> int:
    """A free port in vbon_ds.commands.slurm's MASTER_PORT range (a job id is then chosen to land on it)."""
    for port in random.sample(range(PORT_FIRST, PORT_FIRST + PORT_COUNT), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in the MASTER_PORT range")


def deepspeed_nodes(vbon_args: list[str], tmp_path: Path) -> list[Command]:
    """What the Slurm task of each of two nodes (`localhost`, `127.0.0.1`) would run: vbon_ds.commands.slurm's
    derivation for `--launcher deepspeed`, one rank per node."""
    job_id = str(free_port_for_a_slurm_job() - PORT_FIRST)
    commands = []
    for node in range(2):
        slurm = {
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
            "SLURM_NODEID": str(node),
        }
        slurm.update(VBON_PROCS_PER_NODE="1", TMPDIR=str(tmp_path))
        launch = task_launch("deepspeed", vbon_args, slurm)
        assert launch.command[launch.command.index("--node_rank") + 1] == str(node)
        launch.hostfile.write_text(launch.hostfile_text)
        commands.append((launch.command, launch.env))
    return commands


def torchrun_nodes(vbon_args: list[str]) -> list[Command]:
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [
        ([PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
          str(node), *rendezvous, "-m", "vbon_ds", *vbon_args], {})
        for node in range(2)
    ]  # fmt: skip


def one_node_two_ranks(vbon_args: list[str]) -> list[Command]:
    command = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [([*command, "-m", "vbon_ds", *vbon_args], {})]


def run_together(commands: list[Command], logs: Path) -> str:
    """Start every command at once (as a job's nodes start), wait for all; returns the first one's output."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i, (command, env) in enumerate(commands):
            log = (logs / f"node{i}.log").open("w")
            full_env = {**launch_env(), "OMP_NUM_THREADS": "1", **env}
            procs.append(subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT))
        for i, proc in enumerate(procs):
            proc.wait(timeout=900)
            assert proc.returncode == 0, (logs / f"node{i}.log").read_text()[-4000:]
    finally:
        for proc in procs:  # a node that failed leaves the other waiting at the rendezvous
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return (logs / "node0.log").read_text()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One tiny model and its reference cache for every run here."""
    root = tmp_path_factory.mktemp("multinode")
    vbon("refcache", "--config", str(tiny_config_file(root, "shared")))
    return root / "shared"


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_train_zero3_then_resume_on_one_node(tmp_path, shared, launcher):
    config = tiny_config_file(
        tmp_path, "run", f"model.actor={shared / 'model'}", "train.steps=4", "train.checkpoint_every=1"
    )
    shutil.copytree(shared / "refcache", tmp_path / "run" / "refcache")
    out = tmp_path / "run"
    first = ["train", "--config", str(config), "--set", "train.steps=2"]
    nodes = deepspeed_nodes(first, tmp_path) if launcher == "deepspeed" else torchrun_nodes(first)
    run_together(nodes, tmp_path / "two_nodes")

    checkpoint = out / "checkpoints" / "step_00000002"
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    saved = {p.name for p in checkpoint.rglob("*") if p.is_file()}
    assert {"rng_rank0.json", "rng_rank1.json"} <= saved  # rank 1 ran in the second node's process
    # ZeRO-3 over the two nodes: each rank wrote its own partition of the weights and optimizer states.
    partitions = {name.split("_mp_rank_")[0] for name in saved if name.endswith("_optim_states.pt")}
    assert partitions == {"zero_pp_rank_0", "zero_pp_rank_1"}

    # Another world size cannot load the partitions: refused before any model loads, naming it.
    alone = vbon("train", "--config", str(config), check=False)
    assert alone.returncode != 0 and "world size (ranks): checkpoint 2, now 1" in alone.stderr, alone.stderr
    assert "remove" not in alone.stderr  # the checkpoint is intact: nothing advises deleting it

    resumed = run_together(one_node_two_ranks(["train", "--config", str(config)]), tmp_path / "one_node")
    assert f"train: resumed from {checkpoint} at step 2" in resumed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [step for step, _ in read_scalars(out / "tensorboard")["train/reward"]] == [1, 2, 3, 4]
