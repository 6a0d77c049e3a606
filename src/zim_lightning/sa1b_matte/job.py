"""The job: the datamodule of the unfinished shards, the Trainer that runs the converter over them, and the
summary of OUT."""

from __future__ import annotations

import functools
import json
import logging
import math
import socket
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.utils.data
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zim_lightning.data.skips import SKIP_REASONS
from zim_lightning.lit.preemption import is_preemption, stop_message
from zim_lightning.output_lock import OutputLock
from zim_lightning.sa1b_matte.geometry import CropConfig
from zim_lightning.sa1b_matte.reading import ShardDataset, worker_init
from zim_lightning.sa1b_matte.resume import (
    MANIFEST_DIR,
    ShardClaims,
    failure_path,
    is_done,
    manifest_path,
    new_run_id,
    output_path,
    resolve_shards,
)
from zim_lightning.sa1b_matte.writing import SA1BMatteWriter, check_resumable, describe_run, read_manifest

log = logging.getLogger(__name__)

#: How long a rank that finished its shards waits at the final barrier for the others.
BARRIER_TIMEOUT = timedelta(days=7)
RANDOM_WEIGHTS_SEED = 0
DEFAULT_CONVERTER = "converter_hiera_b_plus"


class BuildData(LightningDataModule):
    """The unfinished shards, claimed by the workers of every rank as they free up.

    The run's claims are named once the trainer has launched every rank (rank 0's name, broadcast);
    rank 0 takes the output lock and checks again that the shards can resume, and every rank learns of
    a problem together (one rank raising alone would leave the others waiting at a barrier).
    """

    def __init__(
        self,
        *,
        shards: Sequence[Path],
        out: Path,
        config: CropConfig,
        batch_size: int,
        num_workers: int,
        pin: bool,
        run_info: dict[str, Any],
    ) -> None:
        super().__init__()
        self.shards, self.out, self.config, self.run_info = list(shards), out, config, run_info
        self.batch_size, self.num_workers, self.pin = batch_size, num_workers, pin
        self.lock = OutputLock(out)
        self.claims: ShardClaims | None = None

    def _start_run(self) -> ShardClaims:
        strategy, rank = self.trainer.strategy, self.trainer.global_rank
        claims = ShardClaims(out=self.out, run_id=strategy.broadcast(new_run_id(), src=0))

        def start() -> str | None:
            try:
                # again, now that no other build can finish shards here: one that held the lock at the
                # first check may have finished some with other settings since
                check_resumable(self.out, self.shards, self.run_info)
                claims.begin()
            except ValueError as error:
                return str(error)
            except OSError as error:
                return f"cannot start the run's claims in {self.out} ({error})"
            return None

        self.lock.take(strategy, rank_zero=rank == 0, then=start)
        # every rank decides together: one rank raising alone would leave the others at a barrier
        if not strategy.reduce_boolean_decision(claims.visible(), all=True):
            raise ValueError(
                f"some ranks do not see {claims.directory}, which rank 0 made: --out {self.out} must be one "
                f"directory that every node shares (NFS, Lustre), or each node would build every shard "
                f"(this is rank {rank} on {socket.gethostname()})"
            )
        return claims

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        self.claims = self._start_run()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = [s for s in self.shards if not is_done(self.out, s)]
        log.info(
            "rank %d/%d: %d of %d shards unfinished, shared over the ranks",
            rank,
            world,
            len(todo),
            len(self.shards),
        )
        dataset = ShardDataset(
            shards=todo, config=self.config, batch_size=self.batch_size, claims=self.claims
        )
        # every rank lists every unfinished shard, but builds about its share of them
        workers = min(self.num_workers, math.ceil(len(todo) / world))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin,
            worker_init_fn=(
                functools.partial(worker_init, log_level=logging.getLogger().getEffectiveLevel())
                if workers
                else None
            ),
            # spawn, not fork: a worker forked after OpenCV's or OpenMP's thread pools ran in this process
            # (data generation, model init, a forward) can deadlock in its first cv2 call
            multiprocessing_context="spawn" if workers else None,
            prefetch_factor=2 if workers else None,  # a batch of 16 masks at 1024 is 64 MB
        )


def build(
    *,
    sa1b: Sequence[str],
    out: str | Path,
    model: str | None = None,
    checkpoint: str | None = None,
    net: torch.nn.Module | None = None,
    config: CropConfig | None = None,
    batch_size: int = 16,
    num_workers: int = 4,
    accelerator: str = "auto",
    devices: str | int = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    channels_last: bool = False,
    compile: str | None = None,
    accept_truncated: bool = False,
) -> dict[str, Any]:
    """Build SA1B-Matte shards for ``sa1b`` in ``out``, skipping finished ones.

    Args:
        sa1b: directories, brace patterns or paths of SA-1B shards.
        out: output directory (created).
        model: converter name in ``converter_model_registry``; None: the network a ``zim-lightning fit``
            checkpoint carries, else ``converter_hiera_b_plus``.
        checkpoint: converter weights (plain state dict or Lightning checkpoint); None: random weights.
        net: an already built converter, used instead of ``model`` / ``checkpoint`` (benchmarks).
        config: cropping options.
        batch_size: masks per converter forward.
        num_workers: DataLoader workers per rank (each reads whole shards).
        accelerator, devices, num_nodes: passed to the Lightning Trainer (DDP when several).
        precision: Trainer precision; None: ``"bf16-mixed"`` on GPU, ``"32-true"`` elsewhere.
        channels_last: NHWC convolution weights (``zim_lightning.speed.to_channels_last``; same mattes).
        compile: ``torch.compile`` mode for the whole converter (``zim_lightning.speed.COMPILE_MODES``),
            or None for eager. Every batch has the same shape, so it compiles once per rank.
        accept_truncated: finish shards whose input tar stream is damaged with what can be read;
            default: leave them unfinished with a note (see :class:`SA1BMatteWriter`).

    Returns:
        A summary over all input shards (rank 0's view after every rank finished): see :func:`summarize`.
    """
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from zim_lightning import speed
    from zim_lightning.lit.build_module import MatteBuildModule

    config = config or CropConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        shards = resolve_shards(sa1b)
    except FileNotFoundError as error:  # bad input, not a failure midway with finished shards to keep
        raise ValueError(str(error)) from error
    out = Path(out)
    inputs_in_out = [str(s) for s in shards if output_path(out, s).resolve() == s.resolve()]
    if inputs_in_out:
        raise ValueError(
            f"--out {str(out)!r} is where the SA-1B input shards lie ({inputs_in_out[:3]}...): each output "
            "shard takes its input's name and would replace it; give another --out"
        )
    if net is None:
        net, model = _converter(model, checkpoint)
    model = model or type(net).__name__
    net.eval()
    if channels_last:
        speed.to_channels_last(net)
    if compile is not None:
        speed.compile_model(net, mode=compile, parts=None)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = precision or ("bf16-mixed" if gpu else "32-true")
    several = _several_processes(devices, num_nodes=num_nodes, gpu=gpu)
    run_info = describe_run(config, model, checkpoint, precision)
    check_resumable(out, shards, run_info)  # here, to fail fast; again under the output lock
    writer = SA1BMatteWriter(
        out=out,
        inputs={s.name: s for s in shards},
        run_info=run_info,
        accept_truncated=accept_truncated,
    )
    try:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            # Ranks wait at the final barrier for the slowest one (a shard takes hours), far past the
            # 30-minute default timeout of a collective, after which NCCL would abort the finished ranks.
            strategy=DDPStrategy(timeout=BARRIER_TIMEOUT) if several else "auto",
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[writer],
        )
    except MisconfigurationException as error:  # e.g. devices=0, or an accelerator this machine lacks
        raise ValueError(str(error)) from error
    # only now, with every option checked: a refused run leaves nothing in a new --out
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    data = BuildData(
        shards=shards,
        out=out,
        config=config,
        batch_size=batch_size,
        num_workers=num_workers,
        pin=gpu,
        run_info=run_info,
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # both are expected here: the module moves only the tensors of its batches (its own
            # transfer_batch_to_device is the one meant to run), and the writer needs no batch indices
            warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            try:
                trainer.predict(MatteBuildModule(net=net), datamodule=data, return_predictions=False)
            except Exception as error:
                if is_preemption(error, trainer):  # any error once the trainer received SIGTERM
                    raise SIGTERMException(stop_message(error)) from error
                raise
        seconds = time.perf_counter() - start
        log.info(
            "rank %d: %d shards, %d mattes in %.1f s (%.1f masks/s)",
            trainer.global_rank,
            len(writer.completed),
            writer.masks,
            seconds,
            writer.masks / max(seconds, 1e-9),
        )
        trainer.strategy.barrier()
        if trainer.global_rank == 0 and data.claims is not None:
            data.claims.remove()  # every rank is past its last claim
    finally:
        data.lock.release()
    summary = summarize(out, shards)
    summary.update(
        built=len(writer.completed),
        failed_this_rank=writer.failed,
        masks_this_rank=writer.masks,
        seconds=seconds,
    )
    summary["rank"] = trainer.global_rank
    return summary


def _several_processes(devices: str | int, *, num_nodes: int, gpu: bool) -> bool:
    """Whether the Trainer will launch several processes (DDP), as Lightning resolves ``devices``."""
    if num_nodes > 1:
        return True
    if devices in ("auto", -1, "-1"):  # every visible device (one CPU process)
        return gpu and torch.cuda.device_count() > 1
    if isinstance(devices, int) or str(devices).isdigit():
        return int(devices) > 1
    return len([d for d in str(devices).split(",") if d.strip()]) > 1  # device ids, "0,1"


def _converter(model: str | None, checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    """The converter to build with, and its registry name: ``model`` from the registry, or, without it,
    the network a ``zim-lightning fit`` checkpoint carries (its class_path when it is no registry entry)."""
    from zim_lightning.models.build import network_from_checkpoint
    from zim_lightning.models.checkpoint import weights_loaded_later
    from zim_lightning.models.converter import MattingConverter, converter_model_registry

    carried = None
    if model is None and checkpoint is not None:
        carried = network_from_checkpoint(checkpoint, expected=MattingConverter)
    if carried is not None:
        net, spec = carried
        # the registry name when the run used a registry builder, so manifests name the model alike
        names = {f"{fn.__module__}.{fn.__name__}": name for name, fn in converter_model_registry.items()}
        return net, names.get(str(spec.get("class_path")), str(spec.get("class_path")))
    model = model or DEFAULT_CONVERTER
    if model not in converter_model_registry:
        raise ValueError(f"unknown converter {model!r}; expected one of {sorted(converter_model_registry)}")
    if checkpoint is None:
        log.warning("no --checkpoint: %s runs with random weights (tests and smoke runs only)", model)
        # random weights drawn from a fixed seed, so reruns of a smoke build stay byte-identical
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
    with weights_loaded_later():  # the checkpoint's, or random as warned above
        return converter_model_registry[model](checkpoint=checkpoint), model


def summarize(out: Path, shards: Sequence[Path]) -> dict[str, Any]:
    """Totals over the manifests of ``shards`` in ``out``.

    Returns:
        ``{"shards": n, "done": finished, "missing": [names], "failed": {name: why} (unfinished shards
        whose input was damaged), "samples", "images", "annotations", "masks", "skipped": {kind: n},
        "skipped_total", "per_shard": [manifest, ...]}``.
    """
    totals: dict[str, Any] = {"shards": len(shards), "done": 0, "missing": [], "failed": {}, "per_shard": []}
    for name in ("samples", "images", "annotations", "masks", "skipped_total"):
        totals[name] = 0
    totals["skipped"] = dict.fromkeys(SKIP_REASONS, 0)
    for shard in shards:
        path = manifest_path(out, shard)
        if not (is_done(out, shard) and path.is_file()):
            totals["missing"].append(shard.name)
            if failure_path(out, shard).is_file():
                totals["failed"][shard.name] = json.loads(failure_path(out, shard).read_text())["reason"]
            continue
        manifest = read_manifest(path)
        totals["done"] += 1
        totals["per_shard"].append(manifest)
        for name in ("samples", "images", "annotations", "masks", "skipped_total"):
            totals[name] += manifest[name]
        for kind, count in manifest["skipped"].items():
            totals["skipped"][kind] = totals["skipped"].get(kind, 0) + count
    return totals


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A rich table: per shard (up to 20) and totals, skips by kind."""
    from rich.console import Console
    from rich.table import Table

    kinds = [k for k, v in summary["skipped"].items() if v]
    table = Table(title=f"SA1B-Matte in {out}: {summary['done']}/{summary['shards']} shards complete")
    for column in ("shard", "images", "mattes", "skipped", *kinds):
        table.add_column(column, justify="left" if column == "shard" else "right")
    rows = summary["per_shard"]
    for manifest in rows if len(rows) <= 20 else []:
        table.add_row(
            manifest["output"],
            str(manifest["images"]),
            str(manifest["masks"]),
            str(manifest["skipped_total"]),
            *(str(manifest["skipped"].get(k, 0)) for k in kinds),
        )
    table.add_row(
        "total",
        str(summary["images"]),
        str(summary["masks"]),
        str(summary["skipped_total"]),
        *(str(summary["skipped"][k]) for k in kinds),
        style="bold",
    )
    console = Console()
    console.print(table)
    if summary["missing"]:
        console.print(f"[red]unfinished shards[/red]: {', '.join(summary['missing'][:20])}")
    for name, reason in list(summary["failed"].items())[:20]:
        console.print(f"[red]{name}[/red]: {reason}")
    console.print(f"skipped samples and masks: {summary['skipped_total']}")
