"""Reading weights from the checkpoint files users hand us.

Two kinds of file hold a network's weights: a plain state dict (``torch.save(model.state_dict())``) and
a Lightning checkpoint, whose ``state_dict`` prefixes each key with the attribute that holds the network
in the LightningModule (``net.`` here). Both load with ``weights_only=True``: a checkpoint is data, and
must not run code.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_WEIGHTS_LOADED_LATER = contextvars.ContextVar("zim_lightning_weights_loaded_later", default=False)


@contextlib.contextmanager
def weights_loaded_later() -> Iterator[None]:
    """Networks built inside start from weights their caller loads next (a run's checkpoint), or whose
    randomness the caller reports itself: the builders' random-start warnings are not given."""
    token = _WEIGHTS_LOADED_LATER.set(True)
    try:
        yield
    finally:
        _WEIGHTS_LOADED_LATER.reset(token)


#: Attribute a builder sets on a network that starts from random weights: what to give instead.
RANDOM_START_ATTR = "zim_lightning_random_start"


def warn_random_start(network: str, remedy: str) -> None:
    """Warn that ``network`` starts from random weights (a paper-scale one should not), unless inside
    :func:`weights_loaded_later`."""
    if not _WEIGHTS_LOADED_LATER.get():
        log.warning("%s starts from RANDOM weights; %s", network, remedy)


def mark_random_start(model: torch.nn.Module, remedy: str) -> None:
    """Record on ``model`` that it starts from random weights and what would give it pretrained ones (for
    :func:`random_start_of`), unless inside :func:`weights_loaded_later`."""
    if not _WEIGHTS_LOADED_LATER.get():
        setattr(model, RANDOM_START_ATTR, remedy)


def random_start_of(model: torch.nn.Module) -> str | None:
    """The remedy :func:`mark_random_start` recorded on ``model``, or None (pretrained or loaded weights)."""
    return getattr(model, RANDOM_START_ATTR, None)


#: Attribute names under which our LightningModules keep their network.
LIGHTNING_PREFIXES: tuple[str, ...] = ("net.",)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or holds weights of another model."""


#: Key of a Lightning checkpoint under which ``zim-lightning fit`` stores the network's config
#: (``{"class_path": ..., "init_args": {...}}``, as the run's config.yaml has it), so that the checkpoint
#: alone rebuilds its network (plain YAML values: it loads with ``weights_only=True``).
NET_SPEC_KEY = "zim_lightning_net"


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> object:
    """``torch.load`` with ``weights_only=True`` on the CPU; CheckpointError naming the file on failure.

    One read serves both :func:`net_spec_of` and :func:`state_dict_of` (a Lightning checkpoint with its
    optimiser state can take gigabytes). ``mmap`` maps the tensors' storage instead of reading it: for
    looking at names and shapes only (zip-format files, what ``torch.save`` has written since 1.6).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    with path.open("rb") as file:
        start = file.read(4)
    if not (start.startswith(b"PK") or start.startswith(b"\x80")):  # torch.save's zip, or a bare pickle
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint: it is neither the zip archive torch.save "
            f"writes nor a pickle (it starts with {start!r})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a PyTorch state dict or Lightning checkpoint "
            f"with weights_only=True: {err}"
        ) from err


def net_spec_of(checkpoint: object) -> dict | None:
    """The network config a loaded ``zim-lightning fit`` checkpoint carries (:data:`NET_SPEC_KEY`), or None."""
    spec = checkpoint.get(NET_SPEC_KEY) if isinstance(checkpoint, Mapping) else None
    return spec if isinstance(spec, dict) else None


def read_net_spec(path: str | Path) -> dict | None:
    """The network config a ``zim-lightning fit`` checkpoint carries (:data:`NET_SPEC_KEY`), or None.

    Raises:
        CheckpointError: if the file is missing or cannot be read with ``weights_only=True``.
    """
    return net_spec_of(load_checkpoint(path))


def state_dict_of(
    checkpoint: object, *, source: str | Path, prefixes: Iterable[str] = LIGHTNING_PREFIXES
) -> dict[str, torch.Tensor]:
    """The flat network state dict of a loaded plain state dict or Lightning checkpoint.

    Args:
        checkpoint: what :func:`load_checkpoint` returned.
        source: the file it came from, for errors.
        prefixes: key prefixes to strip from a Lightning checkpoint (the LightningModule attribute that
            holds the network). Keys without one of them (optimizer-side buffers, metrics) are dropped.

    Raises:
        CheckpointError: if it holds no tensors.
    """
    if (
        isinstance(checkpoint, Mapping)
        and "state_dict" in checkpoint
        and isinstance(checkpoint["state_dict"], Mapping)
    ):
        prefixes = tuple(prefixes)
        state = {}
        for key, value in checkpoint["state_dict"].items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = value
                    break
        if not state:
            raise CheckpointError(
                f"Lightning checkpoint {str(source)!r} holds no network weights under the prefixes {prefixes}"
            )
        return state
    if (
        isinstance(checkpoint, Mapping)
        and checkpoint
        and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ):
        return dict(checkpoint)
    raise CheckpointError(
        f"checkpoint {str(source)!r} holds a {type(checkpoint).__name__}, expected a state dict of tensors "
        "or a Lightning checkpoint with a 'state_dict' entry"
    )


def read_state_dict(
    path: str | Path, *, prefixes: Iterable[str] = LIGHTNING_PREFIXES
) -> dict[str, torch.Tensor]:
    """Read a plain state dict or a Lightning checkpoint into a flat state dict (see :func:`state_dict_of`).

    Args:
        path: file written by ``torch.save(model.state_dict())`` or by Lightning's ``ModelCheckpoint``.
        prefixes: key prefixes to strip from a Lightning checkpoint.

    Returns:
        The network's state dict, keys as the bare ``nn.Module`` names them.

    Raises:
        CheckpointError: if the file is missing, cannot be read with ``weights_only=True``, or holds no
            tensors.
    """
    return state_dict_of(load_checkpoint(path), source=path, prefixes=prefixes)


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes."""
    return {k: tuple(v.shape) for k, v in state.items()}


def shape_mismatch(own: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]) -> str | None:
    """How saved tensors (names -> shapes) differ from a network's (:func:`shapes_of` its state dict):
    what is missing, unexpected and of another shape, a few names each; None when they agree."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(saved) if own[k] != saved[k])

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
    if mis_shaped:
        parts.append(
            f"{len(mis_shaped)} with another shape: "
            + show([f"{k} {saved[k]} vs {own[k]}" for k in mis_shaped])
        )
    return "; ".join(parts) or None


def load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``, requiring the same keys and shapes on both sides.

    Args:
        model: the network to fill.
        state: its weights, e.g. from :func:`read_state_dict`.
        source: where the weights came from, for the error message (a path or a model name).

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys, when the checkpoint was
            written for another model or architecture variant.
    """
    problem = shape_mismatch(shapes_of(model.state_dict()), shapes_of(state))
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {source!r} does not match {type(model).__name__}; it was written for another "
            f"model or architecture variant ({problem})"
        )
    model.load_state_dict(state, strict=True)
