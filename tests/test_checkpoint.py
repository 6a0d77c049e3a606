"""Checkpoint reading (zim_lightning.models.checkpoint): data only, onto the CPU, with errors that name the
file; what a checkpoint holds; the weights-loaded-later marks. Loading into networks: test_models_zim.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zim_lightning.models import checkpoint as ckpt
from zim_lightning.models.checkpoint import (
    NET_SPEC_KEY,
    CheckpointError,
    load_checkpoint,
    mark_random_start,
    net_spec_of,
    random_start_of,
    state_dict_of,
    weights_loaded_later,
)


class _NotATensor:
    """A pickled object that weights_only loading must refuse to build."""


def test_load_checkpoint_reads_data_only_onto_the_cpu_and_wraps_every_read_error(tmp_path: Path, monkeypatch):
    # what a break looks like: (no map_location: a GPU-saved checkpoint fails on a CPU-only machine; a pass-through spy, as no
    # GPU is here), (a folder), (torch raises several types for foreign or corrupt files)
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, path)
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(1))
    assert str(seen.get("map_location")) == "cpu" and seen.get("weights_only") is True
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="does not exist or is not a file"):
        load_checkpoint(tmp_path)
    torch.save({"w": torch.zeros(1), "code": _NotATensor()}, tmp_path / "pickled.pt")  # UnpicklingError
    torch.save({"w": torch.zeros(1000)}, tmp_path / "truncated.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "truncated.pt").read_bytes()[:100])  # RuntimeError
    (tmp_path / "empty.pt").write_bytes(b"")  # EOFError
    (tmp_path / "text.pt").write_bytes(b"hello world, not a pickle")  # KeyError
    for name in ("pickled.pt", "truncated.pt"):
        with pytest.raises(CheckpointError, match="could not be read"):
            load_checkpoint(tmp_path / name)
    for name in ("empty.pt", "text.pt"):  # said so, not with PyTorch's advice to load without weights_only
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint: it is neither the zip"):
            load_checkpoint(tmp_path / name)
    torch.save({"w": torch.ones(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / "legacy.pt")["w"], torch.ones(1))  # a bare pickle reads


def test_net_spec_of_returns_a_dict_or_none():
    spec = {"class_path": "zim_lightning.models.build.build_zim", "init_args": {"variant": "tiny"}}
    assert net_spec_of({NET_SPEC_KEY: spec}) == spec
    assert net_spec_of({NET_SPEC_KEY: "build_zim"}) is None
    assert net_spec_of({NET_SPEC_KEY: ["x"]}) is None
    assert net_spec_of(["not", "a", "mapping"]) is None


def test_state_dict_of_refuses_what_holds_no_network_weights():
    # what a break looks like: (a Lightning checkpoint with no "net." keys), (an empty dict), (a dict of non-tensors)
    # (a "state_dict" entry that is no mapping)
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="no network weights under the prefixes"):
        state_dict_of({"state_dict": {"model.w": t}}, source="other.ckpt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        state_dict_of({}, source="empty.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        state_dict_of({"w": t, "epoch": 3}, source="mixed.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        state_dict_of({"state_dict": [t]}, source="odd.ckpt")
    # keys: only the first "net." goes (a network holding a submodule named net keeps its own prefix)
    state = state_dict_of({"state_dict": {"net.net.w": t, "net.b": t, "train_metrics.x": t}}, source="s")
    assert set(state) == {"net.w", "b"}


def test_nested_weights_loaded_later_and_random_start_marks():
    # what a break looks like: (an inner block ending the outer's), (marked inside the block), (the block does nothing)
    net = torch.nn.Linear(1, 1)
    with weights_loaded_later():
        with weights_loaded_later():
            pass
        mark_random_start(net, "give checkpoint=")
    assert random_start_of(net) is None
    mark_random_start(net, "give checkpoint=")
    assert random_start_of(net) == "give checkpoint="
