"""Counting of skipped (corrupt) samples, shared by the main process and DataLoader workers.

Bad data never stops a run: every reader that drops a sample reports it here
with one warning line, and the datamodule exposes the totals so the LightningModule can log them.
Each reason gets at most :data:`LOGGED_PER_REASON` lines per counter and process (a run over SA-1B meets
the same kind of bad mask thousands of times); later skips are counted, not logged.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.utils.data

log = logging.getLogger(__name__)

#: Reasons a sample can be skipped, in the column order of :attr:`SkipCounter.table`.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",
    "bad_json",
    "bad_rle",
    "empty_mask",
    "truncated_tar",
    "missing_member",
    "other",
)


#: Warning lines per skip reason that one counter writes in one process; later skips of that reason are
#: counted only, which one more line says.
LOGGED_PER_REASON = 20


class SkipLog:
    """The warning lines of one counter: each key once, at most ``limit`` keys per reason, then one line
    saying that further skips of that reason are counted in ``counted_in`` only. Holds at most ``limit``
    keys per reason, however long the run.

    Args:
        counted_in: where the counts go, for that line (``{reason}`` is replaced).
        limit: the most keys logged per reason.
    """

    def __init__(self, *, counted_in: str, limit: int = LOGGED_PER_REASON) -> None:
        self.counted_in = counted_in
        self.limit = limit
        self._keys: dict[str, set[str]] = {}
        self._quiet: set[str] = set()

    def __call__(self, reason: str, key: str, error: BaseException | str) -> None:
        if reason in self._quiet:
            return
        keys = self._keys.setdefault(reason, set())
        if key in keys:
            return
        if len(keys) < self.limit:
            keys.add(key)
            log.warning("skipped %s (%s): %s", key, reason, error)
            return
        self._quiet.add(reason)
        del self._keys[reason]
        log.warning(
            "skipped more than %d samples (%s); later ones are counted in %s, not logged",
            self.limit,
            reason,
            self.counted_in.format(reason=reason),
        )


class CorruptSample(ValueError):
    """A sample that cannot be decoded; it is skipped and counted, never fatal.

    Attributes:
        key: the sample key (``sa_<id>``) or shard url.
        reason: one of :data:`zim_lightning.data.skips.SKIP_REASONS`.
    """

    def __init__(self, message: str, *, key: str, reason: str = "other") -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.reason = reason


class SkipSink(Protocol):
    """Where a reader reports a sample it skips: a :class:`SkipCounter` (a data module's, shared with its
    DataLoader workers) or a :class:`SkipTally` (one reader's own counts)."""

    def skip(self, reason: str, key: str, error: BaseException | str) -> None: ...


class SkipTally:
    """Skip counts of one reader in one process, by reason (the SA1B-Matte builder keeps one per shard
    and writes it to the shard's manifest); skips are logged as :class:`SkipLog` says."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self._log = SkipLog(counted_in="this shard's manifest")

    def skip(self, reason: str, key: str, error: BaseException | str) -> None:
        reason = reason if reason in self.counts else "other"
        self.counts[reason] += 1
        self._log(reason, key, error)


class SkipCounter:
    """Per-worker skip counts in one shared-memory tensor.

    Row 0 belongs to the main process, row ``i + 1`` to DataLoader worker ``i``; each process only writes
    its own row, so no lock is needed. The tensor lives in shared memory, so it survives pickling into
    workers (fork or spawn) and the main process reads the workers' counts directly. Loaders whose
    workers run at the same time (training's persistent workers prefetch while validation's run) count
    in separate lanes (:meth:`lane`), so no row has two writers.

    Args:
        max_workers: the largest ``num_workers`` of any DataLoader that will use this counter.
        lanes: how many loaders may count at the same time.
    """

    def __init__(self, *, max_workers: int = 0, lanes: int = 1) -> None:
        self.tables = torch.zeros(
            lanes, max_workers + 1, len(SKIP_REASONS), dtype=torch.int64
        ).share_memory_()
        self.table = self.tables[0]
        #: The warning lines of this process (each process, DataLoader workers too, has its own).
        self._log = SkipLog(counted_in="data/skipped_{reason}")

    def lane(self, index: int) -> SkipCounter:
        """A counter writing to lane ``index`` of the same shared tensor (its totals are this counter's)."""
        other = copy.copy(self)
        other.table = self.tables[index]
        return other

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else info.id + 1
        if row >= self.table.shape[0]:
            raise RuntimeError(
                f"SkipCounter was sized for {self.table.shape[0] - 1} workers but worker {row - 1} "
                "reported a skip; construct it with a larger max_workers"
            )
        return row

    def skip(self, reason: str, key: str, error: BaseException | str) -> None:
        """Count one skipped sample, and log one warning line the first time this process skips it
        (training resamples shards, so the same bad sample comes back: counted every time, logged once;
        and at most :data:`LOGGED_PER_REASON` samples per reason).

        Args:
            reason: one of :data:`SKIP_REASONS`.
            key: the sample key or shard url, for the log line.
            error: what went wrong.
        """
        reason = reason if reason in SKIP_REASONS else "other"
        self.table[self._row(), SKIP_REASONS.index(reason)] += 1
        self._log(reason, key, error)

    def counts(self) -> dict[str, int]:
        """Totals over the main process and all workers, one entry per reason."""
        totals = self.tables.sum(dim=(0, 1)).tolist()
        return dict(zip(SKIP_REASONS, totals, strict=True))

    def total(self) -> int:
        """Total number of skipped samples."""
        return int(self.tables.sum())

    def reset(self) -> None:
        """Zero every count."""
        self.tables.zero_()

    def handler(self) -> Callable[[BaseException], bool]:
        """A webdataset exception handler that counts, warns and continues.

        :class:`CorruptSample` carries its own key and reason; any other exception is a bug, not bad
        data, and is re-raised.
        """

        def warn_count_and_continue(exn: BaseException) -> bool:
            if not isinstance(exn, CorruptSample):
                raise exn
            self.skip(exn.reason, exn.key, exn)
            return True

        return warn_count_and_continue
