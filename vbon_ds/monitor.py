"""TensorBoard scalars and text on rank 0 (other ranks get a monitor that writes nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class Monitor:
    """Writes scalars and text under `log_dir` when enabled; a no-op otherwise (other ranks, logging off)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True) -> None:
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def text(self, tag: str, body: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, body, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars under a TensorBoard directory as {tag: [(step, value), ...]} (for tests and plots)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
