"""SGA and STL (paper Sec. 3.1) and augmentation consistency between image and labels."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_data_sa1b import matting_members, scene, seg_members, write_tar
from zim_lightning.data.augment import (
    centre_square,
    converter_geometric,
    object_centre,
    spatial_generalization_cutout,
)
from zim_lightning.data.datamodule import ZimDataModule
from zim_lightning.data.samples import ConverterSampleProcessor, key_rng
from zim_lightning.data.skips import CorruptSample


def raw_sample(members: list[tuple[str, bytes]]) -> dict:
    key = members[0][0].split(".", 1)[0]
    return {"__key__": key, **{name.split(".", 1)[1]: data for name, data in members}}


def test_sga_cuts_the_same_region_from_both_labels():
    rng = np.random.default_rng(0)
    _, alpha_u8 = scene(rng, 64, 64)
    alpha = alpha_u8 / 255.0
    mask = (alpha > 0.5).astype(np.float32)
    for _ in range(20):
        new_mask, new_alpha, region = spatial_generalization_cutout(mask, alpha, rng, p=1.0)
        x, y, w, h = region
        assert (new_mask[y : y + h, x : x + w] == 0).all() and (new_alpha[y : y + h, x : x + w] == 0).all()
        outside = np.ones_like(mask, bool)
        outside[y : y + h, x : x + w] = False
        np.testing.assert_array_equal(new_mask[outside], mask[outside])
        np.testing.assert_array_equal(new_alpha[outside], alpha[outside])
        assert (mask[y : y + h, x : x + w] > 0).any(), "the cut touches the object"
    same_mask, same_alpha, none = spatial_generalization_cutout(mask, alpha, rng, p=0.0)
    assert none is None and same_mask is mask and same_alpha is alpha


def test_sga_cuts_touch_a_ring_too():
    # A centre drawn in the bounding box would land in the hole and miss a thin ring about 1 time in 6.
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(yy - 64, xx - 64)
    ring = ((radius > 56) & (radius < 60)).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, _, (x, y, w, h) = spatial_generalization_cutout(ring, ring, rng, p=1.0, size_range=(0.1, 0.2))
        assert ring[y : y + h, x : x + w].any()


def test_sga_in_the_converter_sample_leaves_the_image_untouched():
    rng = np.random.default_rng(1)
    image, alpha = scene(rng, 48, 48)
    sample = raw_sample(matting_members("m0", image, alpha))
    with_sga = ConverterSampleProcessor(crop_size=48, sga=True, sga_p=1.0, augment=False)
    without = ConverterSampleProcessor(crop_size=48, sga=False, augment=False)
    never = ConverterSampleProcessor(crop_size=48, sga=True, sga_p=0.0, augment=False)
    cut = with_sga(sample, np.random.default_rng(7), train=True)[0]
    plain = without(sample, np.random.default_rng(7), train=True)[0]
    np.testing.assert_array_equal(cut["image"], plain["image"])
    changed = (cut["mask"] != plain["mask"]) | (cut["alpha"] != plain["alpha"])
    assert changed.any()
    assert (cut["mask"][changed] == 0).all() and (cut["alpha"][changed] == 0).all()
    off = never(sample, np.random.default_rng(7), train=True)[0]
    for name in ("image", "mask", "alpha"):
        np.testing.assert_array_equal(off[name], plain[name])


def test_geometric_augmentation_moves_image_and_alpha_together():
    image = np.zeros((64, 96, 3), np.uint8)
    image[10:30, 20:50] = 255
    alpha = (image[..., 0] / 255.0).astype(np.float32)
    transform = converter_geometric(crop_size=48)
    transform.set_random_seed(3)
    for _ in range(10):
        out = transform(image=image, alpha=alpha)
        bright = out["image"][..., 0] > 127
        assert out["image"].shape == (48, 48, 3) and out["alpha"].shape == (48, 48)
        assert ((out["alpha"] > 0.5) == bright).mean() > 0.98


def test_crop_scale_sets_how_much_of_the_image_a_training_crop_enlarges():
    # alpha ramps 0 -> 1 across the image, so the span of a crop's alpha is the share of the width it saw
    image = np.full((128, 128, 3), 128, np.uint8)
    alpha = np.tile(np.linspace(0.0, 1.0, 128, dtype=np.float32), (128, 1))

    def mean_span(crop_scale: tuple[float, float]) -> float:
        data = ZimDataModule(stage="converter", crop_size=32, crop_scale=crop_scale, num_workers=0)
        geometric = data.converter_processor.geometric
        geometric.set_random_seed(0)
        spans = []
        for _ in range(20):
            out = geometric(image=image, alpha=alpha)["alpha"]
            spans.append(out.max() - out.min())
        return float(np.mean(spans))

    assert mean_span((0.9, 1.0)) > 0.8  # about the whole width (shrunk 4x to the 32 crop)
    assert 0.1 < mean_span((0.04, 0.06)) < 0.5  # about a fifth to a third of it (enlarged to the crop)
    with pytest.raises(ValueError, match="crop_scale"):
        ConverterSampleProcessor(crop_size=32, crop_scale=(0.5, 0.2))


@pytest.fixture
def stl_shards(tmp_path):
    rng = np.random.default_rng(2)
    matting = []
    for i in range(6):
        image, alpha = scene(rng, 40, 40)
        matting += matting_members(f"m{i}", image, alpha)
    seg = []
    for i in range(6):
        image, alpha = scene(rng, 40, 40)
        seg += seg_members(f"s{i}", image, np.where(alpha > 127, 255, 0).astype(np.uint8))
    return str(write_tar(tmp_path / "matting-000000.tar", matting)), str(
        write_tar(tmp_path / "seg-000000.tar", seg)
    )


def _batches(stl_shards, **kwargs):
    matting, seg = stl_shards
    data = ZimDataModule(
        stage="converter",
        train_shards=matting,
        seg_shards=seg,
        crop_size=32,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=1,
        batches_per_epoch=6,
        **kwargs,
    )
    return list(data.train_dataloader())


def test_stl_samples_have_alpha_equal_to_mask(stl_shards):
    batches = _batches(stl_shards, stl=True, stl_ratio=1.0)
    for batch in batches:
        assert batch["is_stl"].all() and all(k.startswith("s") for k in batch["key"])
        assert set(batch["mask"].unique().tolist()) <= {0, 255}
        assert (batch["alpha"] == batch["mask"]).all()
    mixed = _batches(stl_shards, stl=True, stl_ratio=0.5)
    is_stl = np.concatenate([b["is_stl"].numpy() for b in mixed])
    assert 0 < is_stl.mean() < 1
    off = _batches(stl_shards, stl=False, stl_ratio=1.0)
    assert not any(b["is_stl"].any() for b in off)
    assert all(k.startswith("m") for b in off for k in b["key"])


def _validation_sample(processor: ConverterSampleProcessor, members: list[tuple[str, bytes]]) -> dict:
    sample = raw_sample(members)
    return processor(sample, key_rng(0, sample["__key__"]), train=False)[0]


def test_the_validation_square_holds_an_off_centre_object_in_image_and_labels_alike():
    # 48x96 image, object at rows 10:30, columns 70:90: the 48-pixel square centred on it is columns
    # 48:96, where the object sits at rows 10:30, columns 22:42 (a square centred on the image, a
    # transposed CHW image or swapped x / y would all move it)
    image = np.zeros((48, 96, 3), np.uint8)
    alpha = np.zeros((48, 96), np.uint8)
    image[10:30, 70:90] = 255
    alpha[10:30, 70:90] = 255
    sample = _validation_sample(
        ConverterSampleProcessor(crop_size=48, augment=False), matting_members("m", image, alpha)
    )
    expected = np.zeros((48, 48), bool)
    expected[10:30, 22:42] = True
    for channel in sample["image"]:
        np.testing.assert_array_equal(channel > 127, expected)
    np.testing.assert_array_equal(sample["alpha"][0] > 127, expected)


def test_validation_samples_get_no_sga_cut():
    image, alpha = scene(np.random.default_rng(1), 48, 48)
    members = matting_members("m0", image, alpha)
    always = _validation_sample(ConverterSampleProcessor(crop_size=48, sga_p=1.0, augment=False), members)
    never = _validation_sample(ConverterSampleProcessor(crop_size=48, sga=False, augment=False), members)
    for name in ("mask", "alpha"):
        np.testing.assert_array_equal(always[name], never[name])


def test_the_coarse_mask_thresholds_the_matte_between_its_drawn_levels():
    # A ramp from 0 to 255: the threshold op's level is drawn in [0.1, 0.9] of the matte's [0, 1] range,
    # so the coarse mask is empty below 0.1 and full above 0.9 (the uint8 alpha is scaled for it)
    image = np.full((32, 32, 3), 128, np.uint8)
    alpha = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    processor = ConverterSampleProcessor(crop_size=32, coarsen_ops=("threshold",), augment=False)
    levels = set()
    for i in range(8):
        sample = _validation_sample(processor, matting_members(f"m{i}", image, alpha))
        mask, target = sample["mask"][0], sample["alpha"][0]
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert not mask[target < 0.1 * 255].any() and mask[target > 0.9 * 255].all()
        levels.add(int((mask == 0).sum()))
    assert len(levels) > 1  # the level is drawn per sample


def test_a_training_crop_that_misses_the_object_is_not_used():
    # An 8-pixel object in the corner of a 256-pixel image and crops of about 26 pixels: most random
    # crops miss it; the sample must still hold it (another draw, or the square centred on it)
    image = np.zeros((256, 256, 3), np.uint8)
    alpha = np.zeros((256, 256), np.uint8)
    image[:8, :8] = alpha[:8, :8] = 255
    processor = ConverterSampleProcessor(crop_size=32, crop_scale=(0.01, 0.01), sga=False)
    processor.seed(np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert processor(raw_sample(matting_members("m", image, alpha)), rng, train=True)[0]["alpha"].any()


def test_an_stl_object_that_vanishes_in_the_square_is_skipped():
    # A 2x2 mask in a 128 image shrunk to 16: 1/16 coverage, below half, so the binary target is empty
    image = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    mask[60:62, 60:62] = 255
    with pytest.raises(CorruptSample, match="no square crop holds the object"):
        _validation_sample(
            ConverterSampleProcessor(crop_size=16, augment=False), seg_members("s0", image, mask)
        )


def test_centre_square_takes_the_square_around_the_centre_and_averages_when_it_shrinks():
    array = np.arange(32, dtype=np.float32).reshape(4, 8)
    np.testing.assert_array_equal(centre_square(array, 4), array[:, 2:6])
    np.testing.assert_array_equal(centre_square(array, 4, centre=(7.0, 1.0)), array[:, 4:8])  # clamped
    np.testing.assert_array_equal(centre_square(array.T.copy(), 4, centre=(1.0, 7.0)), array.T[4:8])
    stripes = np.tile(np.array([1.0, 0.0, 0.0, 0.0], np.float32), (64, 16))  # 64x64, a quarter on
    np.testing.assert_allclose(centre_square(stripes, 16), 0.25, atol=0.01)  # area, not sampled


def test_object_centre_is_the_centre_of_the_pixel_box():
    label = np.zeros((10, 20))
    label[5, 3] = 1
    assert object_centre(label) == (3.5, 5.5)  # (x, y) of the pixel's centre
    label[7, 9] = 1
    assert object_centre(label) == (6.5, 6.5)
    assert object_centre(np.zeros((10, 20))) == (10.0, 5.0)


def test_sga_cut_sizes_follow_each_side_and_stop_at_the_edge():
    mask = np.zeros((32, 128), np.float32)
    mask[:, 120:] = 1  # the object on the right edge: every cut centre is there
    for seed in range(20):
        rng = np.random.default_rng(seed)
        _, _, (x, y, w, h) = spatial_generalization_cutout(mask, mask, rng, p=1.0, size_range=(0.5, 0.5))
        assert x + w <= 128 and y + h <= 32  # the region reported is the one cut, inside the image
        assert w <= 64 and h <= 16  # half of each side
