"""Shards and resuming: input shards, output names, finished and stale files and the ranks' shard claims
(the output lock is :class:`zim_lightning.output_lock.OutputLock`)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zim_lightning.data.shards import expand_shards
from zim_lightning.data.tar_writer import PARTIAL_SUFFIX
from zim_lightning.output_lock import holder_note

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
#: Where the processes of a run claim the shards they build (see :class:`ShardClaims`).
CLAIMS_DIR = "claims"
RUN_NOTE = "run.json"


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
        (self.directory / RUN_NOTE).write_bytes(holder_note())

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
            handle.write(holder_note())
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
