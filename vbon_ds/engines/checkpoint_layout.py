"""What a checkpoint is on disk, and how a save becomes visible: no DeepSpeed here (see checkpoint.py).

Layout (one directory per step, on a file system all ranks share):

    root/step_00000100/<engine name>/state/...    DeepSpeed sharded model + optimizer + LR-scheduler states
    root/step_00000100/trainer_state.json         the trainer's dict (rank 0); its tensors in
    root/step_00000100/trainer_state.safetensors  (only when it holds any)
    root/step_00000100/rng_rank{r}.json           each rank's python / numpy / torch RNG states
    root/step_00000100/manifest.json              step, run id, time, and every file's size (SHA-256 too
                                                  for the trainer's own files), written last
    root/latest                                   name of the newest complete step directory

A save writes `.tmp_step_...`, adds the manifest, renames it to `step_...`, and only then moves `latest`
(atomically), so `latest` names a complete, verified directory at every moment. Pruning keeps the
`keep_last` most recently written checkpoints (never the new one, which `latest` names) and first renames a
victim to `.trash_...`, so a kill mid-removal leaves no half-deleted step directory. Resuming takes the one
`latest` names if it verifies against its manifest, else the newest one that does (saying so), and stops
with a VbonError when checkpoints exist but none is usable. The trainer's own state is JSON and safetensors.

For tests, VBON_CHECKPOINT_KILL_AT=<stage> makes rank 0 exit abruptly at that stage of a save (SAVE_STAGES).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vbon_ds.engines import distributed
from vbon_ds.errors import VbonError, writing

ENGINE_STATE_TAG = "state"  # DeepSpeed's tag: an engine's files are in <engine name>/state/
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
_FORMAT = 2
_TENSOR_KEY = "__tensor__"

SAVE_STAGES = (
    "started",  # the temporary directory exists
    "engines_saved",  # DeepSpeed wrote every engine's shards
    "state_saved",  # trainer state and RNG files are written on every rank
    "manifest_written",  # the manifest is in the temporary directory
    "renamed",  # the temporary directory is now step_XXXXXXXX
    "latest_moved",  # `latest` names the new step directory
    "pruning",  # one old checkpoint renamed to .trash_..., not yet deleted
    "done",
)
KILL_ENV = "VBON_CHECKPOINT_KILL_AT"
KILLED_EXIT_CODE = 86


def save_stage(name: str) -> None:
    """A named point of a save; rank 0 exits abruptly here when the test hook asks for it."""
    if os.environ.get(KILL_ENV) == name and distributed.is_main():
        os._exit(KILLED_EXIT_CODE)


def step_path(root: Path, step: int) -> Path:
    """The step directory of `step` under `root`."""
    return root / f"step_{step:08d}"


def rng_path(step_dir: Path, rank: int) -> Path:
    """The file of one rank's RNG states."""
    return step_dir / f"rng_rank{rank}.json"


# ---------------------------------------------------------------- small files, without pickle


def write_json(path: Path, value: Any) -> None:
    with writing(path):
        path.write_text(json.dumps(value), encoding="utf-8")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path), tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def point_latest(root: Path, step_dir: Path) -> None:
    """Make `root/latest` name `step_dir`, atomically."""
    _write_atomic(root / "latest", step_dir.name)


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor replaced by a reference into `tensors` (JSON cannot hold tensors)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR_KEY: key}
    if isinstance(value, dict):
        return {k: _split_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, tensors) for v in value]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_KEY}:
            return tensors[value[_TENSOR_KEY]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def write_trainer_state(step_dir: Path, trainer_state: dict[str, Any]) -> None:
    """The trainer's dict as JSON, its tensors (if any) beside it as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    write_json(step_dir / TRAINER_STATE, _split_tensors(trainer_state, tensors))
    if tensors:
        with writing(step_dir / TRAINER_TENSORS):
            save_file(tensors, str(step_dir / TRAINER_TENSORS))


def read_trainer_state(step_dir: str | Path) -> dict[str, Any]:
    """The trainer's own state saved in a step directory (JSON + safetensors, no pickle)."""
    step_dir = Path(step_dir)
    tensors = load_file(str(step_dir / TRAINER_TENSORS)) if (step_dir / TRAINER_TENSORS).is_file() else {}
    return _join_tensors(json.loads((step_dir / TRAINER_STATE).read_text(encoding="utf-8")), tensors)


# ---------------------------------------------------------------- manifest and verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _own_file(name: str) -> bool:
    """The trainer's own small files, which get a SHA-256 (DeepSpeed's large shards get their size)."""
    return name.startswith(("trainer_state.", "rng_rank"))


def build_manifest(step_dir: Path, step: int, run_id: str) -> dict[str, Any]:
    """The manifest of a step directory as it is now: every file's size, the trainer's files' SHA-256."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        files[rel] = {"size": path.stat().st_size, **({"sha256": _sha256(path)} if _own_file(rel) else {})}
    return {"format": _FORMAT, "step": step, "run_id": run_id, "saved_at": time.time(), "files": files}


def _read_manifest(step_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def verify_checkpoint(step_dir: str | Path) -> str | None:
    """What is wrong with a step directory (missing, no manifest, a file missing or of the wrong size or
    hash), or None when it is complete as its manifest describes it."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "the directory is missing"
    if not (step_dir / MANIFEST).is_file():
        return f"no {MANIFEST} (an interrupted save, or one by an older vbon_ds)"
    manifest = _read_manifest(step_dir)
    if manifest is None or manifest.get("format") != _FORMAT:
        return f"{MANIFEST} is unreadable or of another format"
    for rel, expected in manifest["files"].items():
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{rel} has {size} bytes, the manifest says {expected.get('size')}"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def saved_by(step_dir: Path, step: int, run_id: str) -> bool:
    """Whether `step_dir` is a verified save of `step` by the run `run_id` (saving it again is a no-op)."""
    manifest = _read_manifest(step_dir)
    saved = bool(run_id) and manifest is not None and manifest.get("run_id") == run_id
    return saved and manifest.get("step") == step and verify_checkpoint(step_dir) is None


def step_dirs(root: str | Path) -> list[Path]:
    """Step directories under `root` (complete or not; see `verify_checkpoint`), in step order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory `root/latest` names, or None when there is no such directory."""
    pointer = Path(root) / "latest"
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_DIR.match(name):
        return None
    path = Path(root) / name
    return path if path.is_dir() else None


def _recency(step_dir: Path) -> float:
    """When a checkpoint was written: its manifest's time, else the directory's modification time."""
    manifest = _read_manifest(step_dir)
    saved_at = manifest.get("saved_at") if manifest else None
    return float(saved_at) if isinstance(saved_at, (int, float)) else step_dir.stat().st_mtime


def _by_recency(root: Path) -> list[Path]:
    """Step directories, most recently written first."""
    return sorted(step_dirs(root), key=_recency, reverse=True)


def resume_checkpoint(path: str | Path, action: str = "resuming from") -> Path | None:
    """The verified step directory to resume from (`action`: what the warning says is done with it).

    `path` is a step directory (it must verify) or a checkpoint root: then the directory `latest` names if
    it verifies, else the most recently written one that does, with a warning on stderr naming what was
    wrong. None when the root holds no checkpoint at all; a VbonError when it holds some but none is usable.
    """
    path = Path(path)
    if _STEP_DIR.match(path.name) or (path / MANIFEST).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise VbonError(f"checkpoint {path} is unusable: {problem}")
        return path
    named = latest_checkpoint(path)
    candidates = ([named] if named else []) + [d for d in _by_recency(path) if d != named]
    if not candidates and not (path / "latest").exists():
        return None
    problems = []
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            if candidate != named:
                pointer = f"latest names {named.name}" if named else "latest names no step directory"
                print(
                    f"vbon: warning: {pointer} ({'; '.join(problems) or 'missing or unreadable'}); "
                    f"{action} the newest verified checkpoint, {candidate.name}",
                    file=sys.stderr,
                )
            return candidate
        problems.append(f"{candidate.name}: {problem}")
    raise VbonError(
        f"no usable checkpoint in {path} ({'; '.join(problems) or 'latest names no step directory'}); "
        "remove the broken ones, or start fresh with train.resume=none"
    )


# ---------------------------------------------------------------- the save's directory changes (rank 0)


def _remove(step_dir: Path) -> None:
    """Delete a step directory so that a kill at any moment leaves no half-deleted `step_...` behind."""
    trash = step_dir.with_name(f".trash_{step_dir.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(step_dir, trash)
    save_stage("pruning")
    shutil.rmtree(trash)


def _retire(root: Path, step_dir: Path) -> None:
    """Remove a step directory this save replaces; if `latest` names it, point `latest` elsewhere first."""
    if latest_checkpoint(root) == step_dir:
        others = [d for d in _by_recency(root) if d != step_dir and verify_checkpoint(d) is None]
        if others:
            point_latest(root, others[0])
        else:
            (root / "latest").unlink()
    _remove(step_dir)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Keep `keep` and the `keep_last - 1` most recently written others."""
    for old in [d for d in _by_recency(root) if d != keep][max(keep_last - 1, 0) :]:
        _remove(old)


def start_save(root: Path, final: Path, tmp: Path) -> None:
    """Clear what killed saves left, retire an old `final` (another run's, or broken), create `tmp`."""
    for debris in [*root.glob(".tmp_step_*"), *root.glob(".trash_step_*")]:
        shutil.rmtree(debris)  # left by a save or a prune that was killed
    if final.exists():
        _retire(root, final)
    with writing(tmp):
        tmp.mkdir(parents=True)
    save_stage("started")


def publish_save(root: Path, tmp: Path, final: Path, step: int, run_id: str, keep_last: int) -> None:
    """Seal the complete `tmp` with its manifest, rename it to `final`, point `latest` at it, prune."""
    save_stage("state_saved")
    _write_atomic(tmp / MANIFEST, json.dumps(build_manifest(tmp, step, run_id)))
    save_stage("manifest_written")
    os.replace(tmp, final)
    save_stage("renamed")
    point_latest(root, final)
    save_stage("latest_moved")
    _prune(root, final, keep_last)
    save_stage("done")
