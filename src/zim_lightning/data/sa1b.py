"""SA-1B and SA1B-Matte tar reading with lazy RLE decoding (ZIM paper, Sec. 3.1 and 3.2).

SA-1B ships as gzip-compressed ``sa_NNNNNN.tar`` files holding ``sa_<id>.jpg`` and ``sa_<id>.json`` (about
100 COCO compressed-RLE masks per image). These helpers read the tars as they are, one sample at a time,
and decode only the annotations a consumer picks: decoding all ~100 masks of an image to train on one
would dominate the loading time. SA1B-Matte shards (docs/architecture.md, "File formats") add per
annotation a ``matte`` entry and an ``sa_<id>.matte_<ann_id>.png`` member holding the alpha of a box.

Every decoder raises :class:`CorruptSample` naming the sample key; callers skip and count those samples
(see :mod:`zim_lightning.data.skips`), so bad data never stops a run.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from zim_lightning.data.decode import (
    GRAY_16_BIT_MODES,
    check_decoded_size,
    decode_gray,
    decode_image,
    scale_16_bit,
)
from zim_lightning.data.skips import CorruptSample, SkipCounter, SkipSink

__all__ = [
    "GRAY_16_BIT_MODES",
    "CorruptSample",
    "check_decoded_size",
    "decode_gray",
    "decode_image",
    "decode_mask",
    "decode_matte",
    "iter_sa1b",
    "iter_tar",
    "parse_annotations",
    "rle_counts",
    "sa1b_record",
    "scale_16_bit",
    "split_member_name",
    "tar_samples",
]

log = logging.getLogger(__name__)

#: Exceptions that mean the tar stream itself is damaged (truncated download, bad gzip).
_TAR_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class _EndCheckingTarInfo(tarfile.TarInfo):
    """TarInfo that flags a stream ending without the tar end-of-archive marker.

    In stream mode, :mod:`tarfile` ends iteration silently when a header is missing or cut short past the
    first member, so a truncated download would look like a short but healthy shard. A complete tar ends
    with zero blocks instead; this records which of the two ended the stream.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError):
            # (A zero block, EOFHeaderError, is the normal end; an invalid header, e.g. a bad checksum,
            # ends a stream as silently as a missing one.)
            tarfile_.zim_truncated = True
            raise


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, suffix) at the first dot of the base name (webdataset rule).

    ``"sa_1.matte_7.png"`` -> ``("sa_1", "matte_7.png")``. Names without a dot give an empty suffix.
    """
    head, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix.lower()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_annotations(data: bytes, *, key: str) -> dict:
    """Parse and validate an SA-1B (or SA1B-Matte) annotation json.

    Checks the image-level structure docs/architecture.md ("File formats") describes: ``image`` with
    positive integer ``width`` and ``height``, and ``annotations``, a list of objects. Each annotation's
    own fields (its ``id``, and a ``segmentation`` of the image's size with string ``counts``) are checked
    where it is used (:func:`decode_mask`, :func:`decode_matte`), so that one malformed annotation costs
    only itself, not its image's other masks.

    Args:
        data: the json bytes.
        key: the sample key, named in errors.

    Returns:
        The parsed json.

    Raises:
        CorruptSample: on invalid json or a structure that does not match SA-1B's.
    """
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # (nested past the parser's depth)
        raise CorruptSample(f"invalid json ({error})", key=key, reason="bad_json") from error

    def fail(message: str) -> CorruptSample:
        return CorruptSample(f"malformed SA-1B json: {message}", key=key, reason="bad_json")

    if not isinstance(record, dict):
        raise fail("expected an object at top level")
    image = record.get("image")
    if not isinstance(image, dict):
        raise fail("missing 'image' object")
    width, height = image.get("width"), image.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        raise fail(f"'image' needs positive integer width and height, got {width!r} x {height!r}")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        # Pillow would refuse to decode such a jpg; its mattes, decoded first at this size, would not fit
        raise fail(f"'image' of {width} x {height} pixels is larger than any image Pillow decodes")
    annotations = record.get("annotations")
    if not isinstance(annotations, list):
        raise fail("missing 'annotations' list")
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise fail(f"annotation {index} is not an object")
    return record


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string.

    The format stores each run as a little-endian base-32 number, 5 bits per character offset by 48,
    0x20 marking continuation and 0x10 the sign of the last character; from the fourth run on, each
    value is a difference to the run two places back. Decoding it here lets us validate the RLE before
    pycocotools decodes it, since pycocotools does not check that runs add up to the image size.

    Returns:
        The run lengths, int64, alternating background and foreground, background first.

    Raises:
        ValueError: if the string is not valid compressed RLE.
    """
    raw = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, dtype=np.uint8)
    if raw.size == 0:
        raise ValueError("empty RLE counts")
    if raw.min() < 48 or raw.max() > 48 + 63:
        raise ValueError("RLE counts hold characters outside the compressed alphabet")
    values = raw.astype(np.int64) - 48
    ends = np.flatnonzero((values & 0x20) == 0)
    if ends.size == 0 or ends[-1] != values.size - 1:
        raise ValueError("RLE counts end inside a number")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:
        raise ValueError("RLE run longer than 60 bits")
    position = np.arange(values.size) - np.repeat(starts, lengths)
    numbers = np.add.reduceat((values & 0x1F) << (5 * position), starts)
    negative = (values[ends] & 0x10) != 0
    numbers[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = numbers.copy()
    # Runs 3, 5, 7, ... are stored as differences to runs 1, 3, 5, ...; runs 4, 6, ... to runs 2, 4, ...
    runs[1::2] = np.cumsum(numbers[1::2])
    if runs.size > 2:
        runs[2::2] = np.cumsum(numbers[2::2])
    if (runs < 0).any():
        raise ValueError("RLE holds a negative run length")
    return runs


def decode_mask(annotation: dict, *, key: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one SA-1B annotation's COCO compressed RLE.

    Args:
        annotation: one entry of the json's ``annotations``.
        key: the sample key, named in errors.
        image_size: (H, W) the mask must have; None accepts the annotation's own ``size``.

    Returns:
        HxW uint8 in {0, 1}.

    Raises:
        CorruptSample: on malformed RLE, a size mismatch or an empty mask.
    """
    name = f"{key} annotation {annotation.get('id', '?')}"
    segmentation = annotation.get("segmentation")
    if not isinstance(segmentation, dict):
        raise CorruptSample("annotation has no 'segmentation'", key=name, reason="bad_rle")
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
        raise CorruptSample(f"RLE size {size!r} is not [height, width]", key=name, reason="bad_rle")
    if image_size is not None and tuple(size) != tuple(image_size):
        raise CorruptSample(
            f"RLE size {size} does not match the image {list(image_size)}", key=name, reason="bad_rle"
        )
    if not isinstance(counts, str | bytes):
        raise CorruptSample("RLE counts is not a compressed string", key=name, reason="bad_rle")
    try:
        runs = rle_counts(counts)
    except ValueError as error:
        raise CorruptSample(f"malformed RLE ({error})", key=name, reason="bad_rle") from error
    height, width = size
    if int(runs.sum()) != height * width:
        raise CorruptSample(
            f"RLE runs cover {int(runs.sum())} pixels, expected {height}x{width}", key=name, reason="bad_rle"
        )
    if int(runs[1::2].sum()) == 0:
        raise CorruptSample("empty mask", key=name, reason="empty_mask")
    counts_bytes = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [height, width], "counts": counts_bytes})


def decode_matte(sample: dict, annotation: dict, *, key: str, image_size: tuple[int, int]) -> np.ndarray:
    """Decode one SA1B-Matte annotation's matte, pasted into the full image frame.

    Args:
        sample: the webdataset-style sample holding the ``matte_<ann_id>.png`` member.
        annotation: the annotation with its ``matte`` entry ``{"member": ..., "box": [x, y, w, h]}``.
        key: the sample key, named in errors.
        image_size: (H, W) of the image.

    Returns:
        HxW uint8 alpha in [0, 255], zero outside the box.

    Raises:
        CorruptSample: if the member is missing, undecodable, of the wrong size or empty.
    """
    name = f"{key} annotation {annotation.get('id', '?')}"
    matte = annotation.get("matte")
    if not isinstance(matte, dict) or not isinstance(matte.get("member"), str):
        raise CorruptSample("annotation has no 'matte' member", key=name, reason="bad_json")
    data = sample.get(matte["member"].lower())
    if data is None:
        raise CorruptSample(f"missing tar member {key}.{matte['member']}", key=name, reason="missing_member")
    box = matte.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)):
        raise CorruptSample(f"matte box {box!r} is not [x, y, w, h] integers", key=name, reason="bad_json")
    x, y, w, h = box
    height, width = image_size
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise CorruptSample(
            f"matte box {box} is outside the {width}x{height} image", key=name, reason="bad_json"
        )
    region = decode_gray(data, key=name)
    if region.shape != (h, w):
        raise CorruptSample(
            f"matte is {region.shape[::-1]}, its box says {w}x{h}", key=name, reason="bad_json"
        )
    if not region.any():
        raise CorruptSample("empty matte", key=name, reason="empty_mask")
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[y : y + h, x : x + w] = region
    return alpha


def iter_tar(url: str, *, counter: SkipSink | None = None) -> Iterator[dict]:
    """Yield the samples of one tar (plain or gzip) in file order, webdataset style.

    Each sample is ``{"__key__": key, "__url__": url, suffix: bytes, ...}``, grouping consecutive members
    that share a key. A damaged stream (truncated tar or gzip) ends the shard and is counted once: the
    samples before the damage are yielded unchanged, a sample whose member data is cut is dropped, and a
    sample whose members were all read before the damage is yielded (if the damage hid one of its
    members, decoding reports it as missing).

    Args:
        url: a local path or a ``pipe:`` url (anything :func:`webdataset.gopen` opens).
        counter: where truncations and unreadable shards are counted; None only logs.
    """
    current: dict | None = None
    damage: str | None = None
    read_to_end = False
    try:
        stream = wds.gopen(url, "rb")
    except OSError as error:
        _report(counter, "truncated_tar", url, f"cannot open shard ({error})")
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, suffix = split_member_name(member.name)
                if key.startswith("__") or not suffix:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                handle = archive.extractfile(member)
                try:
                    current[suffix] = handle.read() if handle is not None else b""
                except _TAR_STREAM_ERRORS:
                    damage = f", dropped {current['__key__']} (its {suffix} member is cut)"
                    current = None
                    raise
            if getattr(archive, "zim_truncated", False):
                raise tarfile.ReadError("stream ends without the end-of-archive marker")
        read_to_end = True
    except _TAR_STREAM_ERRORS as error:
        _report(counter, "truncated_tar", url, f"damaged tar stream ({error}){damage or ''}")
        damage = damage or "reported"
    finally:
        try:
            stream.close()
        except OSError as error:
            # A ``pipe:`` command that exits with an error status: a failed download when the stream was
            # read to its end; when the reader stopped early (an epoch's end), the command only lost its
            # reader (curl's write error), which is no damage.
            if read_to_end and damage is None:
                _report(counter, "truncated_tar", url, f"shard stream failed on close ({error})")
    if current is not None:
        yield current


def tar_samples(
    src: Iterable[dict], *, counter: SkipCounter | None = None, max_empty_shards: int | None = None
) -> Iterator[dict]:
    """Webdataset pipeline stage: ``{"url": ...}`` shard dicts in, samples out (see :func:`iter_tar`).

    Args:
        src: shard dicts.
        counter: where damaged and unreadable shards are counted.
        max_empty_shards: raise once this many shards in a row gave no sample (an endless resampled
            stream over shards that are all unreadable would otherwise never yield and never end);
            None: no limit.

    Raises:
        RuntimeError: ``max_empty_shards`` shards in a row gave no sample.
    """
    empty = 0
    for shard in src:
        got = False
        for sample in iter_tar(shard["url"], counter=counter):
            got = True
            yield sample
        empty = 0 if got else empty + 1
        if max_empty_shards is not None and empty >= max_empty_shards:
            skipped = f"; skips so far: {counter.counts()}" if counter is not None else ""
            raise RuntimeError(
                f"{empty} shards in a row gave no sample (the last: {shard['url']}): the shards are "
                f"unreadable or empty{skipped}"
            )


def sa1b_record(sample: dict, *, max_side: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode an SA-1B sample's image and annotation json (no masks yet).

    Args:
        sample: a sample from :func:`iter_tar` with ``jpg`` and ``json`` members.
        max_side: passed to :func:`decode_image` (reduced JPEG decoding).

    Returns:
        (image HxWx3 uint8 RGB, parsed json). With ``max_side`` the image may be smaller than the json's
        width x height by a power of two; masks keep the json's size.

    Raises:
        CorruptSample: on a missing member, a corrupt image or malformed json.
    """
    key = sample["__key__"]
    for member in ("jpg", "json"):
        if member not in sample:
            raise CorruptSample(f"missing tar member {key}.{member}", key=key, reason="missing_member")
    record = parse_annotations(sample["json"], key=key)
    image = decode_image(sample["jpg"], key=key, max_side=max_side)
    return image, record


def _report(counter: SkipSink | None, reason: str, key: str, error: str) -> None:
    if counter is None:
        log.warning("skipped %s (%s): %s", key, reason, error)
    else:
        counter.skip(reason, key, error)


def iter_sa1b(url: str, *, counter: SkipSink | None = None, max_side: int | None = None) -> Iterator[dict]:
    """Yield the decoded samples of one SA-1B tar in file order, skipping (and counting) corrupt ones.

    Masks stay RLE: decode the ones you need with :func:`decode_mask`. (The SA1B-Matte builder reads
    shards with :func:`iter_tar` and :func:`sa1b_record` too, batching the masks as it goes.)

    Yields:
        ``{"key": str, "url": str, "image": HxWx3 uint8 RGB, "record": parsed json, "sample": raw
        members}``.
    """
    for sample in iter_tar(url, counter=counter):
        try:
            image, record = sa1b_record(sample, max_side=max_side)
        except CorruptSample as error:
            _report(counter, error.reason, error.key, str(error))
            continue
        yield {"key": sample["__key__"], "url": url, "image": image, "record": record, "sample": sample}
