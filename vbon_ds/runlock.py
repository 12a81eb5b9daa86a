"""One run per output directory, and an output directory that is usable before any work starts.

`vbon train` and `vbon refcache` hold an advisory lock (fcntl.flock) on `<output_dir>/.vbon.lock` while they
run. The operating system releases it when the process ends, however it ends, so a killed job's requeue is
never blocked; a second run on the same directory stops at once, naming the holder (written into the file).
Only rank 0 takes the lock; in a process group every rank raises the same error. Taking the lock creates
the directory and a file in it, which is also the check that the directory is writable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from vbon_ds.errors import VbonError

LOCK_FILE = ".vbon.lock"
# (directory, part) -> [file descriptor, nesting depth, part's descriptor] (the demo nests runs)
_held: dict[tuple[Path, str], list[int]] = {}


def prepare_output_dir(output_dir: str | Path, setting: str = "train.output_dir") -> Path:
    """Create `output_dir` (and parents) or raise a one-line VbonError saying why it cannot be used.

    `setting` names the field the directory came from in that message (e.g. train.refcache_dir).
    """
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise VbonError(f"{setting} {path}: {blocker} is a file, not a directory") from None
    except OSError as err:
        raise VbonError(f"{setting} {path}: cannot create it ({err.strerror})") from None
    return path


def _acquire(
    output_dir: str | Path, command: str, setting: str, name: str = LOCK_FILE, shared: bool = False
) -> int:
    path = prepare_output_dir(output_dir, setting)
    lock = path / name
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise VbonError(f"{setting} {path} is not writable ({err.strerror})") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise VbonError(f"cannot lock {lock} ({err.strerror})") from None
        raise VbonError(
            f"{setting} {path} is in use by {holder}; wait for that run to end, or use another {setting}"
        ) from None
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)  # shared holders overwrite each other: the file names one of them
    os.pwrite(fd, f"{command} (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(
    output_dir: str | Path, command: str, part: str = "", setting: str = "train.output_dir"
) -> Iterator[None]:
    """Hold the output directory's lock for `command` (e.g. "vbon train") while the block runs.

    Rank 0 takes it (RANK, or the process group's rank); nested use in one process is allowed. With `part`
    (a job-array task's share of the work, e.g. "refcache-part-0-of-4") the directory's lock is shared with
    the other parts and only the part's own lock is exclusive: the parts run side by side, while a whole run
    waits for none of them and is refused. Errors name the directory as `setting` (the sweep's directory is
    its sweep file's `output_dir`).
    """
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    key = (Path(output_dir).expanduser().resolve(), part)
    error = ""
    if rank == 0:
        try:
            if key in _held:
                _held[key][1] += 1
            elif part:
                own = _acquire(output_dir, command, setting, name=f"{LOCK_FILE}.{part}")  # first: a refused
                try:  # attempt leaves the directory's lock file naming its holders
                    shared = _acquire(output_dir, command, setting, shared=True)
                except VbonError:
                    os.close(own)
                    raise
                _held[key] = [shared, 1, own]
            else:
                _held[key] = [_acquire(output_dir, command, setting), 1]
        except VbonError as err:
            error = str(err)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise VbonError(error)
    try:
        yield
    finally:
        if rank == 0:
            _held[key][1] -= 1
            if not _held[key][1]:
                held = _held.pop(key)
                for fd in (held[0], *held[2:]):
                    os.close(fd)  # closing the descriptor releases the lock
