"""SIGTERM / SIGUSR1 / SIGINT ask the trainer to checkpoint at the next step boundary and exit (Slurm
preemption, Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt), without the checkpoint."""

from __future__ import annotations

import os
import signal
import types


class StopRequest:
    """Installs the handlers; `requested` turns true once a stop signal arrived."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts
            if os.environ.get("RANK", "0") == "0":  # os.write: the handler may interrupt a print
                os.write(2, b"\nvbon: stopping after this step with a checkpoint; Ctrl-C again to quit now\n")

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
