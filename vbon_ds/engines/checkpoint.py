"""Resumable checkpoints of every trainable engine plus the trainer's own state, and the final HF export.

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
with a VbonError when checkpoints exist but none is usable. The project's own state is JSON and safetensors;
DeepSpeed's own files are torch pickles, which every load here reads with torch's weights-only unpickler
(`pickle_free_torch_load`): tensors, containers and a few DeepSpeed record types, never code.

For tests, VBON_CHECKPOINT_KILL_AT=<stage> makes rank 0 exit abruptly at that stage of a save (SAVE_STAGES).
Every function that takes engines is a collective: call it on all ranks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.errors import VbonError, writing
from vbon_ds.models.adapters import merge_lora

_TAG = "state"
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


def _stage(name: str) -> None:
    """A named point of a save; rank 0 exits abruptly here when the test hook asks for it."""
    if os.environ.get(KILL_ENV) == name and distributed.is_main():
        os._exit(KILLED_EXIT_CODE)


# ---------------------------------------------------------------- RNG and trainer state, without pickle


def _bytes_tensor(value: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


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


def _write_json(path: Path, value: Any) -> None:
    with writing(path):
        path.write_text(json.dumps(value), encoding="utf-8")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path), tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _manifest(step_dir: Path, step: int, run_id: str) -> dict[str, Any]:
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


# ---------------------------------------------------------------- save


def _remove(step_dir: Path) -> None:
    """Delete a step directory so that a kill at any moment leaves no half-deleted `step_...` behind."""
    trash = step_dir.with_name(f".trash_{step_dir.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(step_dir, trash)
    _stage("pruning")
    shutil.rmtree(trash)


def _retire(root: Path, step_dir: Path) -> None:
    """Remove a step directory this save replaces; if `latest` names it, point `latest` elsewhere first."""
    if latest_checkpoint(root) == step_dir:
        others = [d for d in _by_recency(root) if d != step_dir and verify_checkpoint(d) is None]
        if others:
            _write_atomic(root / "latest", others[0].name)
        else:
            (root / "latest").unlink()
    _remove(step_dir)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Keep `keep` and the `keep_last - 1` most recently written others."""
    for old in [d for d in _by_recency(root) if d != keep][max(keep_last - 1, 0) :]:
        _remove(old)


def save_checkpoint(
    root: str | Path,
    step: int,
    engines: dict[str, DeepSpeedModel],
    trainer_state: dict[str, Any],
    keep_last: int,
    run_id: str = "",
) -> Path:
    """Write `root/step_{step:08d}` (on all ranks), point `latest` at it, keep the newest `keep_last`.

    `trainer_state` holds JSON values and tensors. `run_id` names the run (a resumed run keeps its id):
    saving a step that this run already saved and that verifies is a no-op; a step directory left by
    another run, or a broken one, is replaced.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_{final.name}"
    skip = False
    if distributed.is_main():
        manifest = _read_manifest(final)
        skip = bool(run_id) and manifest is not None and manifest.get("run_id") == run_id
        skip = skip and manifest.get("step") == step and verify_checkpoint(final) is None
    if distributed.broadcast_object(skip):
        if distributed.is_main() and latest_checkpoint(root) != final:
            _write_atomic(root / "latest", final.name)
        distributed.barrier()
        return final
    if distributed.is_main():
        for debris in [*root.glob(".tmp_step_*"), *root.glob(".trash_step_*")]:
            shutil.rmtree(debris)  # left by a save or a prune that was killed
        if final.exists():
            _retire(root, final)
        with writing(tmp):
            tmp.mkdir(parents=True)
        _stage("started")
    distributed.barrier()
    for name, engine in engines.items():
        with writing(tmp / name):
            engine.ds.save_checkpoint(str(tmp / name), tag=_TAG, save_latest=False)
    _stage("engines_saved")
    _write_json(tmp / f"rng_rank{distributed.rank()}.json", _rng_state())
    if distributed.is_main():
        tensors: dict[str, torch.Tensor] = {}
        _write_json(tmp / TRAINER_STATE, _split_tensors(trainer_state, tensors))
        if tensors:
            with writing(tmp / TRAINER_TENSORS):
                save_file(tensors, str(tmp / TRAINER_TENSORS))
    distributed.barrier()
    if distributed.is_main():
        _stage("state_saved")
        _write_atomic(tmp / MANIFEST, json.dumps(_manifest(tmp, step, run_id)))
        _stage("manifest_written")
        os.replace(tmp, final)
        _stage("renamed")
        _write_atomic(root / "latest", final.name)
        _stage("latest_moved")
        _prune(root, final, keep_last)
        _stage("done")
    distributed.barrier()
    return final


# ---------------------------------------------------------------- load

# The non-tensor types DeepSpeed (0.19) pickles into its model and optimizer files: plain records, built
# without running code. Anything else in such a file makes the load fail instead of executing it.
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def pickle_free_torch_load() -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's loader and zero_to_fp32 pass weights_only=False) uses torch's
    weights-only unpickler with DeepSpeed's record types allowed: a checkpoint cannot run code."""
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return real_load(*args, **{**kwargs, "weights_only": True})

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = real_load


def refused_pickle(err: Exception, where: Path) -> VbonError:
    """The one-line error for a DeepSpeed file that the weights-only unpickler refuses."""
    reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
    return VbonError(
        f"{where}: a DeepSpeed file holds a pickled object other than tensors and DeepSpeed's records "
        f"({reason or type(err).__name__}); it was not loaded, since unpickling it could run code"
    )


def load_checkpoint(path: str | Path, engines: dict[str, DeepSpeedModel]) -> dict[str, Any]:
    """Restore engines (weights, optimizer, LR schedule) and RNG states; return the trainer state.

    `path` is a step directory or a checkpoint root (see `resume_checkpoint`); rank 0 picks and verifies.
    """
    path = Path(path)
    step_dir = distributed.from_main(lambda: resume_checkpoint(path))
    if step_dir is None:
        raise VbonError(f"no checkpoint in {path} (neither a step directory nor a root with a 'latest' file)")
    for name, engine in engines.items():
        if not (step_dir / name).is_dir():
            raise VbonError(f"checkpoint {step_dir} has no state for the {name!r} engine")
        try:
            with pickle_free_torch_load():
                load_path, _ = engine.ds.load_checkpoint(str(step_dir / name), tag=_TAG)
        except pickle.UnpicklingError as err:
            raise refused_pickle(err, step_dir / name) from err
        except Exception as err:  # DeepSpeed raises anything; the settings were checked before
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise VbonError(
                f"checkpoint {step_dir / name} matches its manifest, yet DeepSpeed could not load it into "
                f"this run's {name} engine ({type(err).__name__}: {first_line}); it is kept: rerun with the "
                "settings that wrote it (model.*, deepspeed.*), or give this run a new train.output_dir"
            ) from err
        if load_path is None:
            raise VbonError(f"checkpoint {step_dir / name} could not be loaded by DeepSpeed")
    rng_file = step_dir / f"rng_rank{distributed.rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh streams there
        _set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return read_trainer_state(step_dir)


def read_trainer_state(step_dir: str | Path) -> dict[str, Any]:
    """The trainer's own state saved in a step directory (JSON + safetensors, no pickle)."""
    step_dir = Path(step_dir)
    tensors = load_file(str(step_dir / TRAINER_TENSORS)) if (step_dir / TRAINER_TENSORS).is_file() else {}
    return _join_tensors(json.loads((step_dir / TRAINER_STATE).read_text(encoding="utf-8")), tensors)


def export_hf(actor: DeepSpeedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """The actor as a Hugging Face directory (save_pretrained + tokenizer), from ZeRO-3 shards or not.

    All ranks call it (the ZeRO-3 gather is collective); rank 0 writes. The export goes to a temporary
    sibling first: an existing `out_dir` (an earlier run's) is replaced only once the new one is complete.
    """
    # ZeRO-3: full tensors in the model's dtype on rank 0 (None elsewhere), gathered one layer at a time.
    state_dict = actor.ds._zero3_consolidated_16bit_state_dict() if actor.zero3 else actor.module.state_dict()
    if distributed.is_main():
        state_dict = merge_lora(actor.module, state_dict)  # LoRA adapters folded in: a plain HF model
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".tmp_{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
        with writing(tmp):
            tmp.mkdir(parents=True)
            actor.module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        _swap_in(tmp, out_dir)
    distributed.barrier()


def _swap_in(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, removing what was there only after the rename."""
    old = target.with_name(f".old_{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
