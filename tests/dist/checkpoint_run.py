"""Kill a real checkpointing run at every stage of a save, resume it, and compare with an uninterrupted run.

    python tests/dist/checkpoint_run.py WORKDIR STEPS KEEP KILL_STEP

Each run is a forked child (DeepSpeed is imported once), a world of one that trains a DeepSpeed engine on
random inputs (so the RNG state matters), resumes from its checkpoint root like `vbon train`
(train.resume=auto) and saves every step, and the last step twice as the trainer does, keeping KEEP. For
every stage in SAVE_STAGES, the save of step KILL_STEP dies there (the test hook); then a second child
resumes and finishes. WORKDIR/results.json records, per stage, the exit code of the killed child, what
`latest` named after the kill, the step the resumed child started from, and whether its final weights
equal those of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch._dynamo  # noqa: F401 - imported by the first optimizer: once here, not in every child

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel
from vbon_ds.engines.checkpoint import load_checkpoint, save_checkpoint
from vbon_ds.engines.checkpoint_layout import (
    KILL_ENV,
    SAVE_STAGES,
    latest_checkpoint,
    resume_checkpoint,
    step_dirs,
    verify_checkpoint,
)


def train(root: Path, steps: int, keep: int, kill_step: int, kill_stage: str) -> None:
    """One run; writes root/../run.json with the step it resumed at and its final weights."""
    distributed.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engines = {"actor": DeepSpeedModel(engine, None, trainable=True)}
    step, run_id = 0, "run-a"
    resume = resume_checkpoint(root)
    if resume is not None:
        state = load_checkpoint(resume, engines)
        step, run_id = state["step"], state["run_id"]
        assert torch.equal(state["history"], torch.arange(step)), state["history"]
    resumed_at = step
    state = {}
    while step < steps:
        loss = engine(torch.rand(3, 4)).pow(2).sum()
        engine.backward(loss)
        engine.step()
        step += 1
        if step == kill_step:
            os.environ[KILL_ENV] = kill_stage
        state = {"step": step, "run_id": run_id, "history": torch.arange(step)}
        save_checkpoint(root, step, engines, state, keep_last=keep, run_id=run_id)
    if state:
        save_checkpoint(root, step, engines, state, keep_last=keep, run_id=run_id)  # the trainer's last save
    weights = {name: p.detach().flatten().tolist() for name, p in engine.module.named_parameters()}
    (root.parent / "run.json").write_text(json.dumps({"resumed_at": resumed_at, "weights": weights}))


def in_child(*args: Any) -> int:
    """Run `train(*args)` in a forked child; its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            train(*args)
            code = 0
        except BaseException as err:  # noqa: BLE001 - report anything, and never return into the parent
            print(f"child failed: {err!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> None:
    workdir, steps, keep, kill_step = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    assert in_child(workdir / "straight" / "ckpt", steps, keep, -1, "") == 0
    expected = json.loads((workdir / "straight" / "run.json").read_text())["weights"]
    results = {}
    for stage in SAVE_STAGES:
        root = workdir / stage / "ckpt"
        killed = in_child(root, steps, keep, kill_step, stage)
        latest = latest_checkpoint(root)
        pointer = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        latest_verified = latest is not None and verify_checkpoint(latest) is None
        hidden = sorted(p.name for p in root.glob(".*"))
        resumed = in_child(root, steps, keep, -1, "")
        run = json.loads((workdir / stage / "run.json").read_text()) if resumed == 0 else {}
        results[stage] = {
            "killed_exit_code": killed,
            "latest": pointer,
            "latest_verified": latest_verified,
            "hidden_after_kill": hidden,
            "resumed_exit_code": resumed,
            "resumed_at": run.get("resumed_at"),
            "same_weights": run.get("weights") == expected,
            "steps_left": [d.name for d in step_dirs(root)],
            "hidden_left": sorted(p.name for p in root.glob(".*")),  # debris is cleared by the next save
        }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
