"""The atomic, reproducible tar writer every shard producer uses (``synth``, ``pack-shards``; the
SA1B-Matte builder streams its own tar but shares the member headers), their PNG member encoder, the
atomic write of one file that the builder's manifests and the commands' pictures go through, and the
staging folder of the commands that write several files together (``matte-all``, ``export-onnx``).

Kept free of torch so that writing data stays a light import.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

#: Permissions recorded for every member of the tars we write.
TAR_MEMBER_MODE = 0o644
#: Suffix of a file being written, renamed to its final name when complete.
PARTIAL_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: an interrupted write
    leaves the old file or none, never a truncated one (a failed one removes its temporary file)."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def staging_folder(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A new hidden folder in ``out_dir`` (named ``prefix`` + random letters) where a command writes its
    files before it moves them in; removed on leaving, whatever happens.

    Folders of the same prefix are removed first: those a killed run left (SIGKILL or an unhandled
    SIGTERM skip any clean-up). So one run at a time may write into ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=prefix))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on the name and size only (no time, owner or umask)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, TAR_MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, members: Iterable[tuple[str, bytes]], *, compress: bool) -> None:
    """Write a tar with sorted members and fixed metadata, via a temporary name and an atomic rename.

    The bytes depend on the members only (no times, owners or gzip file name), so the same content gives
    the same file. A failure part way removes the temporary file, so ``path`` is either complete or
    absent.

    Args:
        path: the shard to write (replaced if it exists).
        members: ``(name, bytes)`` pairs, written in name order.
        compress: gzip the tar (as SA-1B ships its ``.tar`` files).
    """
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as raw:
            # gzip with mtime 0 and no file name so the bytes depend on the content only.
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
            try:
                with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    for name, data in sorted(members):
                        tar.addfile(member_info(name, len(data)), io.BytesIO(data))
            finally:
                if compress:
                    stream.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_png(array: np.ndarray) -> bytes:
    """A uint8 (or uint16) HxW or HxWxC array as PNG bytes, for a shard member."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
