"""Interactive matting with ZIM: one image, many prompts (ZIM paper, Sec. 3.3 and 4: inference with box
and point prompts, as SAM).

:class:`ZimPredictor` follows segment-anything's ``SamPredictor`` and the official ``zim_anything``
``ZimPredictor``: ``set_image`` encodes an image once, ``predict`` decodes a NumPy prompt in the
original image's pixels, ``predict_torch`` decodes a batch of prompts (already in the 1024 frame) in one
decoder call. The image is resized exactly as the official predictor does (torchvision ``to_pil_image``
and ``resize`` of the longest side to 1024, via segment-anything's ``ResizeLongestSide``), and logits
come back to the original size the same way (bilinear to 1024, crop, bilinear to the original), so a
network with the official weights gives the official mattes. The third output is segment-anything's,
the low-res logits at the decoder's resolution; the official predictor returns their sigmoid upsampled
2x. ``resize="tensor"`` resizes on the model's device with torchvision instead (the same pixels but for
rare one-level differences, several times faster: see :class:`ZimPredictor`).

Prompts become the decoder's labelled points (SAM's ONNX convention): points get the padding point
``(-0.5, -0.5)`` labelled -1, as the official decoder adds; a box becomes its two corners labelled 2
and 3; points and a box together are concatenated (the sample is then a box sample, so the box map
restricts the attention; the official predictor instead gives the decoder only the box's corners, under
the points' Gaussian map).
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from zim_lightning import speed
from zim_lightning.models.zim import Zim
from zim_lightning.prompt_labels import (
    LABEL_ABSENT,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_PAD,
    PADDING_POINT,
)

#: Accepted ``image_format`` values.
IMAGE_FORMATS = ("RGB", "BGR")
#: Accepted ``resize`` values (see :class:`ZimPredictor`).
RESIZE_MODES = ("pil", "tensor")


class ZimPredictor:
    """Encode an image once, then predict mattes for prompts.

    Args:
        model: the network; it stays on its device, and its train/eval mode is left as it is (ZIM has
            no dropout or batch statistics, so both modes compute the same function). Speed switches
            (``zim_lightning.speed``: attention backend, ``compile_model``, ``to_channels_last``) are
            applied to the model before it is handed over.
        precision: ``"fp32"``, or ``"bf16"`` for bf16 autocast of the ViT encoder (GPUs with bf16; the
            fastest measured path on an H100 is compiled ``sdpa_fold`` in bf16, see docs/benchmarks.md).
            With bf16 the predictor's calls run with the model's ``float32_heads`` on
            (:func:`zim_lightning.speed.float32_heads`; the model is left as it was): the feature pyramid
            and the decoder stay float32, whose bf16 rounding moved the alpha the most. Outputs are
            float32 either way.
        resize: how ``set_image`` brings the image to the model's frame. ``"pil"``: segment-anything's
            ``ResizeLongestSide`` (Pillow's antialiased bilinear on the host), exactly the official
            predictor's. ``"tensor"``: torchvision's antialiased bilinear resize of the uint8 image on
            the model's device, which gives Pillow's pixels but for rare one-level differences and takes
            a fraction of the host time (docs/benchmarks.md, "Predictor preprocessing"). An image
            already at the frame's size is not resized either way.
    """

    def __init__(self, model: Zim, *, precision: str = "fp32", resize: str = "pil") -> None:
        if precision not in speed.PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(speed.PRECISIONS)}, got {precision!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.model = model
        self.precision = precision
        self.resize = resize
        self.transform = ResizeLongestSide(model.image_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.interm_feats: tuple[torch.Tensor, ...] | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an image for the following ``predict`` calls.

        Args:
            image: HxWx3 uint8 (or integer in [0, 255]) array.
            image_format: channel order of ``image``, ``"RGB"`` or ``"BGR"``.

        Raises:
            ValueError: for an image that is not HxWx3 with values in [0, 255], so elongated that its
                short side would be 0 pixels in the model's frame, or an unknown format.
        """
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image must be an HxWx3 array, got shape {image.shape}")
        frame = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.model.image_size)
        if min(frame) < 1:
            raise ValueError(
                f"image of {image.shape[1]}x{image.shape[0]} (WxH) pixels is too elongated: with its long "
                f"side resized to {self.model.image_size}, its short side would be 0 pixels"
            )
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
                raise ValueError(
                    f"image must be uint8 (or integers in [0, 255]), got dtype {image.dtype}"
                    + (f" with values in [{image.min()}, {image.max()}]" if image.size else "")
                )
            image = image.astype(np.uint8)
        if image_format == "BGR":
            image = image[..., ::-1]
        self.set_torch_image(self.to_frame(image), (int(image.shape[0]), int(image.shape[1])))

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Encode an image already resized to the model's frame, as segment-anything's ``SamPredictor``.

        Args:
            transformed_image: 1x3xhxw RGB in [0, 255] (uint8 or float): the original resized to the
                frame ``self.transform.get_preprocess_shape(H, W, image_size)`` (as :meth:`to_frame`
                does); on any device (it is moved to the model's). Not segment-anything's
                ``ResizeLongestSide.apply_image_torch``, which takes its frame from the batch and channel
                sizes (1 and 3, so a 1x3 aspect), a frame that SamPredictor accepts and decodes
                prompts against wrongly.
            original_image_size: (H, W) of the image before resizing: the frame of the returned mattes.

        Raises:
            ValueError: for a tensor that is not 1x3xhxw at the frame ``original_image_size`` resizes to.
        """
        height, width = (int(side) for side in original_image_size)
        frame = self.transform.get_preprocess_shape(height, width, self.model.image_size)
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[:2] != (1, 3) or shape[2:] != frame:
            raise ValueError(
                f"transformed_image must be 1x3x{frame[0]}x{frame[1]} (the {width}x{height} original resized "
                f"to the longest side {self.model.image_size}, as to_frame does), got {shape}"
            )
        self.reset_image()
        with speed.autocast(self.device, self.precision), speed.float32_heads(self.model):
            self.features, self.interm_feats = self.model.encode_image(transformed_image.to(self.device))
        self.original_size = (height, width)
        self.input_size = frame
        self.is_image_set = True

    def to_frame(self, image: np.ndarray) -> torch.Tensor:
        """What :meth:`set_image` encodes: an HxWx3 uint8 RGB image resized to the model's frame (longest
        side ``image_size``, see ``resize``), as a 1x3xhxw uint8 tensor on the model's device."""
        image = np.ascontiguousarray(image)
        frame = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.model.image_size)
        if self.resize == "pil" and frame != image.shape[:2]:
            image = self.transform.apply_image(image)
        tensor = torch.as_tensor(image, device=self.device).permute(2, 0, 1)[None]
        if tuple(tensor.shape[-2:]) != frame:
            tensor = TF.resize(tensor, list(frame), interpolation=InterpolationMode.BILINEAR, antialias=True)
        return tensor

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding.

        Returns:
            1xCx64x64.
        """
        self._require_image()
        assert self.features is not None
        return self.features

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        *,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict mattes for one prompt, in the original image's pixels.

        The arguments after ``box`` are keyword-only: segment-anything's ``SamPredictor.predict`` takes
        ``mask_input`` there, which ZIM has no use for, so a positional call written for SAM fails
        instead of reading its mask input as ``multimask_output``.

        Args:
            point_coords: Nx2 ``(X, Y)`` pixels of the original image, or None.
            point_labels: N labels, 1 foreground, 0 background; required with ``point_coords``.
            box: ``(x1, y1, x2, y2)`` pixels of the original image, or None.
            multimask_output: True: the 4 mattes of the 4 mask tokens (segment-anything's default);
                False: mask 0 only. The paper's loss trains mask 0 alone: mattes 1-3 and the IoU
                scores mean something only for a model trained with ``multimask`` and ``iou_weight``
                (see :class:`~zim_lightning.lit.zim_module.ZimModule`).
            return_logits: return logits instead of alpha.

        Returns:
            (masks CxHxW float32: alpha in [0, 1] (logits with ``return_logits``) at the original size,
            iou C float32, low-res logits Cxhxw float32 at the decoder resolution (512x512 for the
            hierarchical pixel decoder, 256x256 for SAM's)). C = 4 or 1.

        Raises:
            RuntimeError: before :meth:`set_image`.
            ValueError: for malformed prompts (see :meth:`predict_torch`), a box with x2 < x1 or
                y2 < y1 or entirely outside the image, or no prompt at all.
        """
        self._require_image()
        assert self.original_size is not None
        coords_t = labels_t = box_t = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels)
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t, labels_t = self._upload(coords[None]), self._upload(labels[None])
        if box is not None:
            box = _check_box(box, self.original_size)
            box_t = self._upload(self.transform.apply_boxes(box[None], self.original_size))
        # checked on the host above, so predict_torch reads no value back before decoding
        coords_t, labels_t = self._decoder_prompts(coords_t, labels_t, box_t, check_values=False)
        masks, iou, low_res = self._decode(
            coords_t, labels_t, multimask_output=multimask_output, return_logits=return_logits
        )
        return (
            masks[0].float().cpu().numpy(),
            iou[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        *,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict mattes for B prompts of the current image in one decoder call.

        Args:
            point_coords: BxNx2 ``(X, Y)`` pixels in the resized 1024 frame
                (``self.transform.apply_coords_torch``), or None.
            point_labels: BxN labels in {0, 1}; required with ``point_coords``. Point sets of different
                lengths batch with filler labels: -2 (absent: each row decodes exactly as it would alone)
                or -1 (SAM's padding point: a token that changes the result, as in segment-anything).
            boxes: Bx4 ``(x1, y1, x2, y2)`` in the 1024 frame, or None.
            multimask_output: True: 4 mattes per prompt; False: mask 0 only.
            return_logits: return logits instead of alpha.

        Returns:
            (masks BxCxHxW alpha in [0, 1] (or logits) at the original size, iou BxC, low-res logits
            BxCxhxw at the decoder resolution).

        Raises:
            RuntimeError: before :meth:`set_image`.
            TypeError: for prompts that are not tensors (:meth:`predict` takes NumPy arrays).
            ValueError: for prompts of the wrong shape, labels outside {0, 1} (and the fillers), batch
                sizes that differ, or no prompt at all; and for coordinates that are not finite or boxes
                with x2 < x1 or y2 < y1, except boxes alone on a GPU, which are not read back (so that
                nothing waits for the GPU).
        """
        self._require_image()
        coords, labels = self._decoder_prompts(point_coords, point_labels, boxes)
        return self._decode(coords, labels, multimask_output=multimask_output, return_logits=return_logits)

    @torch.no_grad()
    def _decode(
        self, coords: torch.Tensor, labels: torch.Tensor, *, multimask_output: bool, return_logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.features is not None and self.interm_feats is not None
        with speed.autocast(self.device, self.precision), speed.float32_heads(self.model):
            logits, iou = self.model.decode(
                self.features, self.interm_feats, coords, labels, multimask_output=multimask_output
            )
        logits, iou = logits.float(), iou.float()  # upsampling and sigmoid in float32
        assert self.input_size is not None and self.original_size is not None
        masks = self.model.postprocess_masks(logits, self.input_size, self.original_size)
        return (masks if return_logits else masks.sigmoid()), iou, logits

    def _decoder_prompts(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        *,
        check_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn points and/or boxes into the decoder's labelled points (BxMx2, BxM), on the model's device.

        Nothing here waits for the GPU, so the decoder is queued while the encoder still runs, except
        the check of the values (``check_values``: labels known, coordinates finite, boxes with x2 >= x1
        and y2 >= y1) of prompts already on a GPU: one read-back for all of them.
        """
        if point_coords is None and point_labels is None and boxes is None:
            raise ValueError("give at least one prompt: point_coords with point_labels, or boxes")
        for name, value in (("point_coords", point_coords), ("point_labels", point_labels), ("boxes", boxes)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor (or None), got {type(value).__name__}; predict() takes "
                    "NumPy arrays in the original image's pixels"
                )
        # What must hold (message: a boolean tensor), read back together; None: nothing to check.
        checks: dict[str, torch.Tensor] | None = {} if check_values else None
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (coords BxKx2, labels BxK)
        if point_coords is not None or point_labels is not None:
            parts.append(_point_part(point_coords, point_labels, alone=boxes is None, checks=checks))
        batch = parts[0][0].shape[0] if parts else None
        if boxes is not None:
            parts.append(self._box_part(boxes, batch, checks=checks))
        else:
            # Point-only prompts get SAM's padding point, as the official decoder appends.
            assert batch is not None
            padding = _filled((batch, 1), PADDING_POINT, self.device)
            parts.append((padding, torch.full((batch, 1), float(LABEL_PAD), device=self.device)))
        if checks:
            # On a GPU, boxes alone are not checked, so that nothing waits (the decoder is queued behind
            # the encoder); labels are, and the rest with them.
            _enforce(checks, read_back_gpu=point_labels is not None and point_labels.device.type != "cpu")
        coords = torch.cat([_to_device(c, self.device) for c, _ in parts], dim=1)
        labels = torch.cat([_to_device(lab, self.device) for _, lab in parts], dim=1)
        return coords, labels

    def _box_part(
        self, boxes: torch.Tensor, batch: int | None, *, checks: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx4 boxes as two corner points each (labels 2 and 3), adding the checks of their values."""
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be Bx4 (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
        if batch is not None and boxes.shape[0] != batch:
            raise ValueError(f"boxes must have as many rows as point_coords ({batch}), got {boxes.shape[0]}")
        corners = boxes.float().reshape(boxes.shape[0], 2, 2)
        if checks is not None:
            checks["boxes must be finite (in float32)"] = torch.isfinite(corners).all()
            checks["boxes must have x2 >= x1 and y2 >= y1 (x1, y1, x2, y2)"] = (
                corners[:, 1] >= corners[:, 0]
            ).all()  # (NaN compares false: a non-finite box fails here too, after the line above)
        labels = _filled((boxes.shape[0],), (LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT), self.device)
        return corners, labels

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array as a float32 tensor on the model's device (see :func:`_to_device`)."""
        return _to_device(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), self.device)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image(image) before predicting")


def _point_part(
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    *,
    alone: bool,
    checks: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BxNx2 points and BxN labels in float32, adding the checks of their values (``alone``: no box, so
    every row needs a real point)."""
    if point_coords is None or point_labels is None:
        raise ValueError("point_coords and point_labels must be given together")
    if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be BxNx2, got shape {tuple(point_coords.shape)}")
    if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
        raise ValueError(
            f"point_labels must be BxN = {tuple(point_coords.shape[:2])} to match point_coords, "
            f"got shape {tuple(point_labels.shape)}"
        )
    coords = point_coords.float()
    if checks is not None:
        real = (point_labels == 0) | (point_labels == 1)
        filler = (point_labels == LABEL_ABSENT) | (point_labels == LABEL_PAD)
        checks[
            f"point_labels must be 1 (foreground), 0 (background), or {LABEL_ABSENT} / {LABEL_PAD} to "
            "batch point sets of different lengths"
        ] = (real | filler).all()
        if alone:
            checks["every point set needs at least one point labelled 0 or 1, not only padding"] = real.any(
                dim=1
            ).all()
        checks["point_coords must be finite (in float32)"] = torch.isfinite(coords).all()
    return coords, point_labels.float()


def _enforce(checks: dict[str, torch.Tensor], *, read_back_gpu: bool) -> None:
    """Raise ValueError with the message of the first check that fails. The host's checks cost no
    wait; a GPU's are read only with ``read_back_gpu``, all in one read-back."""
    on_host = [message for message, held in checks.items() if held.device.type == "cpu"]
    on_gpu = [message for message in checks if message not in on_host] if read_back_gpu else []
    for group in (on_host, on_gpu):
        if not group:
            continue
        held = torch.stack([checks[message] for message in group]).cpu().tolist()
        for message, ok in zip(group, held, strict=True):
            if not ok:
                raise ValueError(message)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. A host tensor goes to a CUDA device without waiting for the GPU: it is
    copied into fresh page-locked memory first, which the queued copy reads later (the caller may then
    reuse its own buffer). Other copies (to or from other devices) are plain, blocking ones."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if torch.cuda.is_available():  # (not for the fake CUDA tensors of the tests)
            tensor = torch.empty_like(tensor, pin_memory=True).copy_(tensor)
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def _filled(shape: tuple[int, ...], values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A ``shape + (len(values),)`` float32 tensor whose last dimension holds ``values``, made on
    ``device`` by fill kernels (``torch.tensor(values, device=...)`` would be a blocking copy)."""
    out = torch.empty(*shape, len(values), device=device)
    for index, value in enumerate(values):
        out[..., index] = value
    return out


def _finite_in_float32(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and (np.abs(values) <= np.finfo(np.float32).max).all())


def _check_points(
    point_coords: np.ndarray | None, point_labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one point prompt: Nx2 coordinates and N labels in {0, 1}."""
    if point_coords is None or point_labels is None:
        raise ValueError("point_coords and point_labels must be given together")
    coords = np.asarray(point_coords, dtype=np.float64)
    labels = np.asarray(point_labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ValueError(
            f"point_coords must be an Nx2 array of (X, Y) pixels, N >= 1, got shape {coords.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(f"point_labels must be a length-N array, got shape {labels.shape}")
    if labels.shape[0] != coords.shape[0]:
        raise ValueError(
            f"point_labels has {labels.shape[0]} entries but point_coords has {coords.shape[0]} points"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {np.unique(labels)}")
    if not _finite_in_float32(coords):
        raise ValueError("point_coords must be finite (and within float32's range: they are decoded in it)")
    return coords, labels.astype(np.float32)


def _check_box(box: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Validate one box ``(x1, y1, x2, y2)`` against the original image (H, W)."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape == (1, 4):
        box = box[0]
    if box.shape != (4,):
        raise ValueError(f"box must be a length-4 array (x1, y1, x2, y2), got shape {box.shape}")
    if not _finite_in_float32(box):
        raise ValueError(
            f"box must be finite (and within float32's range: it is decoded in it), got {box.tolist()}"
        )
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box must have x2 >= x1 and y2 >= y1 (x1, y1, x2, y2), got {box.tolist()}")
    height, width = original_size
    if x2 < 0 or y2 < 0 or x1 >= width or y1 >= height:
        raise ValueError(f"box {box.tolist()} lies entirely outside the {width}x{height} (WxH) image")
    return box
