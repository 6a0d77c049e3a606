"""ZimDataModule: the data of every stage of ZIM (paper, Sec. 3.1 converter, 3.2 ZIM, 4.1 evaluation).

Stages (``stage=``):

- ``"converter"``: matting shards (coarse masks derived from the matte, SGA) mixed with segmentation
  shards (STL), square crops; batches as docs/architecture.md, "Batches", converter stage.
- ``"zim"``: SA1B-Matte shards, or plain matting shards (so ZIM trains on synthetic mattes before
  SA1B-Matte exists; both can be mixed in one shard list), resized and padded to SAM's 1024 frame with a
  box or point prompt; batches as the contract's ZIM stage.
- ``"eval"``: MicroMat-3K / AM-2K / AIM-500 / other matting folders through
  ``data.micromat.build_eval_dataset``, an unpadded rank slice so that every instance is evaluated exactly
  once over all ranks.

Training streams are webdataset pipelines over resampled shards (infinite draws with replacement, seeded
per seed/rank/worker/epoch), split explicitly by rank and by DataLoader worker, with a sample shuffle
buffer, batching in the workers and a fixed number of batches per epoch (``with_epoch``). Validation
and evaluation read each sample exactly once across all ranks and workers, in a fixed order.
Corrupt samples are skipped with one warning and counted in :attr:`ZimDataModule.skips`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zim_lightning.data.augment import CROP_SCALE, mix_stl
from zim_lightning.data.coarsen import COARSEN_OPS
from zim_lightning.data.prompts import PromptSampler
from zim_lightning.data.sa1b import tar_samples
from zim_lightning.data.samples import (
    EXPECTED_KIND,
    ConverterSampleProcessor,
    ZimSampleProcessor,
    collate,
    expect_kind,
    key_rng,
    unpack_batch,
)
from zim_lightning.data.shards import (
    assign_shards,
    distributed_info,
    expand_shards,
    split_by_dataloader_worker,
    split_by_rank,
    worker_info,
)
from zim_lightning.data.skips import CorruptSample, SkipCounter

if TYPE_CHECKING:
    from zim_lightning.data.micromat import EvalDataset

log = logging.getLogger(__name__)

STAGES = ("converter", "zim", "eval")


#: Training stops with an error after this many samples in a row were skipped as corrupt, in one stream or
#: from one shard (the shards are not what the stage reads, e.g. SA-1B shards given to the "zim" stage,
#: which needs SA1B-Matte ones, alone or in a list beside the right ones).
MAX_CONSECUTIVE_SKIPS = 1000

#: The pipeline stages that draw from :class:`EpochSeeds`, each its own random stream. The numbers key
#: the seeds, so renumbering them would change every run's draws.
RESAMPLE_STAGE, SHUFFLE_STAGE, PROCESS_STAGE, MIX_STL_STAGE = range(4)


class EpochSeeds:
    """The seeds of one training pipeline stage, one independent stream per epoch.

    A stream is keyed by (run seed, rank, DataLoader worker, epoch, stage), so a run is reproducible.
    Each stage object counts the iterations of its pipeline itself. A training loader iterates its
    pipeline once per process (:class:`ContinuingStream`: epochs continue one stream); a pipeline
    iterated again (e.g. ``train_dataset()`` read twice) draws anew. A resumed run starts counting at
    the restored epoch and adds the restored global step to the key, so it neither replays the first
    run's stream nor, after a mid-epoch restart, the interrupted epoch's first batches.

    Args:
        seed: run seed.
        rank: this process's rank.
        first_epoch: the epoch the first iteration belongs to (the trainer's, when resuming).
        resume_step: the global step the run resumed at (0: a fresh run).
        source: which of a rank's shard streams (0: the main one; 1: STL's segmentation shards, which
            would otherwise draw their shards in the very order of the matting shards).
    """

    def __init__(
        self, *, seed: int, rank: int, first_epoch: int = 0, resume_step: int = 0, source: int = 0
    ) -> None:
        self.seed, self.rank, self.resume_step, self.source = seed, rank, resume_step, source
        self.epoch = first_epoch - 1

    def next_epoch(self, stage: int) -> np.random.SeedSequence:
        """Advance to the next epoch and return its seed for pipeline ``stage`` (``*_STAGE``)."""
        self.epoch += 1
        worker, _ = worker_info()
        entropy = [self.seed, self.rank, worker, self.epoch, stage]
        if self.resume_step or self.source:  # keys of the main stream of a fresh run are unchanged
            entropy += [self.resume_step]
        if self.source:
            entropy += [self.source]
        return np.random.SeedSequence(entropy)


class ContinuingStream(torch.utils.data.IterableDataset):
    """A training pipeline iterated once per process for the whole run, however many epochs cut it.

    ``with_epoch`` starts a new DataLoader iteration at every epoch, and each worker (persistent) or the
    main process (no workers) then asks its dataset for a new iterator. A fresh pipeline iterator would
    draw new shards and read them from their first sample, so every epoch would see only the first
    batches of a few shards and most of each shard never. This dataset hands out the same running
    iterator instead: every epoch continues where the last stopped (the batches a worker had prefetched
    when the epoch ended are dropped by the DataLoader).
    """

    def __init__(self, pipeline: Iterable[dict]) -> None:
        super().__init__()
        self.pipeline = pipeline
        self._stream: Iterator[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._stream is None:
            self._stream = iter(self.pipeline)
        return self._stream


class ResampleShards:
    """Pipeline stage: the shards that reach it -> an endless stream of draws with replacement.

    This is webdataset's ``resampled=True`` placed after the explicit rank and worker split, so each
    worker draws from its own disjoint subset of shards (or from all shards when there are fewer shards
    than workers, see :meth:`ZimDataModule.train_dataloader`). Draws are seeded per (seed, rank, worker,
    iteration; see :class:`EpochSeeds`), so a run is reproducible; a training loader iterates it once
    and its epochs continue the draws (:class:`ContinuingStream`).

    Args:
        seeds: this stage's per-epoch seeds.
    """

    def __init__(self, *, seeds: EpochSeeds) -> None:
        self.seeds = seeds

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        urls = [shard["url"] for shard in src]
        rng = np.random.default_rng(self.seeds.next_epoch(RESAMPLE_STAGE))
        if not urls:
            return
        while True:
            yield {"url": urls[int(rng.integers(len(urls)))]}


class ShuffleSamples:
    """Pipeline stage: webdataset's sample shuffle buffer with a per (seed, rank, worker, epoch) seed."""

    def __init__(self, *, bufsize: int, initial: int, seeds: EpochSeeds) -> None:
        self.bufsize, self.initial, self.seeds = bufsize, initial, seeds

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        seed = int(self.seeds.next_epoch(SHUFFLE_STAGE).generate_state(1)[0])
        if self.bufsize <= 1:
            return src
        return wds.shuffle(self.bufsize, initial=min(self.initial, self.bufsize), seed=seed)(src)


class ProcessSamples:
    """Pipeline stage: raw tar samples -> processed samples; corrupt ones are skipped and counted.

    Uses webdataset's handler protocol: the counter's handler warns, counts and continues on
    :class:`~zim_lightning.data.skips.CorruptSample` and re-raises anything else (a bug, not bad data).
    The ZIM processor returns the mattes of an image that failed alone beside the good ones; each is
    counted, and the image's other mattes go on.
    In training, :data:`MAX_CONSECUTIVE_SKIPS` skips in a row raise instead: the endless stream would
    otherwise never produce a batch.

    Args:
        processor: a :class:`~zim_lightning.data.samples.ConverterSampleProcessor` or
            :class:`~zim_lightning.data.samples.ZimSampleProcessor`.
        train: training randomness (worker generator) or deterministic validation (key-seeded).
        seeds: this stage's per-epoch seeds (``seeds.seed`` also keys validation's per-sample seeds).
        counter: where skips are counted.
    """

    def __init__(
        self,
        processor: ConverterSampleProcessor | ZimSampleProcessor,
        *,
        train: bool,
        seeds: EpochSeeds,
        counter: SkipCounter,
    ) -> None:
        self.processor, self.train, self.seeds, self.counter = processor, train, seeds, counter

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = np.random.default_rng(self.seeds.next_epoch(PROCESS_STAGE))
        if self.train:
            # Validation draws no augmentation (its samples are key-seeded); reseeding here would also
            # restart training's augmentation, which shares the processor when loading runs in the main
            # process (num_workers=0), after every validation.
            self.processor.seed(rng)
        handler = self.counter.handler()
        # Skips in a row, per stream and per shard: the STL stream's good samples (a tenth of the
        # converter's) must not hide a matting stream whose every sample is skipped, nor the good shards of
        # a list a shard of the wrong kind (raw SA-1B beside SA1B-Matte, say) whose every sample is.
        in_stream: dict[tuple[str, str] | None, int] = {}
        in_shard: dict[str | None, int] = {}
        for sample in src:
            stream, url = sample.get(EXPECTED_KIND), sample.get("__url__")
            try:
                sample_rng = rng if self.train else key_rng(self.seeds.seed, sample["__key__"])
                processed = self.processor(sample, sample_rng, train=self.train)
            except Exception as exn:  # the handler re-raises whatever is not bad data
                processed = [exn]
            # A ZIM image's mattes are skipped one by one: the processor returns those that failed alone.
            good = [item for item in processed if not isinstance(item, Exception)]
            failed = [item for item in processed if isinstance(item, Exception)]
            for exn in failed:
                if isinstance(exn, CorruptSample) and url is not None:
                    exn.key = f"{exn.key} in {url}"  # keys repeat across shards
                if not handler(exn):
                    return
            if good or not failed:
                in_stream[stream] = in_shard[url] = 0
                yield from good
                continue
            in_stream[stream] = in_stream.get(stream, 0) + 1
            in_shard[url] = in_shard.get(url, 0) + 1
            if not self.train:
                continue
            if in_stream[stream] >= MAX_CONSECUTIVE_SKIPS:
                of = f" from {stream[1]}" if stream else ""
                self._stop(f"{in_stream[stream]} training samples{of} in a row", failed[-1], url)
            if url is not None and in_shard[url] >= MAX_CONSECUTIVE_SKIPS:
                self._stop(f"{in_shard[url]} training samples in a row from the shard {url}", failed[-1])

    def _stop(self, what: str, exn: Exception, url: str | None = None) -> NoReturn:
        last = f"{exn}, in {url}" if url is not None else str(exn)  # (the exception's text has no shard)
        raise RuntimeError(
            f"{what} were skipped as corrupt (the last: {last}); skips so far: {self.counter.counts()}. "
            f"Check that the shards are the kind this stage reads ({type(self.processor).__name__})"
        ) from exn


class MixSTL(torch.utils.data.IterableDataset):
    """Matting samples with segmentation (STL) samples mixed in at ``ratio`` (see ``augment.mix_stl``)."""

    def __init__(
        self, matting: wds.DataPipeline, segmentation: wds.DataPipeline, *, ratio: float, seeds: EpochSeeds
    ):
        super().__init__()
        self.matting, self.segmentation, self.ratio, self.seeds = matting, segmentation, ratio, seeds

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng(self.seeds.next_epoch(MIX_STL_STAGE))
        return mix_stl(iter(self.matting), iter(self.segmentation), rng, ratio=self.ratio)


class UnpaddedDistributedSampler(DistributedSampler):
    """Every ``world_size``-th index from ``rank``, in order, without the padding DistributedSampler adds.

    Evaluation must see each instance exactly once, so ranks may get one index fewer than others. Being
    a DistributedSampler, Lightning does not replace it with its own (padding) one.

    With fewer instances than ranks, a rank that would get none takes index ``rank % len(dataset)`` again
    (Lightning refuses an empty loader on one rank of several, and the others would then wait for it in
    the metric sync). Instance ``i`` is owned by rank ``i % world_size`` (:func:`owner_rank`); the metrics
    de-duplicate rows by index and the prediction writer saves only the owner's copy.
    """

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), world_size))
        if not self.indices and len(dataset):
            self.indices = [rank % len(dataset)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def owner_rank(index: int, world_size: int) -> int:
    """The rank whose :class:`UnpaddedDistributedSampler` slice holds instance ``index`` first."""
    return index % world_size


def _shard_dicts(urls: list[str]) -> Iterator[dict]:
    # A pipeline source over a fixed shard list, which may be empty (SimpleShardList refuses that).
    for url in urls:
        yield {"url": url}


class ZimDataModule(L.LightningDataModule):
    """Data for the converter, ZIM and evaluation stages.

    Shard arguments take a local path, a brace pattern (``"sa_{000000..000009}.tar"``), a ``pipe:`` url,
    several joined by ``::``, or a list of these.

    Args:
        stage: "converter", "zim" or "eval". (The SA1B-Matte builder reads SA-1B itself:
            ``sa1b_matte.ShardDataset``.)
        train_shards: training shards (converter: matting; zim: SA1B-Matte and/or matting).
        val_shards: validation shards, read once per validation in a fixed order; None: no validation.
        seg_shards: segmentation shards for STL (converter stage).
        eval_root: dataset folder for the eval stage.
        eval_format: ``format`` of ``build_eval_dataset`` ("micromat", "am2k", "aim500", "folders").
        eval_prompt: ``prompt`` of ``build_eval_dataset`` ("box" or "point").
        eval_subset: ``subset`` of ``build_eval_dataset`` (e.g. "fine", "coarse"; None: all).
        eval_trimaps: ``trimaps`` of ``build_eval_dataset``: read the trimaps (the dim protocol's).
        eval_layout: ``layout`` of ``build_eval_dataset`` (``eval_format="folders"``): the images', the
            alphas' and optionally the trimaps' folders under ``eval_root``.
        batch_size: training batch size per rank.
        val_batch_size: validation / evaluation batch size; None: ``batch_size``.
        num_workers: DataLoader workers per rank.
        seed: the data streams' seed; with the same seed, rank and worker count, training streams repeat
            exactly. None: the run's seed when the module is built (Lightning's ``seed_everything``,
            which LightningCLI calls first: ``PL_GLOBAL_SEED``), else 0.
        batches_per_epoch: training batches per epoch per rank (the streams are endless).
        shuffle_buffer: samples in each worker's shuffle buffer (1 disables shuffling).
        shuffle_initial: samples gathered before the first one leaves the buffer.
        crop_size: converter crop side S.
        crop_scale: converter training crops: (low, high) area as a fraction of the image's, before the
            resize to S (smaller fractions enlarge more; :data:`~zim_lightning.data.augment.CROP_SCALE`).
        image_size: ZIM frame side (1024, SAM's).
        coarsen_ops: coarsening ops the converter's coarse masks are drawn from; None: all.
        sga: Spatial Generalization Augmentation (paper ablation switch).
        sga_p: SGA probability.
        stl: Selective Transformation Learning: mix in ``seg_shards`` (paper ablation switch).
        stl_ratio: expected fraction of STL samples.
        augment: geometric and photometric training augmentation.
        box_ratio: fraction of ZIM samples prompted with a box (the rest with points).
        box_jitter: largest box side shift as a fraction of the box size (paper: 0.1).
        max_positive: ZIM point samples get 1..max_positive positive points.
        max_negative: ZIM point samples get 0..max_negative negative points.
        positive_threshold: alpha at or above which a pixel may be a positive point.
        support_threshold: alpha above which a pixel belongs to the object for the negative points.
        box_threshold: the training box spans the pixels with alpha above this (0: the paper's min-max
            of the matte; at most ``support_threshold``).
        near_negative_p: probability that a sample's negative points are drawn near the object.
        mattes_per_image: SA1B-Matte annotations used per decoded image in training.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        build_shards: no longer read (the SA1B-Matte builder reads SA-1B itself); accepted as None so
            that run configs saved before it went (``build_shards: null``) still parse.
    """

    def __init__(
        self,
        *,
        stage: str = "zim",
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        seg_shards: str | list[str] | None = None,
        eval_root: str | None = None,
        eval_format: str = "micromat",
        eval_prompt: str = "box",
        eval_subset: str | None = None,
        eval_trimaps: bool = True,
        eval_layout: list[str] | None = None,
        build_shards: str | list[str] | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int | None = None,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        crop_size: int = 1024,
        crop_scale: tuple[float, float] = CROP_SCALE,
        image_size: int = 1024,
        coarsen_ops: list[str] | None = None,
        sga: bool = True,
        sga_p: float = 0.5,
        stl: bool = True,
        stl_ratio: float = 0.1,
        augment: bool = True,
        box_ratio: float = 0.5,
        box_jitter: float = 0.1,
        max_positive: int = 3,
        max_negative: int = 2,
        positive_threshold: float = 0.9,
        support_threshold: float = 0.05,
        box_threshold: float = 0.0,
        near_negative_p: float = 0.5,
        mattes_per_image: int = 1,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if build_shards is not None:
            raise ValueError(
                "build_shards is no longer a ZimDataModule stage: build SA1B-Matte with "
                "`zim-lightning build-sa1b-matte --sa1b ...`"
            )
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= sga_p <= 1.0:
            raise ValueError(f"sga_p must be in [0, 1], got {sga_p}")
        if not 0.0 <= stl_ratio <= 1.0:
            raise ValueError(f"stl_ratio must be in [0, 1], got {stl_ratio}")
        self.save_hyperparameters()
        self.stage = stage
        self.train_shards, self.val_shards, self.seg_shards = train_shards, val_shards, seg_shards
        self.eval_root, self.eval_format, self.eval_prompt, self.eval_subset = (
            eval_root,
            eval_format,
            eval_prompt,
            eval_subset,
        )
        self.eval_trimaps, self.eval_layout = eval_trimaps, eval_layout
        self._eval_dataset: EvalDataset | None = None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self._seed_from_run = seed is None
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.stl, self.stl_ratio = stl, stl_ratio
        self.pin_memory = pin_memory
        self.converter_processor = ConverterSampleProcessor(
            crop_size=crop_size,
            coarsen_ops=tuple(COARSEN_OPS if coarsen_ops is None else coarsen_ops),
            sga=sga,
            sga_p=sga_p,
            augment=augment,
            crop_scale=tuple(crop_scale),
        )
        self.prompts = PromptSampler(
            box_ratio=box_ratio,
            box_jitter=box_jitter,
            max_positive=max_positive,
            max_negative=max_negative,
            positive_threshold=positive_threshold,
            support_threshold=support_threshold,
            box_threshold=box_threshold,
            near_negative_p=near_negative_p,
        )
        self.zim_processor = ZimSampleProcessor(
            image_size=image_size, prompts=self.prompts, mattes_per_image=mattes_per_image, augment=augment
        )
        #: Corrupt samples skipped so far by this process and its workers, per reason.
        self.skips = SkipCounter(max_workers=num_workers, lanes=2)  # lane 0 training, lane 1 the others

    # ------------------------------------------------------------------ helpers

    def setup(self, stage: str) -> None:
        """Check the shards (:meth:`check_shards`) before fitting or validating, so that a run started
        from Python stops before its first step as one started by ``zim-lightning fit`` does. Then take
        rank 0's run seed on every rank: ranks launched separately (torchrun, SLURM) with
        ``seed_everything: true`` draw different ones, and validation's per-sample crops and prompts
        would then depend on the rank that reads a sample."""
        if stage in ("fit", "validate"):
            self.check_shards()
        trainer = self.trainer
        if self._seed_from_run and trainer is not None and trainer.world_size > 1:
            self.seed = int(trainer.strategy.broadcast(self.seed, src=0))

    def check_shards(self) -> None:
        """Expand every shard list given (training, validation, and segmentation with ``stl``), so that a
        pattern naming no shard or a local shard that does not exist stops a run before it starts.

        Raises:
            ValueError, FileNotFoundError: as :func:`~zim_lightning.data.shards.expand_shards`.
        """
        given = {"train_shards": self.train_shards, "val_shards": self.val_shards}
        given["seg_shards"] = self.seg_shards if self.stl else None
        for name, spec in given.items():
            if spec is not None:
                try:
                    expand_shards(spec)
                except (ValueError, FileNotFoundError) as error:
                    raise type(error)(f"{name}: {error}") from error

    def skip_counts(self) -> dict[str, int]:
        """Corrupt samples skipped so far by this rank (main process and workers), per reason."""
        return self.skips.counts()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return distributed_info()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Converter and ZIM batches travel with uint8 labels (:func:`~zim_lightning.data.samples.collate`);
        on the device they become the batches of docs/architecture.md, float ``alpha`` (the converter's
        ``mask`` too) and ZIM's ``valid`` (``unpack_batch``)."""
        return unpack_batch(batch) if self.stage in ("converter", "zim") else batch

    def _collate(self) -> Callable[[list[dict]], dict]:
        # A partial of a module-level function pickles into DataLoader workers; a lambda would not.
        return partial(collate, frame_size=self.zim_processor.image_size)

    def _processor(self) -> ConverterSampleProcessor | ZimSampleProcessor:
        return self.converter_processor if self.stage == "converter" else self.zim_processor

    @staticmethod
    def _shards(spec: str | list[str] | None, name: str) -> list[str]:
        if spec is None:
            raise ValueError(f"ZimDataModule needs {name} for this stage; pass a path, brace pattern or list")
        return expand_shards(spec)

    def _loader_workers(self, shards: int, world_size: int) -> int:
        # A deterministic pass gives whole shards to workers; workers beyond the shard count would idle.
        return min(self.num_workers, max(1, -(-shards // world_size))) if self.num_workers else 0

    # ------------------------------------------------------------------ training

    def _epoch_seeds(self, rank: int, source: int = 0) -> EpochSeeds:
        # Where training resumes: the restored epoch and global step (Lightning restores the loops
        # before it asks for the training loader), or the start of a fresh run.
        trainer = self.trainer
        if trainer is None:
            return EpochSeeds(seed=self.seed, rank=rank, source=source)
        return EpochSeeds(
            seed=self.seed,
            rank=rank,
            first_epoch=trainer.current_epoch,
            resume_step=trainer.global_step,
            source=source,
        )

    def _train_stream(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        source: int = 0,
        kind: str | None = None,
        option: str = "train_shards",
    ) -> wds.DataPipeline:
        workers = max(1, self.num_workers)
        split = len(urls) >= world_size * workers
        if not split:
            # Workers that draw the same shard at the same time read the same samples in the same order
            # (each shard is read from its first sample): only the shuffle buffer separates them.
            log.warning(
                "%d shards for %d ranks x %d workers: every worker resamples from all shards with its own "
                "seed, and workers that draw the same shard together send the same samples in the same "
                "steps; write at least %d shards (smaller ones) to give each worker its own",
                len(urls),
                world_size,
                workers,
                world_size * workers,
            )
        stages = [wds.SimpleShardList(urls)]  # {"url"} for every shard, in order
        if split:
            stages += [
                partial(split_by_rank, rank=rank, world_size=world_size),  # nodesplitter: this rank's shards
                split_by_dataloader_worker,  # workersplitter: this worker's share of them
            ]
        stages += [
            ResampleShards(seeds=self._epoch_seeds(rank, source)),  # endless {"url"} draws with replacement
            # raw samples {"__key__", "jpg": bytes, ...}; an error if every shard drawn is unreadable
            partial(tar_samples, counter=self.skips, max_empty_shards=max(1000, 10 * len(urls))),
            ShuffleSamples(
                bufsize=self.shuffle_buffer,
                initial=self.shuffle_initial,
                seeds=self._epoch_seeds(rank, source),
            ),
        ]
        if kind is not None:  # samples of the other kind are refused (shards given in each other's place)
            stages.append(wds.map(partial(expect_kind, kind=kind, option=option)))
        return wds.DataPipeline(*stages)

    def train_dataset(self, *, rank: int | None = None, world_size: int | None = None) -> wds.DataPipeline:
        """The training pipeline of one rank: endless batches (collated dicts) of ``batch_size``.

        Args:
            rank: this rank; None: from the trainer, torch.distributed or the RANK env var.
            world_size: number of ranks; None: as ``rank``.
        """
        if self.stage not in ("converter", "zim"):
            raise ValueError(f"stage {self.stage!r} has no training data; use 'converter' or 'zim'")
        if rank is None or world_size is None:
            rank, world_size = self._rank()
        raw = self._train_stream(
            self._shards(self.train_shards, "train_shards"),
            rank=rank,
            world_size=world_size,
            kind="matting" if self.stage == "converter" else None,
            option="train_shards",
        )
        if self.stage == "converter" and self.stl:
            seg = self._train_stream(
                self._shards(self.seg_shards, "seg_shards (stl=True)"),
                rank=rank,
                world_size=world_size,
                source=1,
                kind="segmentation",
                option="seg_shards",
            )
            source = MixSTL(
                raw, seg, ratio=self.stl_ratio, seeds=self._epoch_seeds(rank)
            )  # matting + STL samples
        else:
            source = raw
        return wds.DataPipeline(
            source,
            # processed samples in the contract's layout (numpy), corrupt ones skipped and counted
            ProcessSamples(self._processor(), train=True, seeds=self._epoch_seeds(rank), counter=self.skips),
            # collated batches: tensors, key list[str]
            wds.batched(self.batch_size, collation_fn=self._collate(), partial=False),
        )

    def train_dataloader(self) -> wds.WebLoader:
        """Endless resampled stream cut into epochs of ``batches_per_epoch`` batches (``with_epoch``); each
        epoch continues the stream of the last (:class:`ContinuingStream`)."""
        loader = wds.WebLoader(
            ContinuingStream(self.train_dataset()),
            batch_size=None,  # batching happens in the workers
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,  # workers keep their streams across epochs
        )
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    # ------------------------------------------------------------------ validation

    def val_dataset(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        num_workers: int | None = None,
    ) -> wds.DataPipeline:
        """Deterministic validation pipeline of one rank (and optionally one explicit worker).

        Shards go round-robin to (rank, worker), are read once in order, and samples are processed with
        key-seeded generators, so every sample is seen exactly once with the same crop, coarse mask and
        prompt whatever the number of ranks and workers.

        Args:
            rank, world_size: the rank; None: from the trainer / environment.
            worker, num_workers: simulate a DataLoader worker; None: the current worker, if any.
        """
        if rank is None or world_size is None:
            rank, world_size = self._rank()
        urls = self._shards(self.val_shards, "val_shards")
        if worker is not None and num_workers is not None:
            assigned = assign_shards(
                urls, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
            )
            stages = [partial(_shard_dicts, assigned)]  # {"url"} for this (rank, worker)'s shards, in order
        else:
            stages = [
                wds.SimpleShardList(urls),  # {"url"} for every shard, in order
                partial(split_by_rank, rank=rank, world_size=world_size),  # this rank's shards
                split_by_dataloader_worker,  # this worker's shards
            ]
        counter = self.skips.lane(1)  # validation workers run while training's persistent ones prefetch
        stages.append(partial(tar_samples, counter=counter))  # raw samples, in file order
        if self.stage == "converter":  # the converter validates on mattes: segmentation samples are refused
            stages.append(wds.map(partial(expect_kind, kind="matting", option="val_shards")))
        return wds.DataPipeline(
            *stages,
            ProcessSamples(
                self._processor(),
                train=False,
                seeds=EpochSeeds(seed=self.seed, rank=rank),
                counter=counter,
            ),
            wds.batched(self.val_batch_size, collation_fn=self._collate(), partial=True),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation (converter / zim: ``val_shards``; eval: the evaluation set); [] when there is none."""
        if self.stage == "eval":
            return self.eval_dataloader()
        if self.stage not in ("converter", "zim") or self.val_shards is None:
            return []
        rank, world_size = self._rank()
        shards = len(expand_shards(self.val_shards))
        return DataLoader(
            self.val_dataset(rank=rank, world_size=world_size),
            batch_size=None,
            num_workers=self._loader_workers(shards, world_size),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    # ------------------------------------------------------------------ evaluation

    def eval_dataset(self) -> EvalDataset:
        """The full evaluation dataset (``data.micromat.build_eval_dataset``), built once per seed (setup
        may take rank 0's seed)."""
        if self._eval_dataset is not None and self._eval_dataset.seed == self.seed:
            return self._eval_dataset
        if self.eval_root is None:
            raise ValueError("ZimDataModule(stage='eval') needs eval_root, the evaluation dataset folder")
        from zim_lightning.data.micromat import build_eval_dataset

        self._eval_dataset = build_eval_dataset(
            self.eval_root,
            format=self.eval_format,
            prompt=self.eval_prompt,
            subset=self.eval_subset,
            seed=self.seed,
            trimaps=self.eval_trimaps,
            layout=self.eval_layout,
        )
        return self._eval_dataset

    def eval_dataloader(self, *, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Evaluation loader over this rank's unpadded slice (instances ``rank``, ``rank + world_size``, ...)."""
        if rank is None or world_size is None:
            rank, world_size = self._rank()
        dataset = self.eval_dataset()
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            sampler=UnpaddedDistributedSampler(dataset, rank=rank, world_size=world_size),
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate", None),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader | list:
        """Evaluation stage: the evaluation loader; other stages: the validation loader."""
        return self.eval_dataloader() if self.stage == "eval" else self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Evaluation stage: the evaluation loader, as :meth:`test_dataloader`."""
        if self.stage != "eval":
            raise ValueError(f"stage {self.stage!r} has no predict data; use 'eval'")
        return self.eval_dataloader()
