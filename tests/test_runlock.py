"""One run per output directory (a lock the OS drops with the process), the output directory checked before
any work, Ctrl-C handled like a preemption signal, and demo paths that do not depend on the working
directory."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vbon_ds.errors import VbonError
from vbon_ds.runlock import LOCK_FILE, prepare_output_dir, run_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = (
    "import sys, time; from vbon_ds.runlock import run_lock\n"
    "with run_lock(sys.argv[1], 'vbon train', *sys.argv[2:]):\n"
)


def hold_lock(output_dir: Path, part: str = "") -> subprocess.Popen:
    """Another process holding the lock of `output_dir` (or of one `part` of the work) until it is killed."""
    code = HOLD + "    print('held', flush=True); time.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(output_dir), *([part] if part else [])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        message = (
            rf"^train\.output_dir {tmp_path / 'run'} is in use by vbon train \(pid {holder.pid} on "
            rf"{socket.gethostname()}, since .*\); wait for that run to end, or use another "
            r"train\.output_dir$"
        )
        with pytest.raises(VbonError, match=message), run_lock(tmp_path / "run", "vbon refcache"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path / "run", "vbon refcache"):  # a killed holder never blocks the requeued job
        assert "vbon refcache" in (tmp_path / "run" / LOCK_FILE).read_text()


def test_parts_of_a_job_array_share_the_directory_but_each_part_runs_once(tmp_path):
    part0 = hold_lock(tmp_path, "refcache-part-0-of-2")
    try:
        with run_lock(tmp_path, "vbon refcache --part 1/2", "refcache-part-1-of-2"):  # side by side
            pass
        in_use = rf"^train\.output_dir {tmp_path} is in use by vbon "
        with (  # the same part twice
            pytest.raises(VbonError, match=rf"{in_use}train \(pid {part0.pid} "),
            run_lock(tmp_path, "vbon refcache --part 0/2", "refcache-part-0-of-2"),
        ):
            pass
        # A whole run is refused too; the lock file names the part that took the shared lock last.
        with (
            pytest.raises(VbonError, match=rf"{in_use}refcache --part 1/2 \(pid {os.getpid()} "),
            run_lock(tmp_path, "vbon refcache"),
        ):
            pass
    finally:
        part0.send_signal(signal.SIGKILL)
        part0.wait()
    whole = hold_lock(tmp_path)
    try:
        with (  # nor a part beside a whole run
            pytest.raises(VbonError, match=rf"is in use by vbon train \(pid {whole.pid} "),
            run_lock(tmp_path, "vbon refcache --part 0/2", "refcache-part-0-of-2"),
        ):
            pass
    finally:
        whole.send_signal(signal.SIGKILL)
        whole.wait()


def test_the_lock_nests_in_one_process_and_is_released_after(tmp_path):
    with run_lock(tmp_path, "vbon demo"), run_lock(tmp_path, "vbon refcache"):
        pass
    holder = hold_lock(tmp_path)  # released: another process can take it
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_other_ranks_do_not_take_the_lock(tmp_path):
    holder = hold_lock(tmp_path)
    try:  # rank 1 of a launcher that has not made its process group yet
        code = HOLD + "    print('ran')\n"
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_output_dir_under_a_file_or_a_file_itself(tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "run", tmp_path / "file"):
        with pytest.raises(
            VbonError, match=rf"^train\.output_dir {target}: {tmp_path / 'file'} is a file, not a"
        ):
            prepare_output_dir(target)
        with pytest.raises(VbonError, match="is a file, not a directory"), run_lock(target, "vbon train"):
            pass


def read_only_dirs(tmp_path: Path) -> list[Path]:
    """Directories this process cannot write to: sysfs (even as root), and a chmod-ed one (not for root)."""
    dirs = [Path("/sys/kernel")] if Path("/sys/kernel").is_dir() else []
    if os.geteuid() != 0:
        dirs.append(tmp_path / "ro")
        dirs[-1].mkdir()
        dirs[-1].chmod(0o555)
    return dirs


def test_read_only_output_dir_is_refused_before_any_work(tmp_path):
    dirs = read_only_dirs(tmp_path)
    assert dirs, "no read-only directory to test with"
    for target in dirs:
        with (
            pytest.raises(VbonError, match=rf"^train\.output_dir {target} is not writable \("),
            run_lock(target, "vbon train"),
        ):
            pass
        with pytest.raises(VbonError, match=rf"^train\.output_dir {target / 'sub'}: cannot create it \("):
            prepare_output_dir(target / "sub")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "setting"), [("train", "train.output_dir"), ("refcache", "train.refcache_dir")]
)
def test_cli_checks_its_directory_before_loading_anything(tmp_path, command, setting):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "dir"
    overrides = {"train.output_dir": tmp_path / "run", "logging.tensorboard": "false", setting: target}
    result = subprocess.run(
        [sys.executable, "-m", "vbon_ds", command, "--config", str(REPO / "launch" / "tldr_vbon.yaml"),
         *(arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"vbon: error: {setting} {target}: {tmp_path / 'file'} is a file, not a directory"
    )


def test_the_lock_names_the_setting_its_directory_came_from(tmp_path):
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(VbonError, match=rf"^output_dir {tmp_path / 'file'}: {tmp_path / 'file'} is a file"),
        run_lock(tmp_path / "file", "vbon sweep", setting="output_dir"),
    ):
        pass
    holder = hold_lock(tmp_path / "run")
    try:
        with (
            pytest.raises(
                VbonError, match=r"^output_dir .* is in use by vbon train .*use another output_dir$"
            ),
            run_lock(tmp_path / "run", "vbon sweep", setting="output_dir"),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_cli_refuses_a_second_run_on_the_same_dir(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vbon_ds", "refcache", "--config", str(REPO / "launch" / "tldr_vbon.yaml"),
             "--set", f"train.output_dir={tmp_path / 'run'}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"is in use by vbon train (pid {holder.pid} on" in result.stderr.strip().splitlines()[-1]


def test_sigint_asks_for_a_checkpoint_and_a_second_one_interrupts():
    from vbon_ds.preemption import StopRequest

    # A shell's background job starts with SIGINT ignored: restore() puts back whatever was there.
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_demo_output_dir_is_the_same_either_way_and_absolute(tmp_path, monkeypatch):
    from vbon_ds.commands.demo import demo_config
    from vbon_ds.data.refcache_fingerprint import fingerprint_from_config

    monkeypatch.chdir(tmp_path)
    by_set = demo_config("tiny", None, ["train.output_dir=runs/x", "train.steps=2"])
    by_flag = demo_config("tiny", "runs/x", ["train.steps=2"])
    assert by_set == by_flag
    assert by_set.train.output_dir == str(tmp_path / "runs" / "x")
    assert by_set.model.actor == str(tmp_path / "runs" / "x" / "model")
    assert (tmp_path / "runs" / "x" / "model" / "config.json").is_file()
    assert not (tmp_path / "runs" / "demo").exists()
    assert Path(fingerprint_from_config(by_set)["reference"]).is_absolute()
    with pytest.raises(VbonError, match=r"--output-dir runs/y and --set train.output_dir=runs/x disagree"):
        demo_config("tiny", "runs/y", ["train.output_dir=runs/x"])


def test_full_disk_while_writing_the_evaluation_names_the_file(tmp_path, monkeypatch):
    from vbon_ds.config import load_config
    from vbon_ds.jobs.report import EvalRow, write_report

    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "results.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    with pytest.raises(
        VbonError, match=rf"^no space left on device while writing {tmp_path}/eval/results\.md"
    ):
        write_report(cfg, [EvalRow("reference", None, 0.5, 0.0, 0.5)])
