"""Load the weights of a training checkpoint into an inference engine (no optimizer, any world size).

A ZeRO checkpoint keeps the model's true weights in the optimizer partitions, which only an engine with the
same optimizer and world size can read; `vbon evaluate` has neither. DeepSpeed's zero_to_fp32 reader
rebuilds the full fp32 state dict from the files on rank 0 (a stage-0 checkpoint, from a world of one,
stores the module whole), and the frozen engine takes it in one gather. Every file is read with torch's
weights-only unpickler (checkpoint.pickle_free_torch_load): evaluating a checkpoint runs none of its code.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.engines.checkpoint import pickle_free_torch_load, refused_pickle
from vbon_ds.engines.checkpoint_layout import ENGINE_STATE_TAG
from vbon_ds.errors import VbonError


def load_trained_weights(engine: DeepSpeedModel, engine_dir: str | Path) -> None:
    """Copy the weights saved under `engine_dir` (a step directory's engine folder) into `engine`."""
    import deepspeed

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise VbonError(f"checkpoint has no weights for this engine: {engine_dir} is missing")
    state = _read_weights(engine_dir) if distributed.is_main() else None
    # named_parameters lists a tied output embedding once, under the name the checkpoint uses too.
    params = dict(engine.module.named_parameters())
    gather = (
        deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        if engine.zero3
        else contextlib.nullcontext()
    )
    with gather, torch.no_grad():
        if distributed.is_main():
            missing = [name for name in params if name not in state]
            if missing:
                raise VbonError(f"checkpoint {engine_dir} lacks {len(missing)} weights (e.g. {missing[0]!r})")
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))
    if not engine.zero3 and distributed.world_size() > 1:
        for param in params.values():  # below ZeRO-3 every rank holds the whole model: send rank 0's copy
            torch.distributed.broadcast(param.data, src=0)
    engine.weights_version += 1
    distributed.barrier()


def _read_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    """`_saved_weights` without unpickling anything but tensors and DeepSpeed's records."""
    try:
        with pickle_free_torch_load():
            return _saved_weights(engine_dir)
    except pickle.UnpicklingError as err:
        raise refused_pickle(err, engine_dir) from err


def _saved_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    """The full state dict of a saved engine: rebuilt from the ZeRO-3 partitions, or (stages 0 to 2) the
    module weights DeepSpeed stores whole in mp_rank_00_model_states.pt."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = engine_dir / ENGINE_STATE_TAG
    if any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):  # only ZeRO-3 partitions the module itself
        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_STATE_TAG)
    whole = tag_dir / "mp_rank_00_model_states.pt"
    if not whole.is_file():
        raise VbonError(f"checkpoint {engine_dir} holds no model weights ({whole} is missing)")
    return torch.load(whole, map_location="cpu", weights_only=True)["module"]
