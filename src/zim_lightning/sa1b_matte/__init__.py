"""The SA1B-Matte builder: SA-1B segmentation masks -> alpha mattes (ZIM paper, Sec. 3.1, "SA1B-Matte").

ZIM trains on SA1B-Matte, SA-1B whose masks the label converter (Sec. 3.1) has turned into alpha mattes,
one converter prediction per mask. ``zim-lightning build-sa1b-matte`` writes it:

    zim-lightning build-sa1b-matte --sa1b data/sa1b --checkpoint converter.ckpt --out data/sa1b_matte

Input: SA-1B shards (``sa_NNNNNN.tar``, gzip or plain) given as a directory, a brace pattern
(``sa_{000000..000009}.tar``) or a list. Each input shard gives one output shard of the same name in
OUT, a plain (uncompressed) tar in the SA1B-Matte format (docs/architecture.md, "File formats"):

    sa_<id>.jpg                   the original JPEG bytes, unchanged
    sa_<id>.json                  the original annotation json, where every converted annotation gains
                                  "matte": {"member": "matte_<ann_id>.png", "box": [x, y, w, h]}
    sa_<id>.matte_<ann_id>.png    8-bit grayscale alpha (0..255) of the w x h region at (x, y) of the
                                  image, (X, Y) pixels; the matte is zero outside that box

Members come in input order, per image jpg, json, then the mattes in annotation order; every member has
mtime 0, uid/gid 0, empty owner names and mode 0644 (GNU tar format), so a shard's bytes depend only on
its input, the converter and the options. Annotations that could not be converted (malformed RLE,
empty mask, unusable id) stay in the json without a ``matte`` entry. Images whose JPEG or json is
corrupt are left out.

Per mask (``--mode``):

- ``crop`` (default): a square around the mask's box, grown by ``--context`` of the box's longer side
  on every side (at least ``--min-crop`` pixels, shifted to stay inside the image where it fits), is
  resized to the converter's ``--crop-size``. Small masks get the converter's full resolution.
- ``whole``: the image (longest side, zero padding bottom-right, as SAM) is resized once to
  ``--crop-size`` and every mask of the image is predicted in that frame.

The matte box is the mask's box grown by ``--margin`` of its longer side (at least 2 px) and clipped to
the image. With ``--clamp`` (default) the matte is also zeroed farther than that margin from the mask
(a dilated band): the converter refines boundaries, and alpha it puts far from the mask is spurious
(docs/benchmarks.md has the measurement). Solid objects are not post-processed: that is the converter's
job (STL).

Crash safety and resuming: a shard is written to ``OUT/sa_NNNNNN.tar.partial``; once complete its
manifest ``OUT/manifest/sa_NNNNNN.json`` is written (temporary file + ``os.replace``) and then the shard
is renamed to ``OUT/sa_NNNNNN.tar``. A shard exists under its final name only when complete; a rerun
skips it (its bytes are untouched) and rebuilds the others, removing their stale temporary files.
The manifest records the input and output shard, samples, images, annotations and mattes written and the
skips per kind (:data:`zim_lightning.data.skips.SKIP_REASONS`).

Distribution: the job runs in Lightning's predict loop
(:class:`~zim_lightning.lit.build_module.MatteBuildModule`), bf16-mixed on GPU; with several devices or
nodes (DDP; torchrun and SLURM are picked up by Lightning) the ranks share the unfinished shards first
come, first served: every DataLoader worker of every rank claims the next unclaimed shard of the sorted
list (:class:`~zim_lightning.sa1b_matte.resume.ShardClaims`, a file created with ``O_EXCL`` in
``OUT/claims/<run>/``, so OUT must be on a file system every rank sees, e.g. NFS or Lustre), reads,
decodes and crops it whole, and its rank writes the output shard; predictions never travel through the
trainer. A rank whose shards go fast, or whose share was finished by an earlier run, takes more: the
ranks end within about one shard's time of each other. Batches never span two shards, so a shard's
bytes do not depend on which rank or worker built it, nor on what it built before (checked by the
tests: 2 CPU ranks give the bytes of 1). Claims belong to one run; the next run ignores and removes
them. A second build started into an OUT that a running build holds
(:class:`~zim_lightning.output_lock.OutputLock`) is refused. Bytes repeat for the same weights,
options, software and hardware; another device or kernel may move a few alpha values by a level.

    torchrun --nnodes 2 --nproc-per-node 8 -m zim_lightning.sa1b_matte --sa1b ... --out ... \
        --checkpoint converter.ckpt --devices 8 --num-nodes 2
    srun --nodes 2 --ntasks-per-node 8 zim-lightning build-sa1b-matte ... --devices 8 --num-nodes 2

The package, in the order a build runs:

- :mod:`~zim_lightning.sa1b_matte.cli`: the command line (``main``);
- :mod:`~zim_lightning.sa1b_matte.job`: ``build``: the datamodule of the unfinished shards, the Trainer,
  the summary of OUT;
- :mod:`~zim_lightning.sa1b_matte.resume`: input shards, output names, finished and stale files, the
  ranks' claims and the output lock;
- :mod:`~zim_lightning.sa1b_matte.reading`: the DataLoader workers' side: claimed shards read, decoded
  and cropped;
- :mod:`~zim_lightning.sa1b_matte.geometry`: the crop options (``CropConfig``) and the geometry of crops,
  resampling and matte boxes;
- :mod:`~zim_lightning.sa1b_matte.writing`: the main process's side: mattes projected, encoded and
  written with their manifests.
"""

from zim_lightning.output_lock import OutputLock
from zim_lightning.sa1b_matte.cli import (
    add_converter_checkpoint_argument,
    add_crop_arguments,
    crop_config,
    launched_layout,
    main,
)
from zim_lightning.sa1b_matte.geometry import (
    MODES,
    CropConfig,
    converter_mask,
    crop_square,
    mask_band,
    mask_box,
    matte_box,
    project_matte,
    resample_square,
    rle_box,
)
from zim_lightning.sa1b_matte.job import build, summarize
from zim_lightning.sa1b_matte.reading import ShardDataset
from zim_lightning.sa1b_matte.resume import CLAIMS_DIR, MANIFEST_DIR, ShardClaims, resolve_shards
from zim_lightning.sa1b_matte.writing import PNG_PARAMS, WRITER_THREADS

__all__ = [
    "CLAIMS_DIR",
    "MANIFEST_DIR",
    "MODES",
    "PNG_PARAMS",
    "WRITER_THREADS",
    "CropConfig",
    "OutputLock",
    "ShardClaims",
    "ShardDataset",
    "add_converter_checkpoint_argument",
    "add_crop_arguments",
    "build",
    "converter_mask",
    "crop_config",
    "crop_square",
    "launched_layout",
    "main",
    "mask_band",
    "mask_box",
    "matte_box",
    "project_matte",
    "resample_square",
    "resolve_shards",
    "rle_box",
    "summarize",
]
