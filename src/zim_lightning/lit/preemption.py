"""Preemption with DataLoader workers: a SIGTERM sent to the whole process group.

SLURM's preemption, ``timeout`` and ``kill -- -PGID`` signal every process of the group, the DataLoader
workers too. Lightning stops the run at the end of the batch and saves its steps (``save_on_exception``),
but the workers die at once, and PyTorch's SIGCHLD check for dead workers would raise in the main
process wherever it is: in the middle of the step, or of the save.
"""

from __future__ import annotations

import signal
import threading

from lightning.pytorch.utilities.exceptions import SIGTERMException

_RECEIVED = threading.Event()


def stopped_by_sigterm() -> bool:
    """Whether a SIGTERM reached a run under :func:`expect_worker_deaths_after_sigterm`. A run waiting for
    a batch when the signal killed its workers fails on them (a RuntimeError) before Lightning stops it."""
    return _RECEIVED.is_set()


def is_preemption(error: BaseException) -> bool:
    """Whether ``error`` is how a Lightning run stops for a SIGTERM: Lightning's ``SIGTERMException``, or
    the RuntimeError of a DataLoader whose workers the signal killed (see :func:`stopped_by_sigterm`)."""
    return isinstance(error, SIGTERMException) or (isinstance(error, RuntimeError) and stopped_by_sigterm())


def _no_check(signum: int, frame) -> None:
    """SIGCHLD after a SIGTERM: the workers' deaths are expected. (A Python no-op rather than SIG_DFL,
    which CPython reports as a race when SIGCHLD is already pending; SIG_IGN would reap the workers.)"""


def expect_worker_deaths_after_sigterm() -> None:
    """Add to the SIGTERM handler in place (Lightning's, once a Trainer runs its loop): note the signal
    and stop PyTorch's check for dead workers. Does nothing off the main thread, on Windows, before
    Lightning has taken SIGTERM over, or when already done for this handler."""
    current = signal.getsignal(signal.SIGTERM)
    if (
        not hasattr(signal, "SIGCHLD")
        or threading.current_thread() is not threading.main_thread()
        or not callable(current)  # the default action: no Trainer has taken SIGTERM over
        or getattr(current, "expects_worker_deaths", False)
    ):
        return

    def handler(signum: int, frame) -> None:
        _RECEIVED.set()
        signal.signal(signal.SIGCHLD, _no_check)
        current(signum, frame)

    handler.expects_worker_deaths = True
    _RECEIVED.clear()  # a new run (an earlier one in this process may have been stopped)
    signal.signal(signal.SIGTERM, handler)
