"""A dispatch mode that records where the host would wait for a CUDA device.

Run under ``FakeTensorMode`` with modules and tensors on ``cuda``, it shows on a machine without a GPU
what a CUDA run would do: every value read back to the host (``.item()``, ``bool()``, ``nonzero``), every
blocking copy between host and device, and every CPU tensor handed to a CUDA operator (copied there,
blocking). Each of these stops the host from queueing work ahead of the GPU.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators whose result the host must read from the device.
READ_BACKS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal"})


def _where() -> str:
    frames = [
        f for f in traceback.extract_stack()[:-3] if "zim_lightning" in f.filename or "tests" in f.filename
    ]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))


class HostWaits(TorchDispatchMode):
    """Records ``(operator index, what, where)`` for every wait in ``waits``, and every operator's name
    in ``ops``.

    Args:
        read_backs: the values that fake scalar read-backs (``.item()``, ``bool()``) return, in order, so
            that the code goes on past them; 0 after the last.
    """

    def __init__(self, *, read_backs: Iterable[float] = ()) -> None:
        super().__init__()
        self.read_backs = iter(read_backs)
        self.waits: list[tuple[int, str, str]] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        wait = None
        if name in READ_BACKS and tensors[0].device.type == "cuda":
            wait = f"read-back aten.{name}"
        elif name == "_to_copy" and "device" in kwargs and not kwargs.get("non_blocking", False):
            source, target = tensors[0].device.type, torch.device(kwargs["device"]).type
            if {source, target} == {"cpu", "cuda"}:
                wait = f"blocking copy {source} -> {target} of {tuple(tensors[0].shape)}"
        elif name == "copy_" and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
            target, source = tensors[0].device.type, tensors[1].device.type
            if {source, target} == {"cpu", "cuda"}:
                wait = f"blocking copy {source} -> {target} of {tuple(tensors[1].shape)}"
        elif {"cpu", "cuda"} <= {t.device.type for t in tensors if t.dim() > 0}:
            wait = f"CPU tensor into CUDA aten.{name}"
        if wait is not None:
            self.waits.append((len(self.ops), wait, _where()))
        if name == "_local_scalar_dense":
            return next(self.read_backs, 0)  # a fake tensor has no value
        return func(*args, **kwargs)
