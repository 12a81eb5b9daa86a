"""Resumable checkpoints of every trainable engine plus the trainer's own state, and the final HF export.

The layout on disk, the manifest, `latest`, pruning and the choice of the checkpoint to resume from are in
checkpoint_layout.py; this module adds DeepSpeed: each engine's sharded model, optimizer and LR-scheduler
states, and each rank's RNG streams. DeepSpeed's own files are torch pickles, which every load here reads
with torch's weights-only unpickler (`pickle_free_torch_load`): tensors, containers and a few DeepSpeed
record types, never code.

Every function that takes engines is a collective: call it on all ranks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from transformers import PreTrainedTokenizerBase

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.engines.checkpoint_layout import (
    ENGINE_STATE_TAG,
    latest_checkpoint,
    point_latest,
    publish_save,
    read_trainer_state,
    resume_checkpoint,
    rng_path,
    save_stage,
    saved_by,
    start_save,
    step_path,
    write_json,
    write_trainer_state,
)
from vbon_ds.errors import VbonError, writing
from vbon_ds.models.adapters import merge_lora

# ---------------------------------------------------------------- RNG states, without pickle


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


# ---------------------------------------------------------------- save


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
    final = step_path(root, step)
    tmp = root / f".tmp_{final.name}"
    if distributed.broadcast_object(distributed.is_main() and saved_by(final, step, run_id)):
        if distributed.is_main() and latest_checkpoint(root) != final:
            point_latest(root, final)
        distributed.barrier()
        return final
    if distributed.is_main():
        start_save(root, final, tmp)
    distributed.barrier()
    for name, engine in engines.items():
        with writing(tmp / name):
            engine.ds.save_checkpoint(str(tmp / name), tag=ENGINE_STATE_TAG, save_latest=False)
    save_stage("engines_saved")
    write_json(rng_path(tmp, distributed.rank()), _rng_state())
    if distributed.is_main():
        write_trainer_state(tmp, trainer_state)
    distributed.barrier()
    if distributed.is_main():
        publish_save(root, tmp, final, step, run_id, keep_last)
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
                load_path, _ = engine.ds.load_checkpoint(str(step_dir / name), tag=ENGINE_STATE_TAG)
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
        engine.weights_version += 1
    rng_file = rng_path(step_dir, distributed.rank())
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh streams there
        _set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return read_trainer_state(step_dir)


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
