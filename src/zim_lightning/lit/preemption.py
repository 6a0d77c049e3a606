"""Preemption: a run stopped by SIGTERM, sent to the main process or to its whole process group.

SLURM's preemption, ``timeout`` and ``kill -- -PGID`` signal every process of the group, the DataLoader
workers too. Lightning stops the run at the end of the batch and saves its steps (``save_on_exception``),
but the workers die at once, and PyTorch's SIGCHLD check for dead workers would raise in the main
process wherever it is: in the middle of the step, or of the save
(:func:`expect_worker_deaths_after_sigterm` stops that check). The commands then tell a stop for
SIGTERM from a failure by the trainer's own flag (:func:`is_preemption`, :func:`stop_or_raise`) and
exit with 143, so that a preempted run does not look finished.
"""

from __future__ import annotations

import logging
import signal
import threading

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def is_preemption(error: BaseException, trainer: Trainer | None) -> bool:
    """Whether ``error`` is how a run of ``trainer`` (a Lightning ``Trainer``, or None when the run failed
    before it had one) stops for a SIGTERM: Lightning's ``SIGTERMException``, or any error once
    ``trainer`` has received the signal. When the signal reaches the DataLoader workers, the main process
    can fail on them in several ways: a RuntimeError for dead workers while it waited for a batch, a
    ConnectionResetError while a worker was handing a batch over; and a collective fails whose other
    rank the signal stopped. (Lightning sets the trainer's flag from the time it takes SIGTERM over, and
    each run starts without it, so an error of a later run in the same process is not taken for a
    preemption.)"""
    if isinstance(error, SIGTERMException):
        return True
    return isinstance(error, Exception) and trainer is not None and trainer.received_sigterm


def stop_message(error: BaseException) -> str:
    """The line that says how a run stopped for SIGTERM, naming the error it caused when it was not
    Lightning's own stop."""
    if isinstance(error, SIGTERMException):
        return "stopped by SIGTERM"
    return f"stopped by SIGTERM (then {type(error).__name__}: {error})"


def stop_or_raise(error: BaseException, trainer: Trainer | None, advice: str) -> int:
    """For an error caught around a Lightning run of ``trainer``: when it is a preemption
    (:func:`is_preemption`), log how the run stopped and ``advice``, and return the exit status 143
    (128 + SIGTERM; the error's traceback is logged at DEBUG); otherwise raise it."""
    if not is_preemption(error, trainer):
        raise error
    log.warning("%s; %s", stop_message(error), advice)
    if not isinstance(error, SIGTERMException):
        log.debug("the error after SIGTERM", exc_info=error)
    return 128 + signal.SIGTERM


def _no_check(signum: int, frame) -> None:
    """SIGCHLD after a SIGTERM: the workers' deaths are expected. (A Python no-op rather than SIG_DFL,
    which CPython reports as a race when SIGCHLD is already pending; SIG_IGN would reap the workers.)"""


def expect_worker_deaths_after_sigterm() -> None:
    """Add to the SIGTERM handler in place (Lightning's, once a Trainer runs its loop): on the signal,
    stop PyTorch's check for dead workers. Does nothing off the main thread, on Windows, before
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
        signal.signal(signal.SIGCHLD, _no_check)
        current(signum, frame)

    handler.expects_worker_deaths = True
    signal.signal(signal.SIGTERM, handler)
