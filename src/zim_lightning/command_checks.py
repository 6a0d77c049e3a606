"""Checks of the command-line arguments that several commands share, made before any work or any write,
so that a bad one is a usage error (exit status 2) that names it rather than a traceback midway."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def out_folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be an output folder (created if missing), or None when it can: it is a file,
    a file lies on the way to it, or its nearest existing folder is not writable."""
    path = Path(path)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            if existing == path:
                return f"{str(path)!r} is a file; expected a folder (created if missing)"
            return f"{str(path)!r} cannot be a folder: {str(existing)!r} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{str(path)!r} cannot be written: {str(existing)!r} is not writable"
        return None
    return None


def check_out_folder(parser: argparse.ArgumentParser, path: str | Path, option: str = "--out") -> None:
    """:func:`out_folder_problem` as a usage error of ``option``."""
    problem = out_folder_problem(path)
    if problem is not None:
        parser.error(f"{option} {problem}")


def device_for_command(parser: argparse.ArgumentParser, device: str | None, option: str = "--device") -> str:
    """``device`` (default: cuda when available, else cpu), checked by placing an empty tensor on it: an
    unknown name, or a GPU this machine does not have, is a usage error of ``option``."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:  # an unknown name; no such device here
        parser.error(
            f"{option} {device!r}: not a device this machine can run on ({str(error).splitlines()[0]})"
        )
    return device
