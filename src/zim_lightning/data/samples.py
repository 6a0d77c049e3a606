"""Per-sample processing of the converter and ZIM stages, and batch collation (ZIM paper, Sec. 3.1-3.2).

A processor turns one raw tar sample (webdataset-style dict of member bytes) into training or validation
samples in the contract of docs/architecture.md, "Batches". Processors are plain picklable objects: the
datamodule runs them inside DataLoader workers with a generator seeded per (seed, rank, worker, epoch)
for training, and per (seed, sample key) for validation, so validation is deterministic whatever the
worker layout.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from zim_lightning.data import coarsen
from zim_lightning.data.augment import (
    CROP_SCALE,
    centre_square,
    converter_geometric,
    object_centre,
    photometric,
    seed_pipelines,
    spatial_generalization_cutout,
    zim_geometric,
)
from zim_lightning.data.matting import (
    decode_matting,
    decode_segmentation,
    is_matting_sample,
    is_segmentation_sample,
)
from zim_lightning.data.prompts import PromptSampler
from zim_lightning.data.sa1b import check_decoded_size, decode_image, decode_matte, parse_annotations
from zim_lightning.data.skips import CorruptSample
from zim_lightning.data.transforms import get_preprocess_shape, resize

#: uint8 alpha to [0, 1]: float32(1 / 255), by which the samples' alphas were always scaled (a float32
#: multiply, so the host's NumPy and the GPU give the same values).
ALPHA_SCALE = float(np.float32(1 / 255))

T = TypeVar("T")

#: Raw-sample field: ``(kind, option)``, the kind of sample a converter stream holds ("matting" or
#: "segmentation") and the datamodule option that named its shards. Set by the datamodule, so that
#: shards given in each other's place are refused, not trained or validated on.
EXPECTED_KIND = "__expected_kind__"
#: Where the converter's training takes each kind of shard.
_TRAINING_OPTION = {"matting": "train_shards", "segmentation": "seg_shards"}


def expect_kind(sample: dict, *, kind: str, option: str) -> dict:
    """Mark a raw sample as read from the ``option`` shards, which hold ``kind`` samples (a pipeline
    map function)."""
    sample[EXPECTED_KIND] = (kind, option)
    return sample


#: Random crops drawn before a training crop that misses the object falls back to one centred on it.
CROP_TRIES = 4


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the run seed and the sample key (deterministic evaluation)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _binary_u8(mask: np.ndarray) -> np.ndarray:
    # HxW float mask in {0, 1} -> uint8 in {0, 255}, the batches' label encoding (255 = 1)
    return np.where(mask > 0.5, np.uint8(255), np.uint8(0))


def _chw(image: np.ndarray) -> np.ndarray:
    # HxWx3 -> 3xHxW, contiguous so that collation is a plain stack.
    return np.ascontiguousarray(image.transpose(2, 0, 1))


class ConverterSampleProcessor:
    """Matting or segmentation (STL) sample -> converter sample (square crop of side ``crop_size``).

    Training: geometric augmentation of image and label together, colour jitter of the image, a coarse
    mask from the matte (:func:`~zim_lightning.data.coarsen.random_coarsen`), then SGA on both labels.
    STL samples keep their mask as input and target. Validation: centre square, a coarse mask drawn with
    a key-seeded generator, no SGA.

    Args:
        crop_size: S, the side of the output crops.
        coarsen_ops: names from :data:`~zim_lightning.data.coarsen.COARSEN_OPS`.
        sga: apply Spatial Generalization Augmentation (paper ablation switch).
        sga_p: probability of the SGA cut.
        augment: geometric and photometric augmentation in training.
        crop_scale: range of the training crop's area as a fraction of the image's (before it is resized
            to ``crop_size``): smaller fractions enlarge more.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        coarsen_ops: Sequence[str] = coarsen.COARSEN_OPS,
        sga: bool = True,
        sga_p: float = 0.5,
        augment: bool = True,
        crop_scale: tuple[float, float] = CROP_SCALE,
    ) -> None:
        unknown = sorted(set(coarsen_ops) - set(coarsen.COARSEN_OPS))
        if unknown or not coarsen_ops:
            raise ValueError(
                f"coarsen_ops must be a non-empty subset of {coarsen.COARSEN_OPS}, got {list(coarsen_ops)}"
            )
        self.crop_size = crop_size
        self.coarsen_ops = tuple(coarsen_ops)
        self.sga = sga
        self.sga_p = sga_p
        self.augment = augment
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}")
        self.geometric = converter_geometric(crop_size=crop_size, scale_range=crop_scale) if augment else None
        self.colour = photometric() if augment else None

    def seed(self, rng: np.random.Generator) -> None:
        """Seed the albumentations pipelines from a worker's generator."""
        seed_pipelines(rng, self.geometric, self.colour)

    def __call__(self, sample: dict, rng: np.random.Generator, *, train: bool) -> list[dict]:
        """Process one raw sample; raises CorruptSample on bad data.

        Args:
            sample: raw tar sample.
            rng: the worker's generator in training, a key-seeded one (:func:`key_rng`) in validation.
            train: training (augmentation, SGA) or validation.
        """
        key = sample.get("__key__", "?")
        if is_segmentation_sample(sample):
            kind = "segmentation"
        elif is_matting_sample(sample):
            kind = "matting"
        else:
            raise CorruptSample(
                f"expected {key}.alpha.png or {key}.mask.png, found {sorted(sample)}",
                key=key,
                reason="missing_member",
            )
        expected, option = sample.get(EXPECTED_KIND, (kind, None))
        if kind != expected:
            remedy = (
                "the converter validates on mattes only"
                if option == "val_shards"
                else f"{kind} shards go in {_TRAINING_OPTION[kind]}"
            )
            raise CorruptSample(
                f"a {kind} sample in {option}, which takes {expected} shards; {remedy}",
                key=key,
                reason="other",
            )
        if kind == "segmentation":
            image, mask = decode_segmentation(sample)
            image, mask = self._geometry(image, mask, "mask", train, key)
            mask = _binary_u8(mask)
            alpha, is_stl = mask, True
        else:
            # The alpha stays uint8: the crop and warps resample a quarter of the bytes, and the batch
            # carries it as it is (unpack_batch scales it on the device)
            image, alpha = decode_matting(sample)
            image, alpha = self._geometry(image, alpha, "alpha", train, key)
            coarse = coarsen.random_coarsen(alpha.astype(np.float32) * ALPHA_SCALE, rng, ops=self.coarsen_ops)
            mask, is_stl = _binary_u8(coarse), False
        if train and self.sga:
            mask, alpha, _ = spatial_generalization_cutout(mask, alpha, rng, p=self.sga_p)
        return [
            {"image": _chw(image), "mask": mask[None], "alpha": alpha[None], "is_stl": is_stl, "key": key}
        ]

    def _geometry(
        self, image: np.ndarray, label: np.ndarray, kind: str, train: bool, key: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if train and self.geometric is not None:
            # A random crop may miss a small object; retry, then centre the square on the object.
            for _ in range(CROP_TRIES):
                out = self.geometric(image=image, **{kind: label})
                if out[kind].any():
                    return self.colour(image=out["image"])["image"], out[kind]
        centre = object_centre(label)
        square = centre_square(label, self.crop_size, centre=centre)
        if kind == "mask":
            square = (square > 0.5).astype(np.float32)
        if not square.any():
            raise CorruptSample("no square crop holds the object", key=key, reason="empty_mask")
        return centre_square(image, self.crop_size, centre=centre), square


class ZimSampleProcessor:
    """SA1B-Matte or matting sample -> ZIM samples in SAM's frame (resized, padded, prompted).

    The JPEG is decoded at a reduced DCT scale when it is at least twice the frame, resized once to the
    frame, and only the chosen annotations' mattes are decoded.

    Args:
        image_size: side of the square frame (1024).
        prompts: the prompt sampler.
        mattes_per_image: SA1B-Matte annotations used per decoded image in training (validation uses one).
        augment: flip and small affine (image and alpha), colour jitter (image) in training.
    """

    def __init__(
        self,
        *,
        image_size: int = 1024,
        prompts: PromptSampler,
        mattes_per_image: int = 1,
        augment: bool = True,
    ) -> None:
        if mattes_per_image < 1:
            raise ValueError(f"mattes_per_image must be >= 1, got {mattes_per_image}")
        self.image_size = image_size
        self.prompts = prompts
        self.mattes_per_image = mattes_per_image
        self.augment = augment
        self.geometric = zim_geometric() if augment else None
        self.colour = photometric() if augment else None

    def seed(self, rng: np.random.Generator) -> None:
        """Seed the albumentations pipelines from a worker's generator."""
        seed_pipelines(rng, self.geometric, self.colour)

    def __call__(self, sample: dict, rng: np.random.Generator, *, train: bool) -> list[dict | CorruptSample]:
        """Process one raw sample into one or more ZIM samples; raises CorruptSample on bad data.

        Args:
            sample: raw tar sample.
            rng: the worker's generator in training, a key-seeded one (:func:`key_rng`) in validation.
            train: training (augmentation, several mattes per image) or validation (one matte).

        Returns:
            One entry per chosen matte: its sample, or the :class:`CorruptSample` that it alone failed
            with (a corrupt PNG, a matte that vanishes at the frame's resolution), for the caller to count,
            so the image's other mattes are still used.
        """
        key = sample.get("__key__", "?")
        if is_matting_sample(sample):
            image, alpha_u8 = decode_matting(sample, max_side=self.image_size)
            originals, alphas = alpha_u8.shape, [alpha_u8]
            keys = [key]
        elif "json" in sample and "jpg" in sample:
            record = parse_annotations(sample["json"], key=key)
            originals = (record["image"]["height"], record["image"]["width"])
            candidates = [a for a in record["annotations"] if "matte" in a]
            if not candidates:
                raise CorruptSample("no annotation carries a matte", key=key, reason="missing_member")
            if train:
                count = min(len(candidates), self.mattes_per_image)
                chosen = rng.choice(len(candidates), size=count, replace=False)
            else:
                chosen = [int(rng.integers(len(candidates)))]
            picked = [candidates[i] for i in chosen]
            # Mattes first: they are cheap and may be corrupt, the JPEG is the expensive part.
            alphas = [_or_skip(decode_matte, sample, a, key=key, image_size=originals) for a in picked]
            if all(isinstance(a, CorruptSample) for a in alphas):
                return alphas  # no JPEG to decode
            keys = [f"{key}.{a.get('id', index)}" for index, a in zip(chosen, picked, strict=True)]
            image = decode_image(sample["jpg"], key=key, max_side=self.image_size)
            check_decoded_size(image, originals, key=key, max_side=self.image_size)
        else:
            raise CorruptSample(
                f"expected {key}.alpha.png, or {key}.jpg with an SA1B-Matte {key}.json, found {sorted(sample)}",
                key=key,
                reason="missing_member",
            )
        input_size = get_preprocess_shape(*originals, self.image_size)
        if min(input_size) < 1:
            raise CorruptSample(
                f"the {originals[1]}x{originals[0]} (WxH) image is too elongated for the "
                f"{self.image_size} frame: its short side would round to 0 pixels",
                key=key,
                reason="corrupt_image",
            )
        image = resize(image, input_size)
        out: list[dict | CorruptSample] = []
        for alpha_u8, sample_key in zip(alphas, keys, strict=True):
            if isinstance(alpha_u8, CorruptSample):
                out.append(alpha_u8)
                continue
            framed = resize(alpha_u8, input_size)
            out.append(_or_skip(self._frame, image, framed, originals, input_size, rng, sample_key, train))
        return out

    def _frame(
        self,
        image: np.ndarray,
        alpha_u8: np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
        rng: np.random.Generator,
        key: str,
        train: bool,
    ) -> dict:
        support_u8 = self.prompts.support_threshold * 255
        if train and self.geometric is not None:
            moved = self.geometric(image=image, alpha=alpha_u8)
            # A small affine can push a small object out of view; keep the unmoved sample then.
            if moved["alpha"].max() > support_u8:
                image, alpha_u8 = moved["image"], moved["alpha"]
            image = self.colour(image=image)["image"]
        if alpha_u8.max() <= support_u8:
            raise CorruptSample("the matte vanishes at the training resolution", key=key, reason="empty_mask")
        coords, labels = self.prompts(alpha_u8.astype(np.float32) / 255.0, rng, image_size=input_size)
        # Unpadded uint8 image and alpha: collate() pads into the batch tensors directly, which moves
        # a quarter of the bytes a padded float alpha would.
        return {
            "image": image,
            "alpha": alpha_u8,
            "point_coords": coords,
            "point_labels": labels,
            "original_size": np.asarray(original_size, dtype=np.int64),
            "input_size": np.asarray(input_size, dtype=np.int64),
            "key": key,
        }


def _or_skip(function: Callable[..., T], *args, **kwargs) -> T | CorruptSample:
    """``function(*args, **kwargs)``, or the :class:`CorruptSample` it raised."""
    try:
        return function(*args, **kwargs)
    except CorruptSample as exn:
        return exn


def collate(samples: list[dict], *, frame_size: int | None = None) -> dict:
    """Stack processed samples into a batch (docs/architecture.md, "Batches").

    Converter samples are stacked as they are, uint8 (``image``, ``mask`` and ``alpha``). ZIM samples
    (they carry ``input_size``) arrive unpadded and uint8; they are written into zero tensors of the
    frame and stay uint8: ``image`` Bx3xSxS and ``alpha`` Bx1xSxS (255 = opaque). :func:`unpack_batch`
    makes the float labels (and ZIM's ``valid`` map) where the batch is used, on the GPU after the
    transfer: a ZIM batch of 8 at 1024 moves 34 MB to pinned memory and over the bus instead of 92 MB,
    a converter batch 42 MB instead of 92.

    Args:
        samples: processed samples.
        frame_size: S, the ZIM frame side (required for ZIM samples).

    Returns:
        The batch: tensors, ``key`` as list[str], ``is_stl`` as bool B.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict = {}
    if "input_size" in samples[0]:
        if frame_size is None:
            raise ValueError("collating ZIM samples needs frame_size, the side of the padded frame")
        size = len(samples)
        image = torch.empty(size, 3, frame_size, frame_size, dtype=torch.uint8)
        alpha = torch.empty(size, 1, frame_size, frame_size, dtype=torch.uint8)
        # Filled through NumPy views, each byte written once: torch's strided copies of HxWx3 -> 3xHxW
        # uint8 are an order of magnitude slower here.
        image_np, alpha_np = image.numpy(), alpha.numpy()
        for i, sample in enumerate(samples):
            height, width = (int(v) for v in sample["input_size"])
            image_np[i, :, :height, :width] = sample["image"].transpose(2, 0, 1)
            alpha_np[i, 0, :height, :width] = sample["alpha"]
            for array in (image_np, alpha_np):
                array[i, :, height:] = 0
                array[i, :, :height, width:] = 0
        batch.update(image=image, alpha=alpha)
    for name in samples[0]:
        if name in batch:
            continue
        values = [s[name] for s in samples]
        if name == "key":
            batch[name] = list(values)
        elif name == "is_stl":
            batch[name] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[name] = torch.from_numpy(np.stack(values))
    return batch


def unpack_batch(batch: dict) -> dict:
    """The batch as the modules read it, made on the batch's device: the uint8 labels of
    :func:`collate` (``alpha``, and the converter's ``mask``) as float32 Bx1xSxS in [0, 1] (times
    :data:`ALPHA_SCALE` in float32), and for ZIM batches ``valid`` float32 Bx1xSxS, 1 inside each
    resized image (``input_size``, H and W) and 0 in its padding.

    Labels already floating point, and a ``valid`` already there (or no ``input_size``), are kept as
    they are. Nothing is read back to the host. Returns a new dict; the others are shared.
    """
    out = dict(batch)
    for name in ("alpha", "mask"):
        if name in out and out[name].dtype == torch.uint8:
            out[name] = out[name].to(torch.float32).mul_(ALPHA_SCALE)
    if "valid" not in out and "input_size" in out:
        image, sizes = out["image"], out["input_size"]
        rows = torch.arange(image.shape[-2], device=image.device)
        cols = torch.arange(image.shape[-1], device=image.device)
        inside = (rows.view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)) & (
            cols.view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
        )
        out["valid"] = inside.unsqueeze(1).to(torch.float32)
    return out
