"""SIGTERM / SIGUSR1 ask the trainer to checkpoint at the next step boundary and exit (Slurm preemption)."""

from __future__ import annotations

import signal
import types


class StopRequest:
    """Installs the handlers; `requested` turns true once a stop signal arrived."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
