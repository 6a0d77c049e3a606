"""Tests of the label converter (models/converter.py, models/hiera_backbone.py)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from zim_lightning.models.checkpoint import CheckpointError
from zim_lightning.models.converter import (
    MattingConverter,
    converter_model_registry,
    progressive_refine,
    uncertain_band,
)
from zim_lightning.models.hiera_backbone import SAM2_TRUNK_PREFIX

ALPHA_KEYS = ("alpha", "alpha_os1", "alpha_os4", "alpha_os8")


def _inputs(b: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)
    masks = torch.zeros(b, 1, h, w)
    masks[:, :, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    return images, masks


def _assert_alphas(out: dict[str, torch.Tensor], b: int, h: int, w: int) -> None:
    for key in ALPHA_KEYS:
        value = out[key]
        assert value.shape == (b, 1, h, w), key
        assert torch.isfinite(value).all(), key
        assert value.min() >= 0.0 and value.max() <= 1.0, key


def test_tiny_shapes_ranges_and_gradients() -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]()
    model.train()
    images, masks = _inputs(h=64, w=96)
    out = model(images, masks)
    _assert_alphas(out, 2, 64, 96)
    loss = sum(out[key].mean() for key in ALPHA_KEYS)
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_tiny_accepts_float_images_and_is_deterministic_in_eval() -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]().eval()
    images, masks = _inputs(b=1, h=64, w=64)
    with torch.no_grad():
        a = model(images, masks)["alpha"]
        b = model(images.float(), masks)["alpha"]
    torch.testing.assert_close(a, b)


def test_alpha_stays_float32_under_bf16_autocast() -> None:
    # bf16 alpha has 8 bits: 1/256 steps in [0.5, 1), coarser than the 8-bit PNGs SA1B-Matte stores
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]().eval()
    images, masks = _inputs(b=1, h=64, w=64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, masks)
    for key in ALPHA_KEYS:
        assert out[key].dtype == torch.float32, key


@pytest.mark.slow
def test_hiera_b_plus_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_hiera_b_plus"]().eval()
    assert model.backbone.channels == (112, 224, 448, 896)
    images, masks = _inputs(b=1, h=256, w=256)
    with torch.no_grad():
        out = model(images, masks)
    _assert_alphas(out, 1, 256, 256)


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]().eval()
    plain = tmp_path / "converter.pt"
    torch.save(model.state_dict(), plain)
    lightning = tmp_path / "converter.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, lightning)
    images, masks = _inputs(b=1, h=64, w=64)
    with torch.no_grad():
        expected = model(images, masks)["alpha"]
        for path in (plain, lightning):
            torch.manual_seed(1)  # a different random init, overwritten by the checkpoint
            loaded = converter_model_registry["converter_tiny"](checkpoint=str(path)).eval()
            torch.testing.assert_close(loaded(images, masks)["alpha"], expected)


def test_checkpoint_of_another_model_is_rejected(tmp_path) -> None:
    other = MattingConverter(
        backbone="sam2_hiera_tiny",
        backbone_embed_dim=16,
        backbone_num_heads=1,
        backbone_stages=[1, 1, 2, 1],
        backbone_global_att_blocks=[3],
        backbone_window_spec=[8, 4, 4, 2],
        decoder_dim=64,  # converter_tiny uses 32
    )
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="another shape"):
        converter_model_registry["converter_tiny"](checkpoint=str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        converter_model_registry["converter_tiny"](checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("layout", ["sam2", "timm_safetensors"])
def test_backbone_checkpoint_extends_patch_embed(tmp_path, layout: str) -> None:
    # A 3-channel trunk of converter_tiny's shape, saved the way SAM 2 or the timm hub ship weights.
    torch.manual_seed(0)
    trunk = timm.create_model(
        "sam2_hiera_tiny",
        pretrained=False,
        num_classes=0,
        embed_dim=16,
        num_heads=1,
        stages=(1, 1, 2, 1),
        global_att_blocks=(3,),
        window_spec=(8, 4, 4, 2),
    )
    if layout == "sam2":
        state = {}
        for key, value in trunk.state_dict().items():
            if key.startswith("head."):
                continue
            key = key.replace("mlp.fc1.", "mlp.layers.0.").replace("mlp.fc2.", "mlp.layers.1.")
            state[SAM2_TRUNK_PREFIX + key] = value
        state["sam_mask_decoder.some.weight"] = torch.zeros(3)  # other SAM 2 parts are ignored
        path = tmp_path / "sam2_hiera_tiny.pt"
        torch.save({"model": state}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))  # head included

    model = converter_model_registry["converter_tiny"](backbone_checkpoint=str(path))
    loaded = model.backbone.trunk
    patch = loaded.patch_embed.proj.weight
    assert patch.shape[1] == 4
    torch.testing.assert_close(patch[:, :3], trunk.patch_embed.proj.weight)
    assert torch.count_nonzero(patch[:, 3]) == 0
    torch.testing.assert_close(loaded.blocks[3].mlp.fc2.weight, trunk.blocks[3].mlp.fc2.weight)


def test_backbone_checkpoint_of_another_architecture_is_rejected(tmp_path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"model": {SAM2_TRUNK_PREFIX + "pos_embed": torch.zeros(1, 8, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="does not match"):
        converter_model_registry["converter_tiny"](backbone_checkpoint=str(path))


@pytest.mark.parametrize(
    ("h", "w", "mask_shape", "match"),
    [
        (64, 80, None, "multiples of 32"),
        (64, 64, (1, 1, 32, 64), "masks must be"),
        (64, 64, (1, 64, 64), "masks must be"),
    ],
)
def test_input_errors(h: int, w: int, mask_shape: tuple[int, ...] | None, match: str) -> None:
    model = converter_model_registry["converter_tiny"]().eval()
    images = torch.zeros(1, 3, h, w)
    masks = torch.zeros(mask_shape if mask_shape is not None else (1, 1, h, w))
    with pytest.raises(ValueError, match=match):
        model(images, masks)


def test_masks_outside_zero_one_are_refused() -> None:
    model = converter_model_registry["converter_tiny"]().eval()
    images, masks = _inputs(b=1, h=64, w=64)
    with pytest.raises(ValueError, match="float in \\[0, 1\\], got dtype torch.uint8 .*divide by 255"):
        model(images, (masks * 255).to(torch.uint8))
    model(images, torch.zeros_like(masks))  # an empty first batch shows nothing of the range
    with pytest.raises(ValueError, match="in \\[0, 1\\], got values in \\[0.0, 255.0\\]"):
        model(images, masks * 255)
    model(images, masks)  # values are read back until a batch with a foreground passes (then no more)
    model(images, masks * 255)


def test_the_backbone_sees_sam_normalised_rgb_and_the_mask_in_minus_one_one() -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]().eval()
    images, masks = _inputs(b=1, h=64, w=64)
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        first = model(images, masks)["alpha"]
        flipped = model(images, 1.0 - masks)["alpha"]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0][:, :3], (images.float() - mean) / std)
    torch.testing.assert_close(seen[0][:, 3:], masks * 2 - 1)
    assert (first - flipped).abs().max() > 1e-3  # the mask changes the matte


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a timm model"):
        MattingConverter(backbone="no_such_hiera")
    with pytest.raises(ValueError, match="expected a Hiera"):
        MattingConverter(backbone="resnet18")


def test_uncertain_band_marks_only_values_strictly_between_0_and_1() -> None:
    alpha = torch.zeros(1, 1, 8, 8)
    alpha[..., 4:, :] = 1.0
    alpha[0, 0, 1, 1] = 0.5  # uncertain
    alpha[0, 0, 1, 6] = 0.5 / 255  # quantises to 0: certain
    alpha[0, 0, 6, 6] = 1.0 - 0.5 / 255  # quantises to 1: certain
    band = uncertain_band(alpha, 0)
    expected = torch.zeros_like(band)
    expected[0, 0, 1, 1] = True
    assert torch.equal(band, expected)
    dilated = uncertain_band(alpha, 1)
    expected = torch.zeros_like(band)
    expected[0, 0, 0:3, 0:3] = True  # the 3x3 square around (1, 1)
    assert torch.equal(dilated, expected)


def test_progressive_refine_keeps_coarse_alpha_outside_the_band() -> None:
    coarse = torch.zeros(1, 1, 16, 16)
    coarse[..., :, 8:] = 1.0
    coarse[0, 0, 4, 4] = 0.5
    coarse[0, 0, 12, 8] = 0.25
    finer = torch.full_like(coarse, 0.7)
    refined, band = progressive_refine(coarse, finer, 2)

    expected_band = torch.zeros_like(band)
    disk = torch.ones(5, 5, dtype=torch.bool)  # radius 2: the 5x5 square without its corners
    disk[0, 0] = disk[0, -1] = disk[-1, 0] = disk[-1, -1] = False
    expected_band[0, 0, 2:7, 2:7] = disk
    expected_band[0, 0, 10:15, 6:11] = disk
    assert torch.equal(band, expected_band)
    assert torch.equal(refined[band], finer[band])
    assert torch.equal(refined[~band], coarse[~band])


def test_model_refinement_follows_os8_outside_band_and_ablation_switch() -> None:
    torch.manual_seed(0)
    model = converter_model_registry["converter_tiny"]().eval()
    # saturate the stride-8 head so most of the image is certain and the band is a strict subset
    with torch.no_grad():
        model.head_os8.weight.zero_()
        model.head_os8.bias.fill_(20.0)
    images, masks = _inputs(b=1, h=64, w=64)
    with torch.no_grad():
        out = model(images, masks)
    assert not out["band_os4"].any()  # os8 is certainly 1 everywhere: nothing to refine
    torch.testing.assert_close(out["alpha"], out["alpha_os8"])

    model.progressive_refinement = False
    with torch.no_grad():
        out = model(images, masks)
    torch.testing.assert_close(out["alpha"], out["alpha_os1"])


def test_refinement_widths_random_in_training_fixed_in_eval() -> None:
    # MGMatting's widths (30, 15) are kernel sizes: a kernel width // 2 across in evaluation (radius 7
    # and 3), one of 1..width-1 in training
    model = converter_model_registry["converter_tiny"]()
    assert (model.refine_width_os4, model.refine_width_os1) == (30, 15)
    model.train()
    torch.manual_seed(0)
    draws = {model._widths() for _ in range(200)}
    assert {r4 for r4, _ in draws} == set(range(15)) and {r1 for _, r1 in draws} == set(range(8))
    model.eval()
    assert model._widths() == (7, 3)
    # one uncertain pixel's band at the evaluation radius: a disk 15 pixels across, not a 61x61 square
    alpha = torch.zeros(1, 1, 41, 41)
    alpha[0, 0, 20, 20] = 0.5
    band = uncertain_band(alpha, 7)[0, 0]
    assert band[20, 13] and band[20, 27] and not band[20, 12] and not band[13, 13]
    assert 150 < int(band.sum()) < 180


def test_compile_model_compiles_the_whole_converter_in_place_and_keeps_keys():
    from zim_lightning import speed

    net = converter_model_registry["converter_tiny"]()
    keys = list(net.state_dict())
    assert speed.compile_model(net, mode="default", parts=None) is net
    assert net._compiled_call_impl is not None  # the module itself is compiled (at its first call)
    assert list(net.state_dict()) == keys
