"""Stopping a training run on SIGTERM or SIGINT at the end of a step, with last.pt written.

A preempted instance, an out-of-memory killer's warning or Ctrl-C sends one of these; the run
finishes the step it is in, every rank agrees on the step to stop at, rank 0 writes last.pt and
the command exits with status 128 + the signal's number. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

CAUGHT = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A run stopped by a signal after a step; its last.pt lets `--resume` continue it."""

    def __init__(self, signum: int, step: int, out_dir: Path):
        self.signum, self.step, self.out_dir = signum, step, out_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; {out_dir / 'last.pt'} holds the run: "
            "continue it with the same command and --resume"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, Path]]:
        return type(self), (self.signum, self.step, self.out_dir)  # raised in a worker process

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by this signal."""
        return 128 + self.signum


class StopSignals:
    """While entered, SIGTERM and SIGINT set `received` (the signal's number) instead of ending
    the process; the handlers before are put back for a second signal and on exit. Outside the
    main thread, where Python cannot handle signals, it catches nothing."""

    def __init__(self) -> None:
        self.received = 0
        self._before: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            before = {s: signal.signal(s, self._handle) for s in CAUGHT}
            # None: a handler not set from Python, which cannot be put back; the default instead
            self._before = {s: signal.SIG_DFL if h is None else h for s, h in before.items()}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self._before[signum])
        logger.warning(
            "%s: stopping after this step and writing last.pt (send it again to stop now)",
            signal.Signals(signum).name,
        )
