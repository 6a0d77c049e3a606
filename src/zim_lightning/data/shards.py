"""Shard lists: expansion of brace patterns and ``pipe:`` urls, and deterministic rank/worker assignment.

Evaluation-style passes (validation, the SA1B-Matte build, MicroMat-3K) must see every sample exactly once
across all ranks and workers; these helpers give each (rank, worker) a disjoint slice of the shard list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import braceexpand
import torch.utils.data


def expand_shards(spec: str | Sequence[str], *, check_exists: bool = True) -> list[str]:
    """Expand a shard specification into a list of urls, order preserved.

    Args:
        spec: a local path, a brace pattern (``"sa_{000000..000009}.tar"``), a ``pipe:`` url, several of
            these separated by ``::``, or a list of them.
        check_exists: check that every local path exists (``pipe:`` and ``scheme://`` urls are not
            checked). A training stream draws shards endlessly, so a mistyped path would otherwise
            never end, and a deterministic pass would silently miss the shard.

    Returns:
        The shard urls.

    Raises:
        ValueError: if the specification expands to nothing.
        FileNotFoundError: if a local shard does not exist (the message names the first few).
    """
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    urls = [url for part in parts for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard specification {spec!r} names no shards; expected a path or brace pattern")
    if check_exists:
        missing = [url for url in urls if is_local(url) and not os.path.exists(url)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"{len(missing)} of the {len(urls)} shards of {spec!r} do not exist: {shown}"
            )
    return urls


def is_local(url: str) -> bool:
    """Whether a shard url is a local path (not ``pipe:...`` nor ``scheme://...``)."""
    return not url.startswith("pipe:") and "://" not in url


def distributed_info(*, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed, else the RANK/WORLD_SIZE env vars."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info(*, worker: int | None = None, num_workers: int | None = None) -> tuple[int, int]:
    """(worker, num_workers): explicit values, else the current DataLoader worker, else (0, 1)."""
    if worker is not None and num_workers is not None:
        return worker, num_workers
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def assign_shards(
    urls: Sequence[str],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    """The shards one (rank, worker) reads in a deterministic pass.

    Shards are dealt round-robin to the ranks, then each rank's round-robin to its workers: what
    :func:`split_by_rank` and :func:`split_by_dataloader_worker` give a real DataLoader worker. The slices
    are disjoint and together cover ``urls`` exactly once.

    Args:
        urls: all shards, in a fixed order.
        rank: this process's rank in [0, world_size).
        world_size: number of processes.
        worker: this DataLoader worker in [0, num_workers).
        num_workers: workers per process (1 when loading in the main process).
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(
            f"expected 0 <= rank < world_size and 0 <= worker < num_workers, got rank={rank}, "
            f"world_size={world_size}, worker={worker}, num_workers={num_workers}"
        )
    return list(urls[rank::world_size][worker::num_workers])


def split_by_rank(
    src: Iterable[dict], *, rank: int | None = None, world_size: int | None = None
) -> Iterator[dict]:
    """Webdataset nodesplitter: keep every ``world_size``-th shard starting at ``rank``."""
    rank, world_size = distributed_info(rank=rank, world_size=world_size)
    for index, item in enumerate(src):
        if index % world_size == rank:
            yield item


def split_by_dataloader_worker(src: Iterable[dict]) -> Iterator[dict]:
    """Webdataset workersplitter: keep every ``num_workers``-th shard starting at this worker's id."""
    worker, num_workers = worker_info()
    for index, item in enumerate(src):
        if index % num_workers == worker:
            yield item
