"""Images held by the matting server: decoded once, encoded once, decoded per prompt.

ZIM splits like SAM (paper, Sec. 3): a heavy image encoder runs once per image, a light prompt decoder
runs once per prompt. The store keeps one :class:`~zim_lightning.predictor.ZimPredictor` per uploaded
image (the predictor holds that image's embedding), keyed by a hash of the uploaded bytes, so uploading
the same picture twice reuses its embedding and every click costs only a decoder call. The oldest images
are dropped when ``max_images`` are held. One lock serialises every use of the network: it is shared by
all predictors and its modules are not safe to run from several threads at once.

Everything a user sends is checked here and rejected with :class:`RequestError` (an HTTP status and a
message naming the input and what was expected); the HTTP layer turns it into a JSON error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zim_lightning.images import alpha_to_uint8, pil_to_rgb

logger = logging.getLogger(__name__)

#: Pillow formats the server accepts from uploads (the ones browsers show).
# MPO: the JPEG of many phones and cameras (a JPEG with a multi-picture block; its first frame is read).
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Prompt:
    """One validated prompt set, in original image pixels.

    Attributes:
        point_coords: Nx2 float32 (X, Y) pixels, or None.
        point_labels: N float32, 1 positive and 0 negative, or None.
        box: 4 float32 (x1, y1, x2, y2) pixels, or None.
    """

    point_coords: np.ndarray | None
    point_labels: np.ndarray | None
    box: np.ndarray | None

    def key(self) -> tuple:
        """A hashable identity, to reuse the last result for a repeated prompt (downloads)."""
        coords = None if self.point_coords is None else self.point_coords.tobytes()
        labels = None if self.point_labels is None else self.point_labels.tobytes()
        box = None if self.box is None else self.box.tobytes()
        return coords, labels, box


@dataclass
class Prediction:
    """A matte for one prompt: alpha HxW uint8 (0..255, what is served) at the image's size, its mean
    in [0, 1] before rounding, and its scores. Kept as 8 bits: the cache holds one per image."""

    alpha: np.ndarray
    alpha_mean: float
    iou: float
    decode_ms: float


@dataclass
class ImageEntry:
    """An uploaded image and the predictor that holds its embedding."""

    image_id: str
    name: str
    image: np.ndarray  # HxWx3 uint8 RGB
    predictor: Any  # ZimPredictor with this image set
    encode_ms: float
    jpeg: bytes = b""
    last: tuple[tuple, Prediction] | None = field(default=None, repr=False)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def describe(self) -> dict[str, Any]:
        """The JSON the API answers an upload with."""
        return {
            "image_id": self.image_id,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "encode_ms": round(self.encode_ms, 1),
        }


def decode_image(data: bytes, *, max_side: int, source: str = "upload") -> np.ndarray:
    """Decode uploaded bytes into an RGB image, refusing what is not a picture or is too large.

    The header is read first, so an image whose sides exceed ``max_side`` is refused before its pixels
    are decoded (a small file can declare a huge picture).

    Args:
        data: the file's bytes.
        max_side: the largest width or height accepted, in pixels.
        source: what to call the input in error messages.

    Returns:
        HxWx3 uint8 RGB, EXIF orientation applied.

    Raises:
        RequestError: 400 for empty data, data that is not an image of an accepted format, or an image
            larger than ``max_side``.
    """
    if not data:
        raise RequestError(400, f"{source}: empty body; expected the bytes of an image file")
    try:
        picture = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # a header declaring far more pixels than max_side allows
        raise RequestError(400, f"{source}: image too large to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(
            400, f"{source}: not an image file; expected one of {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    if picture.format not in ACCEPTED_FORMATS:
        raise RequestError(
            400,
            f"{source}: image format {picture.format} not accepted; expected {', '.join(ACCEPTED_FORMATS)}",
        )
    width, height = picture.size
    if width < 1 or height < 1 or max(width, height) > max_side:
        raise RequestError(
            400, f"{source}: image is {width}x{height} px; expected each side between 1 and {max_side} px"
        )
    try:
        return pil_to_rgb(picture)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(400, f"{source}: the image could not be decoded ({error})") from None


def _number(value: Any, what: str) -> float:
    # bool is an int in Python; a prompt coordinate given as true/false is a client bug, not a number.
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer of hundreds of digits
            number = math.inf
    if not math.isfinite(number):
        raise RequestError(400, f"{what}: expected a finite number, got {value!r:.40}")
    return number


def parse_prompt(payload: Any, *, width: int, height: int, max_points: int) -> Prompt:
    """Validate a prompt request against the image it targets.

    Args:
        payload: the decoded JSON body, ``{"points": [[x, y, label], ...], "box": [x1, y1, x2, y2]}``;
            either key may be missing or null, not both. (X, Y) are original image pixels, labels 1
            (positive) or 0 (negative).
        width: image width in pixels; X must lie in [0, width].
        height: image height in pixels; Y must lie in [0, height].
        max_points: the most points accepted.

    Returns:
        The prompt as arrays.

    Raises:
        RequestError: 400 naming the first field that is malformed or out of the image.
    """
    if not isinstance(payload, dict):
        raise RequestError(400, f"prompt: expected a JSON object, got {type(payload).__name__}")
    points = payload.get("points") or []
    box = payload.get("box")
    if not isinstance(points, list):
        raise RequestError(400, "points: expected a list of [x, y, label]")
    if len(points) > max_points:
        raise RequestError(400, f"points: {len(points)} given; at most {max_points} accepted")
    if not points and box is None:
        raise RequestError(400, "prompt: expected at least one point or a box")
    coords, labels = [], []
    for index, point in enumerate(points):
        what = f"points[{index}]"
        if not isinstance(point, list) or len(point) != 3:
            raise RequestError(400, f"{what}: expected [x, y, label], got {point!r}")
        x, y = _number(point[0], f"{what}.x"), _number(point[1], f"{what}.y")
        label = _number(point[2], f"{what}.label")
        if label not in (0.0, 1.0):
            raise RequestError(400, f"{what}.label: expected 1 (positive) or 0 (negative), got {point[2]!r}")
        if not (0.0 <= x <= width and 0.0 <= y <= height):
            raise RequestError(400, f"{what}: ({x}, {y}) lies outside the {width}x{height} image")
        coords.append((x, y))
        labels.append(label)
    box_array = None
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise RequestError(400, f"box: expected [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (_number(v, f"box[{i}]") for i, v in enumerate(box))
        if not (0.0 <= x1 < x2 <= width and 0.0 <= y1 < y2 <= height):
            raise RequestError(
                400, f"box: {box} must satisfy 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}"
            )
        box_array = np.array([x1, y1, x2, y2], dtype=np.float32)
    return Prompt(
        point_coords=np.array(coords, dtype=np.float32) if coords else None,
        point_labels=np.array(labels, dtype=np.float32) if labels else None,
        box=box_array,
    )


class ImageStore:
    """Encoded images by id, with one lock around the network.

    Args:
        predictor_factory: builds a fresh predictor over the shared network (``ZimPredictor(model)``).
        max_images: how many encoded images to keep; the least recently used one is dropped first.
        max_side: the largest image side accepted, in pixels.
        max_points: the most points accepted in one prompt.
        multimask: a lone point decodes all four mask tokens and keeps the one the IoU head ranks first,
            as SAM's demos do (a lone point is ambiguous: a shirt or the person wearing it). Only for a
            model trained that way (``--model.init_args.multimask=true --model.init_args.iou_weight=1``):
            the paper's loss trains the first token alone, and leaves the IoU head and the other tokens
            untrained, so by default every prompt decodes the first token, as ``matte`` does.
    """

    def __init__(
        self,
        *,
        predictor_factory: Callable[[], Any],
        max_images: int = 8,
        max_side: int = 8192,
        max_points: int = 64,
        multimask: bool = False,
    ) -> None:
        if max_images < 1:
            raise ValueError(f"max_images: expected at least 1, got {max_images}")
        self.predictor_factory = predictor_factory
        self.max_images = max_images
        self.max_side = max_side
        self.max_points = max_points
        self.multimask = multimask
        self.model_lock = threading.Lock()
        # Decoding runs outside the model lock; two at a time bound the memory many uploads can take.
        self._decode_slots = threading.BoundedSemaphore(2)
        self._entries: OrderedDict[str, ImageEntry] = OrderedDict()
        self._entries_lock = threading.Lock()

    def __len__(self) -> int:
        with self._entries_lock:
            return len(self._entries)

    def add(self, data: bytes, *, name: str = "upload") -> ImageEntry:
        """Decode and encode an uploaded image (reusing the embedding of identical bytes).

        Raises:
            RequestError: 400 if the bytes are not an accepted image or it is too large.
        """
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with self._entries_lock:
            if image_id in self._entries:
                self._entries.move_to_end(image_id)
                return self._entries[image_id]
        with self._decode_slots:
            image = decode_image(data, max_side=self.max_side, source=name)
        return self.add_array(image, name=name, image_id=image_id)

    def add_array(self, image: np.ndarray, *, name: str, image_id: str | None = None) -> ImageEntry:
        """Encode an HxWx3 uint8 RGB image already in memory (the bundled examples)."""
        if image_id is None:
            image_id = hashlib.sha256(image.tobytes()).hexdigest()[:16]
        with self._entries_lock:
            if image_id in self._entries:
                self._entries.move_to_end(image_id)
                return self._entries[image_id]
        predictor = self.predictor_factory()
        with self.model_lock:
            start = time.perf_counter()
            try:
                predictor.set_image(image)
            except ValueError as error:  # an image the network cannot take (e.g. 1x3000 pixels)
                raise RequestError(400, f"{name}: {error}") from error
            if predictor.device.type == "cuda":  # set_image only queues the encoder on a GPU
                torch.cuda.synchronize(predictor.device)
            encode_ms = (time.perf_counter() - start) * 1e3
        logger.info("encoded %s (%dx%d) in %.0f ms", name, image.shape[1], image.shape[0], encode_ms)
        preview = io.BytesIO()
        Image.fromarray(image).save(preview, format="JPEG", quality=90)
        entry = ImageEntry(
            image_id=image_id,
            name=name,
            image=image,
            predictor=predictor,
            encode_ms=encode_ms,
            jpeg=preview.getvalue(),
        )
        with self._entries_lock:
            self._entries[image_id] = entry
            while len(self._entries) > self.max_images:
                dropped, _ = self._entries.popitem(last=False)
                logger.info("dropped image %s from the cache", dropped)
        return entry

    def get(self, image_id: str) -> ImageEntry:
        """The image with this id.

        Raises:
            RequestError: 404 if no such image is held (never uploaded, or dropped from the cache).
        """
        with self._entries_lock:
            entry = self._entries.get(image_id)
            if entry is None:
                raise RequestError(404, f"image id {image_id!r}: unknown or expired; upload the image again")
            self._entries.move_to_end(image_id)
            return entry

    def parse(self, entry: ImageEntry, payload: Any) -> Prompt:
        """Validate a prompt for this image (see :func:`parse_prompt`)."""
        return parse_prompt(payload, width=entry.width, height=entry.height, max_points=self.max_points)

    def predict(self, entry: ImageEntry, prompt: Prompt) -> Prediction:
        """Decode a matte for a prompt, reusing the image's embedding.

        The first mask token, or with ``multimask`` for a lone point the best of four by the IoU head.
        """
        key = prompt.key()
        last = entry.last
        if last is not None and last[0] == key:
            return last[1]
        single_point = (
            self.multimask
            and prompt.box is None
            and prompt.point_coords is not None
            and len(prompt.point_coords) == 1
        )
        with self.model_lock, torch.inference_mode():
            start = time.perf_counter()
            masks, iou, _ = entry.predictor.predict(
                point_coords=prompt.point_coords,
                point_labels=prompt.point_labels,
                box=prompt.box,
                multimask_output=single_point,
            )
            decode_ms = (time.perf_counter() - start) * 1e3
        masks = np.asarray(masks, dtype=np.float32)
        iou = np.asarray(iou, dtype=np.float32).reshape(-1)
        best = int(np.argmax(iou))
        prediction = Prediction(
            alpha=alpha_to_uint8(masks[best]),
            alpha_mean=float(np.clip(masks[best], 0.0, 1.0).mean()),
            iou=float(iou[best]),
            decode_ms=decode_ms,
        )
        entry.last = (key, prediction)
        return prediction
