"""The bytes each rank's ZeRO-2 or ZeRO-3 actor holds, for `vbon plan` to compare with (torchrun, 2 ranks).

    python tests/dist/plan_check.py WORKDIR STAGE   # WORKDIR/actor from vbon_ds/models/tiny_models.py; STAGE: zero2 | zero3

One bf16 training step on the tiny actor; measured per rank: the 16-bit weights this rank keeps, the 16-bit
gradient buffer after backward, the fp32 gradient copy each optimizer step works on (caught inside the step,
which frees it), the fp32 master copy and Adam's moments. Rank 0 writes WORKDIR/STAGE.json: one dict a rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from engines_check import PROMPT_LEN, TEMPERATURE, fixed_batch, pg_loss

from vbon_ds.batching import batch_sizes
from vbon_ds.config import load_config
from vbon_ds.engines import distributed
from vbon_ds.engines.builders import build_actor, load_policy_tokenizer


def overrides(workdir: Path, stage: str) -> list[str]:
    """The run: 2 ranks x 2 sequences, bf16 (what a GPU run uses), the given ZeRO template."""
    return [
        f"model.actor={workdir / 'actor'}",
        "reward.function=vowel_ratio",
        "train.prompts_per_step=4",
        "train.micro_batch_size=2",
        "model.dtype=bfloat16",
        f"deepspeed.config={stage}",
    ]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fp32_groups(opt) -> list[torch.Tensor]:
    """The fp32 master partitions (ZeRO-3 and ZeRO-1/2 name them differently)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return opt.fp32_partitioned_groups_flat
    return opt.single_partition_of_fp32_groups


def _catch_fp32_grads(opt, caught: list[int]) -> None:
    """Record the size of the fp32 gradient each optimizer step of `opt` is handed, before it is freed."""
    step = opt._optimizer_step

    def recording_step(group: int) -> None:
        caught.append(nbytes([_fp32_groups(opt)[group].grad]))
        step(group)

    opt._optimizer_step = recording_step


def _weights(actor, zero3: bool) -> int:
    params = list(actor.module.parameters())
    if not zero3:
        return nbytes(params)
    persistent = [p for p in params if p.ds_persist]
    return nbytes(p.ds_tensor for p in params) + sum(p.ds_numel * p.element_size() for p in persistent)


def _gradient_partition(opt, zero3: bool) -> int:
    """Bytes of this rank's reduced 16-bit gradients after backward."""
    if zero3:
        return nbytes([opt.grad_partitions_flat_buffer])
    return sum(nbytes(group) for group in opt.averaged_gradients.values() if group is not None)


def main(workdir: Path, stage: str) -> None:
    distributed.init_distributed()
    rank = distributed.rank()
    cfg = load_config(None, overrides(workdir, stage))
    tokenizer = load_policy_tokenizer(cfg)
    actor = build_actor(cfg, batch_sizes(cfg, distributed.world_size()), tokenizer)
    opt = actor.ds.optimizer
    zero3 = actor.zero3
    assert actor.ds.zero_optimization_stage() == (3 if zero3 else 2)
    assert next(actor.module.parameters()).dtype == torch.bfloat16

    fp32_grads: list[int] = []
    _catch_fp32_grads(opt, fp32_grads)
    seq, mask = fixed_batch(len(tokenizer))
    rows = slice(2 * rank, 2 * rank + 2)
    logprobs = actor.response_logprobs(seq[rows], mask[rows], PROMPT_LEN, TEMPERATURE)
    actor.backward(pg_loss(logprobs, mask[rows]))
    measured = {"params": _weights(actor, zero3), "grads": _gradient_partition(opt, zero3)}
    actor.step()
    adam = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    measured.update(grads32=sum(fp32_grads), master=nbytes(_fp32_groups(opt)), adam=nbytes(adam))
    gathered = distributed.all_gather_object(measured)
    if rank == 0:
        (workdir / f"{stage}.json").write_text(json.dumps(gathered, indent=1))
    distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
