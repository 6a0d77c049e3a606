"""Counting of skipped (corrupt) samples, shared by the main process and DataLoader workers.

Bad data never stops a run (DESIGN.md, data flow): every reader that drops a sample reports it here
with one warning line, and the datamodule exposes the totals so the LightningModule can log them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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


class SkipCounter:
    """Per-worker skip counts in one shared-memory tensor.

    Row 0 belongs to the main process, row ``i + 1`` to DataLoader worker ``i``; each process only writes
    its own row, so no lock is needed. The tensor lives in shared memory, so it survives pickling into
    workers (fork or spawn) and the main process reads the workers' counts directly.

    Args:
        max_workers: the largest ``num_workers`` of any DataLoader that will use this counter.
    """

    def __init__(self, *, max_workers: int = 0) -> None:
        self.table = torch.zeros(max_workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

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
        """Count one skipped sample and log one warning line.

        Args:
            reason: one of :data:`SKIP_REASONS`.
            key: the sample key or shard url, for the log line.
            error: what went wrong.
        """
        column = SKIP_REASONS.index(reason if reason in SKIP_REASONS else "other")
        self.table[self._row(), column] += 1
        log.warning("skipped %s (%s): %s", key, reason, error)

    def counts(self) -> dict[str, int]:
        """Totals over the main process and all workers, one entry per reason."""
        totals = self.table.sum(dim=0).tolist()
        return dict(zip(SKIP_REASONS, totals, strict=True))

    def total(self) -> int:
        """Total number of skipped samples."""
        return int(self.table.sum())

    def reset(self) -> None:
        """Zero every count."""
        self.table.zero_()

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
