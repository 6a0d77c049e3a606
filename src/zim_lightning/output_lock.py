"""The lock that keeps a second run of a job (the SA1B-Matte build, an evaluation) out of an output
folder that a run is writing into, for every rank of a multi-process run."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the lock itself needs no Lightning)
    from lightning.pytorch.strategies import Strategy

log = logging.getLogger(__name__)


class RunRefused(ValueError):
    """A run cannot start in its output folder: another holds it, or what it found there stops it."""


def holder_note() -> bytes:
    """Who holds a claim, a lock or a run: host, pid and start time, one json line."""
    note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return (json.dumps(note) + "\n").encode()


class OutputLock:
    """One run of a job at a time per output folder, with two ``flock`` locks the operating system drops
    when their holder dies (so a killed run leaves nothing that blocks the next one):

    - ``OUT/.<job>.lock``, exclusive, held by rank 0; it names its holder during a run (empty between runs);
    - ``OUT/.<job>.ranks``, shared, held by every rank: a new run needs it exclusively for a moment, so
      ranks of an earlier run still going after their rank 0 died also refuse it.

    Two builds into one OUT would write the same temporary shards over each other; a second evaluation
    would delete the first one's predictions. File systems without locks get a warning and no check;
    some (NFS mounted ``nolock``, Lustre ``localflock``) lock per node only, which does not protect
    against a run on another node.

    Args:
        out: the output directory (created if missing).
        job: the job's name, in the lock files' names and the messages (``build``, ``eval``).
    """

    def __init__(self, out: Path, *, job: str = "build") -> None:
        self.out, self.job = out, job
        self.path = out / f".{job}.lock"
        self.ranks_path = out / f".{job}.ranks"
        self.fd: int | None = None
        self.ranks_fd: int | None = None

    def acquire(self) -> str | None:
        """Rank 0: take both locks, the ranks' one shared in the end; returns None, or why not (a running
        run of the job, named, or an error of the file system)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            return f"cannot open {self.path} ({error})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that wrote no note"
            os.close(fd)
            return (
                f"another {self.job} is writing into {self.out} (holder: {holder}); wait for it to end, or "
                "give another --out"
            )
        except OSError as error:
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): make sure no other %s writes into it", self.path, error, self.job
            )
            return None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, holder_note())
            self.ranks_fd = os.open(self.ranks_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_SH)
        except BlockingIOError:
            self.release()
            return (
                f"ranks of an earlier {self.job} are still writing into {self.out} (its rank 0 has ended); "
                "stop them first, or give another --out"
            )
        except OSError as error:
            self.release()
            return f"cannot lock {self.out} for this {self.job} ({error})"
        return None

    def take(
        self, strategy: Strategy, *, rank_zero: bool, then: Callable[[], str | None] = lambda: None
    ) -> None:
        """Every rank of a run, once the ranks can talk: rank 0 acquires the lock and, holding it, runs
        ``then`` (its start: None, or why the run cannot go on); every rank learns the outcome from rank 0
        and raises :class:`RunRefused` together (one rank raising alone would leave the others waiting);
        otherwise the other ranks join.

        Args:
            strategy: the Trainer's strategy (its ``broadcast`` from rank 0).
            rank_zero: whether this process is the run's global rank 0.
            then: rank 0's start of the run, under the lock.
        """
        problem = None
        if rank_zero:
            problem = self.acquire()
            if problem is None:
                problem = then()
        problem = strategy.broadcast(problem, src=0)
        if problem is not None:
            raise RunRefused(problem)
        if not rank_zero:
            self.join()

    def join(self) -> None:
        """Every other rank, once rank 0 holds the locks: hold the ranks' lock, shared, for the run."""
        try:
            self.ranks_fd = os.open(self.ranks_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_SH)
        except OSError as error:  # a file system without locks: rank 0 warned
            log.debug("cannot lock %s (%s)", self.ranks_path, error)

    def release(self) -> None:
        """Drop what this process holds (closing drops a flock); rank 0 also empties the note."""
        if self.ranks_fd is not None:
            os.close(self.ranks_fd)
            self.ranks_fd = None
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
