"""Process group setup and the few collectives the jobs need.

`init_distributed()` works under `deepspeed`, `torchrun` or Slurm launchers (they set RANK/WORLD_SIZE) and
as a plain `python` process (it then sets up a world of one on a free local port). gloo on CPU, nccl on CUDA.
Every helper is a no-op identity when no process group exists, so single-process code paths stay simple.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from vbon_ds.errors import VbonError


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_world_size() -> int:
    """Ranks on this machine, as the launcher says (deepspeed: LOCAL_SIZE, torchrun: LOCAL_WORLD_SIZE, Slurm:
    SLURM_TASKS_PER_NODE such as "4(x2)"), else every rank of the world."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_TASKS_PER_NODE"):
        digits = re.match(r"\d+", os.environ.get(key, ""))
        if digits and int(digits.group()) > 0:
            return int(digits.group())
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def threads_per_rank(cores: int, local_ranks: int, omp_num_threads: str | None) -> int | None:
    """Compute threads for each rank: the cores shared out among the local ranks, at least 1; None when the
    user chose OMP_NUM_THREADS (torch follows it by itself). More threads than cores only wait on each
    other: two 2-thread processes on 2 cores ran about 10x slower than one."""
    if omp_num_threads:
        return None
    return max(1, cores // local_ranks)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_distributed() -> None:
    """Join (or create) the default process group once; later calls do nothing."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_ranks = local_world_size()
    threads = threads_per_rank(usable_cores(), local_ranks, os.environ.get("OMP_NUM_THREADS"))
    if threads is not None and threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    # DeepSpeed's CPU accelerator counts "devices" by forking `numactl --hardware` on every call (ZeRO-3
    # calls it once per gradient reduce-scatter) unless LOCAL_SIZE says it, as its own launcher does.
    os.environ.setdefault("LOCAL_SIZE", str(local_ranks))
    import deepspeed

    # DeepSpeed's ZeRO collectives use torch.distributed APIs that torch deprecates: one warning per call.
    deprecated = r"`torch\.distributed\.\w+` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    else:
        _skip_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op. Only tensor-parallel
    inference uses it, yet every process group init compiled it (about 50 s on 2 cores the first time) and
    left a 69 MB segment per rank in /dev/shm that nothing ever removed: a test suite's worth filled the
    machine's memory. DeepSpeed keeps this probe result in one dict that it documents as editable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's accelerator, or the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def from_main(compute: Callable[[], Any]) -> Any:
    """compute() on rank 0 and its result on every rank. A VbonError there is raised on every rank, instead
    of leaving the other ranks waiting in the broadcast forever."""
    result, error = None, None
    if is_main():
        try:
            result = compute()
        except VbonError as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise VbonError(error)
    return result


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: int) -> int:
    """The largest `value` over all ranks (used to agree on lengths and loop counts)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


_TP_GROUPS: dict[int, tuple[Any, Any]] = {}
"""size -> (the default process group then, this rank's group of that size): `tensor_parallel_group`'s."""


def tensor_parallel_group(size: int) -> Any:
    """The process group of this rank's `size` consecutive ranks (one node's ranks sharing one vLLM engine);
    None for size 1. Every rank must call it, asking for the same sizes in the same order: the first call
    for a size makes the groups (each group is made by all ranks), later ones return the same group, until
    the default process group is replaced (destroyed and made again: its groups went with it)."""
    if size == 1:
        return None
    world, local = world_size(), local_world_size()
    if world % size or local % size:
        raise VbonError(
            f"generation.vllm_tensor_parallel_size: {size} must divide the ranks of a node ({local}) and of "
            f"the job ({world})"
        )
    default = dist.group.WORLD
    made = _TP_GROUPS.get(size)
    if made is None or made[0] is not default:  # held here, a replaced default group is never `default`
        groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
        made = _TP_GROUPS[size] = (default, groups[rank() // size])
    return made[1]


def tensor_parallel_requests(
    group: Any, prompts: list[list[int]], seeds: list[int]
) -> tuple[list[list[int]], list[int], slice]:
    """Every rank's prompts and seeds of the tensor-parallel `group`, in rank order, and this rank's slice
    of them: the ranks of one engine submit the same requests."""
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (prompts, seeds), group=group)
    mine = dist.get_group_rank(group, rank())
    start = sum(len(p) for p, _ in parts[:mine])
    return (
        [p for part, _ in parts for p in part],
        [s for _, part in parts for s in part],
        slice(start, start + len(prompts)),
    )
