"""Shards and resuming: input shards, output names, finished and stale files, the ranks' shard claims and the
output lock."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zim_lightning.data.shards import expand_shards
from zim_lightning.data.tar_writer import PARTIAL_SUFFIX

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
#: Where the processes of a run claim the shards they build (see :class:`ShardClaims`).
CLAIMS_DIR = "claims"
RUN_NOTE = "run.json"
#: The lock one build holds on OUT for its whole run (see :class:`OutputLock`).
LOCK_NAME = ".build.lock"
RANKS_LOCK_NAME = ".build.ranks"


def resolve_shards(specs: Sequence[str]) -> list[Path]:
    """Input shards from directories, brace patterns and paths, sorted by name, without duplicates.

    Raises:
        ValueError: if a spec names nothing, a named shard is not a file, or two shards share a name
            (their outputs would collide).
    """
    paths: list[Path] = []
    for spec in specs:
        if Path(spec).is_dir():
            found = sorted(p for p in Path(spec).iterdir() if p.name.endswith(".tar") and p.is_file())
            if not found:
                raise ValueError(f"--sa1b directory {spec!r} holds no .tar shards")
            paths += found
            continue
        for url in expand_shards(spec):
            if not Path(url).is_file():
                raise ValueError(f"--sa1b shard {url!r} does not exist or is not a file (from {spec!r})")
            paths.append(Path(url))
    unique = sorted(set(paths), key=lambda p: (p.name, str(p)))
    names = [p.name for p in unique]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"--sa1b names several shards called {clashes}; each output shard takes its input's name"
        )
    if not unique:
        raise ValueError(f"--sa1b {list(specs)!r} names no shards")
    return unique


def output_path(out: Path, shard: Path) -> Path:
    return out / shard.name


def manifest_path(out: Path, shard: Path) -> Path:
    return out / MANIFEST_DIR / (Path(shard.name).stem + ".json")


def failure_path(out: Path, shard: Path) -> Path:
    """Where a shard whose input was damaged records why it was not finished."""
    return out / MANIFEST_DIR / (Path(shard.name).stem + ".failed.json")


def is_done(out: Path, shard: Path) -> bool:
    """A shard is done when its output exists under the final name (the rename comes last, after the
    manifest's) and so does its manifest: a shard without one (deleted, or copied in alone) has no
    recorded settings to check a resume against, and is built again."""
    return output_path(out, shard).is_file() and manifest_path(out, shard).is_file()


def remove_stale(out: Path, shard: Path) -> list[Path]:
    """Delete the temporary files a killed run left for ``shard``; returns what was removed."""
    removed = []
    for final in (output_path(out, shard), manifest_path(out, shard)):
        stale = final.with_name(final.name + PARTIAL_SUFFIX)
        if stale.exists():
            stale.unlink()
            removed.append(stale)
    return removed


def _holder_note() -> bytes:
    """Who holds a claim, a lock or a run: host, pid and start time, one json line."""
    note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return (json.dumps(note) + "\n").encode()


def new_run_id() -> str:
    """A name for one run's claims: its start time (readable) and a random part (unique)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ShardClaims:
    """Which process builds each shard in one run: the first to create its claim file.

    A claim is ``OUT/claims/<run_id>/<shard>.claim``, created with ``O_CREAT | O_EXCL``, which is atomic
    on local file systems and on NFS (v3 and later) and Lustre; it holds the claimant's host and pid.
    Every process of a run uses the same ``run_id`` (rank 0's, broadcast), so a claim left by a killed
    run blocks nothing: the next run has its own directory, made by :meth:`begin`, which removes the
    others. Every process checks that it sees that directory (:meth:`visible`): on a per-node OUT each
    node would otherwise build every shard. Picklable: DataLoader workers claim shards themselves.

    Args:
        out: the output directory.
        run_id: this run's name (:func:`new_run_id`).
    """

    out: Path
    run_id: str

    @property
    def directory(self) -> Path:
        return self.out / CLAIMS_DIR / self.run_id

    def begin(self) -> None:
        """Start the run's claims (in one process, before any claim): remove earlier runs' claims and
        create this run's directory, with a note of who made it."""
        root = self.out / CLAIMS_DIR
        for run in root.iterdir() if root.is_dir() else ():
            if run.name != self.run_id:
                shutil.rmtree(run, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / RUN_NOTE).write_bytes(_holder_note())

    def visible(self, timeout_s: float = 60.0) -> bool:
        """Whether this process sees the directory :meth:`begin` made (polling up to ``timeout_s``: a
        network file system may show another node's new directory a little later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if (self.directory / RUN_NOTE).is_file():
                    return True
            except OSError as error:  # e.g. a stale NFS handle: not visible, decided with the others
                log.warning("cannot look for %s (%s)", self.directory, error)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def claim(self, shard: Path) -> bool:
        """Claim ``shard`` for the calling process; False when another process of this run has it or it
        is finished. A claimed shard's temporary files left by a killed run are removed."""
        if is_done(self.out, shard):
            return False
        try:
            fd = os.open(
                self.directory / (shard.name + ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
            )
        except FileExistsError:
            return False
        except FileNotFoundError:  # the run's claims are gone (another build removed them): claim nothing
            log.error(
                "%s is gone: %s and the shards after it are left for a rerun", self.directory, shard.name
            )
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(_holder_note())
        for stale in remove_stale(self.out, shard):
            log.info("removed %s left by an interrupted run", stale)
        return True

    def remove(self) -> None:
        """Delete this run's claims and, when no other run's remain, the claims directory itself."""
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            (self.out / CLAIMS_DIR).rmdir()
        except OSError:  # another run's claims (or a file system that lags) keep it
            pass


class OutputLock:
    """One build at a time per OUT, with two ``flock`` locks the operating system drops when their holder
    dies (so a killed build leaves nothing that blocks the next one):

    - ``OUT/.build.lock``, exclusive, held by rank 0; it names its holder during a run (empty between runs);
    - ``OUT/.build.ranks``, shared, held by every rank: a new build needs it exclusively for a moment, so
      ranks of an earlier build still running after their rank 0 died also refuse it.

    Two builds into one OUT would write the same temporary shards over each other. File systems without
    locks get a warning and no check; some (NFS mounted ``nolock``, Lustre ``localflock``) lock per node
    only, which does not protect against a build on another node.

    Args:
        out: the output directory.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / LOCK_NAME
        self.ranks_path = out / RANKS_LOCK_NAME
        self.fd: int | None = None
        self.ranks_fd: int | None = None

    def acquire(self) -> str | None:
        """Rank 0: take both locks, the ranks' one shared in the end; returns None, or why not (a running
        build, named, or an error of the file system)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            return f"cannot open {self.path} ({error})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that wrote no note"
            os.close(fd)
            return (
                f"another build is writing into {self.out} (holder: {holder}); wait for it to end, or build "
                "into another --out"
            )
        except OSError as error:
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure no other build writes into it", self.path, error)
            return None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _holder_note())
            self.ranks_fd = os.open(self.ranks_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_SH)
        except BlockingIOError:
            self.release()
            return (
                f"ranks of an earlier build are still writing into {self.out} (its rank 0 has ended); stop "
                "them first, or build into another --out"
            )
        except OSError as error:
            self.release()
            return f"cannot lock {self.out} for this build ({error})"
        return None

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
