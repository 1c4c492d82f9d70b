"""SIGINT and SIGTERM while training (Ctrl-C, a cluster's preemption): the first asks the loop to
finish its step, write a checkpoint and stop; a second aborts at once.

The handler only records the request; the loop asks `StopRequests.requested` after each step, which
under torchrun all-reduces the request, so every rank stops after the same step and joins the
checkpoint even when only one of them got the signal. A terminal's Ctrl-C reaches every process of
the group and torchrun forwards it once more, so a repeat within `DUPLICATE_WINDOW_S` of the first
is taken as the same request; a later one restores the default action and re-raises the signal:
the process ends at once, leaving the last complete checkpoint (they are written atomically).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the CLI's start-up: the CLI catches TrainingInterrupted
    from xiaolm.runtime import Runtime

HANDLED = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 1.0


class TrainingInterrupted(Exception):
    """A signal stopped training after `step`; `checkpoint` is the run's last checkpoint (that step's,
    unless the step was not finite; None on processes other than the main one)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, saved_now: bool) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended: 130, 143
        stopped = f"stopped by {signal.Signals(signum).name} after step {step}"
        if saved_now:
            message = f"{stopped}; checkpoint {checkpoint} written (continue with --resume)"
        else:  # a non-finite step is never saved
            message = (f"{stopped}, a step with a non-finite loss: not saved; the last checkpoint is "
                       f"{checkpoint}")
        super().__init__(message)


class StopRequests:
    """Installs the handlers for the duration of a `with` block (main thread only; elsewhere the
    process keeps its handlers and nothing is ever requested)."""

    def __init__(self) -> None:
        self.signum = 0
        self.first_at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            print(f"\nxiaolm: {name}: finishing this step and writing a checkpoint; send it again to abort "
                  "at once", file=sys.stderr, flush=True)
        elif time.monotonic() - self.first_at >= DUPLICATE_WINDOW_S:
            print(f"\nxiaolm: {name} again: aborting now; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self, runtime: Runtime) -> int:
        """The signal that asked to stop (0: none), the same on every rank."""
        if not runtime.ctx.enabled:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
