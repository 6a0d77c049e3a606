"""Nothing in the hot paths makes the host wait for the GPU before it must: a training step's forward and
the predictor queue all their work, so the GPU never idles while Python catches up. Checked on the CPU
with fake CUDA tensors (``tests/host_waits.py``): what a CUDA run would copy or read back, without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.host_waits import HostWaits
from zim_lightning import speed
from zim_lightning.lit.converter_module import ConverterModule
from zim_lightning.lit.zim_module import ZimModule
from zim_lightning.models.build import build_zim_tiny
from zim_lightning.models.converter import build_converter_tiny
from zim_lightning.predictor import ZimPredictor

FRAME = 256


def fake_cuda() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.mark.parametrize(
    ("attention", "switches"),
    [
        ("sdpa_fold", {}),
        ("sdpa", {}),
        ("sdpa_fold", {"multimask": True, "iou_weight": 1.0}),
    ],  # + the ablations' terms
)
def test_zim_training_step_and_its_means_read_nothing_back(attention: str, switches: dict) -> None:
    # (the autograd engine needs a real CUDA context, so the backward pass is not run here)
    with fake_cuda(), torch.device("cuda"):
        net = build_zim_tiny(image_size=FRAME)
        speed.set_attention(net, attention)
        module = ZimModule(net=net, **switches)
        batch = {  # as the datamodule's batches arrive on the GPU (samples.collate)
            "image": torch.randint(0, 256, (2, 3, FRAME, FRAME), dtype=torch.uint8),
            "alpha": torch.randint(0, 256, (2, 1, FRAME, FRAME), dtype=torch.uint8),
            "input_size": torch.tensor([[FRAME, 200], [180, FRAME]]),
            "point_coords": torch.rand(2, 3, 2) * FRAME,
            "point_labels": torch.tensor([[2.0, 3.0, -2.0], [1.0, 0.0, -1.0]]),  # a box, two points
        }
    # outside torch.device("cuda"), which would also put what the code makes on the CPU on the GPU
    with fake_cuda(), HostWaits() as spy:
        alpha, terms = module._step(batch)  # it makes the float alpha and the valid map there
        # the running means: a training step's (forward: the batch value too) and a validation batch's
        means = module.train_metrics["train/loss"](terms["loss"].detach())
        module._accumulate_eval(module.val_metrics, terms, batch_size=2)
    assert alpha.device.type == "cuda"
    assert terms["loss"].device.type == "cuda" and means.device.type == "cuda" and len(spy.ops) > 1000
    assert spy.waits == []


def test_converter_reads_its_mask_values_back_only_until_a_batch_passes() -> None:
    module = ConverterModule(net=build_converter_tiny())  # timm's Hiera reads values while it is built
    with fake_cuda():
        module = module.to("cuda")
        with torch.device("cuda"):
            batch = {
                "image": torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8),
                "alpha": torch.rand(2, 1, 128, 128),
                "mask": (torch.rand(2, 1, 128, 128) > 0.5).float(),
            }
        with HostWaits(read_backs=[False, False, True]) as first:  # low < 0, high > 1, high > 0
            module._step(batch)
        with HostWaits() as second:
            module._step(batch)
    assert [where for _, what, where in first.waits if "read-back" in what]  # the range check
    assert second.waits == [] and len(second.ops) > 1000


@pytest.fixture(scope="module")
def mode() -> FakeTensorMode:
    """The fake mode of the predictor's tensors (they need the same one in every test)."""
    return fake_cuda()


@pytest.fixture(scope="module")
def predictor(mode: FakeTensorMode) -> ZimPredictor:
    with mode, torch.device("cuda"):
        net = build_zim_tiny(image_size=FRAME).eval()
    predictor = ZimPredictor(net)
    with mode:
        predictor.set_image(np.zeros((200, 240, 3), np.uint8))
    return predictor


def test_predictor_queues_the_whole_decode_before_reading_the_alpha(
    mode: FakeTensorMode, predictor: ZimPredictor
) -> None:
    with mode, HostWaits() as spy:
        # fake tensors have no values to hand to NumPy; the host waits just before, for the alpha
        with pytest.raises(RuntimeError, match="numpy"):
            predictor.predict(
                point_coords=np.array([[50, 60]]),
                point_labels=np.array([1]),
                box=np.array([10, 20, 150, 180]),
            )
    (at, what, _), *_ = spy.waits
    assert what == "blocking copy cuda -> cpu of (4, 200, 240)"
    assert "sigmoid" in spy.ops[:at] and "convolution" in spy.ops[:at]


def test_predict_torch_reads_back_only_to_check_labels_already_on_the_gpu(
    mode: FakeTensorMode, predictor: ZimPredictor
) -> None:
    with mode:
        boxes = torch.rand(16, 4, device="cuda") * 100
        with HostWaits() as boxes_only:
            masks, _, _ = predictor.predict_torch(None, None, boxes, multimask_output=False)
        coords, labels = torch.rand(2, 3, 2, device="cuda"), torch.ones(2, 3, device="cuda")
        with HostWaits(read_backs=[True, True, True]) as points:  # labels known, each set has a point, finite
            predictor.predict_torch(coords, labels, multimask_output=False)
        coords, labels = torch.rand(2, 3, 2) * 100, torch.ones(2, 3)  # on the host: the automatic generator's
        with HostWaits(read_backs=[True, True, True]) as host_points:
            predictor.predict_torch(coords, labels, multimask_output=False)
    assert masks.shape == (16, 1, 200, 240) and boxes_only.waits == []
    assert [what for _, what, _ in points.waits] == ["blocking copy cuda -> cpu of (3,)"]  # one, for all
    assert host_points.waits == []  # checked on the host, copied without waiting
