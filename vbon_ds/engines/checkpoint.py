"""Resumable checkpoints of every trainable engine plus the trainer's own state, and the final HF export.

Layout (one directory per step, on a file system all ranks share):

    root/step_00000100/<engine name>/state/...   DeepSpeed sharded model + optimizer + LR-scheduler states
    root/step_00000100/trainer_state.pt          the trainer's dict (rank 0)
    root/step_00000100/rng_rank{r}.pt            each rank's python / numpy / torch RNG states
    root/latest                                  name of the newest complete step directory

A step directory is written as `.tmp_step_...` and renamed when complete, and `latest` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint intact and pointed to.
Every function here is a collective: call it on all ranks.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vbon_ds.adapters import merge_lora
from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.errors import VbonError

_TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def step_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory `root/latest` names, or None when there is no checkpoint yet."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def save_checkpoint(
    root: str | Path,
    step: int,
    engines: dict[str, DeepSpeedModel],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `root/step_{step:08d}` (on all ranks), point `latest` at it, keep the newest `keep_last`."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_{final.name}"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed half-way
        tmp.mkdir(parents=True)
    distributed.barrier()
    for name, engine in engines.items():
        engine.ds.save_checkpoint(str(tmp / name), tag=_TAG, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
    if distributed.is_main():
        torch.save(trainer_state, tmp / "trainer_state.pt")
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load_checkpoint(path: str | Path, engines: dict[str, DeepSpeedModel]) -> dict[str, Any]:
    """Restore engines (weights, optimizer, LR schedule) and RNG states; return the trainer state.

    `path` is a step directory or a checkpoint root (then its `latest` is loaded).
    """
    path = Path(path)
    step_dir = path if (path / "trainer_state.pt").is_file() else latest_checkpoint(path)
    if step_dir is None:
        raise VbonError(f"no checkpoint in {path} (neither a step directory nor a root with a 'latest' file)")
    for name, engine in engines.items():
        if not (step_dir / name).is_dir():
            raise VbonError(f"checkpoint {step_dir} has no state for the {name!r} engine")
        load_path, _ = engine.ds.load_checkpoint(str(step_dir / name), tag=_TAG)
        if load_path is None:
            raise VbonError(f"checkpoint {step_dir / name} could not be loaded by DeepSpeed")
    rng_file = step_dir / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh streams there
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(step_dir / "trainer_state.pt", weights_only=False)


def export_hf(actor: DeepSpeedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """The actor as a Hugging Face directory (save_pretrained + tokenizer), from ZeRO-3 shards or not.

    All ranks call it (the ZeRO-3 gather is collective); rank 0 writes.
    """
    # ZeRO-3: full tensors in the model's dtype on rank 0 (None elsewhere), gathered one layer at a time.
    state_dict = actor.ds._zero3_consolidated_16bit_state_dict() if actor.zero3 else actor.module.state_dict()
    if distributed.is_main():
        state_dict = merge_lora(actor.module, state_dict)  # LoRA adapters folded in: a plain HF model
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        actor.module.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    distributed.barrier()
