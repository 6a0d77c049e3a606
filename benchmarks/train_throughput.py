"""Fine-tuning throughput of ZIM against stock segment-anything, measured in one process; prints JSON.

One training step = forward of image encoder and mask decoder on a batch of 1024x1024 images with one
box each, ZIM's matting loss (L1 + 10 x gradient, fp32) on the sigmoid of the logits upsampled to the
image, backward, AdamW step. Stock SAM runs its own modules the way ``Sam.forward`` does (the decoder
once per image, its 256x256 logits upsampled); ZIM decodes the whole batch in one call.

For every configuration it reports the median step time, images per second, peak CUDA memory
(``torch.cuda.max_memory_allocated``) and model FLOP utilisation: the FLOPs of one forward + backward of
the *plain* model (eager attention), counted once with ``torch.utils.flop_counter.FlopCounterMode``,
divided by the step time and ``--peak-tflops`` (989: H100 SXM dense bf16). Switches that add arithmetic
(``sdpa_fold``'s wider heads, checkpointing's recomputation) therefore lower MFU, as they should.
``--profile N`` adds the top operators and kernels of N more steps by self device time.

A configuration is ``BASE[+switch...]``: BASE is ``stock`` (segment-anything) or a ViT attention backend
of ZIM (``eager``, ``sdpa``, ``sdpa_fold``, ``flex``); switches are ``cl`` (channels-last convolutions),
``fused`` (fused AdamW), ``compile`` (torch.compile of encoder, feature pyramid, prompt encoder and decoder),
``ckpt`` (activation checkpointing of the ViT blocks) and ``lit``. All run at ``--precision`` (bf16 autocast).

The step above is this script's own loop, timed with a synchronisation around each step. ``lit`` times
the training as it runs instead: :class:`~zim_lightning.lit.zim_module.ZimModule`'s training step in a
Lightning ``Trainer`` (bf16-mixed for ``--precision bf16``), batches in the datamodule's layout (uint8
image and alpha, input sizes, box corners) copied from pinned host memory every step, the
non-finite-loss check, the running means and their logging, and the configs' progress bar (on stderr),
with no synchronisation but at the two ends of the timed steps. (Validation and checkpoints are off.)

GPU run (an H100, ViT-B, batch 8)::

    python benchmarks/train_throughput.py --model vit_b --device cuda --batch-size 8 --json-out train.json

One configuration (plus stock) instead of the default sweep::

    python benchmarks/train_throughput.py --attention flex --compile --checkpointing

CPU smoke run (tiny model, 256 input)::

    python benchmarks/train_throughput.py --model tiny --image-size 256 --device cpu --precision fp32 \
        --batch-size 2 --warmup 1 --steps 2 --configs stock,eager,sdpa,sdpa_fold+cl+fused+ckpt
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zim_lightning import benchmarking, speed
from zim_lightning.data.samples import unpack_batch
from zim_lightning.lit.callbacks import ProgressBar
from zim_lightning.lit.zim_module import ZimModule
from zim_lightning.losses import MattingLoss
from zim_lightning.models import relpos_flash
from zim_lightning.models.build import ZIM_VARIANTS
from zim_lightning.models.vit_attention import ATTENTION_BACKENDS
from zim_lightning.models.zim import PIXEL_MEAN, PIXEL_STD, Zim

#: The sweep run when neither --configs nor --attention is given.
DEFAULT_CONFIGS = (
    "stock",
    "eager",
    "sdpa",
    "sdpa_fold",
    "flex",
    "sdpa_fold+cl+fused",
    "flex+cl+fused",
    "sdpa_fold+cl+fused+compile",
    "flex+cl+fused+compile",
    "flex+cl+fused+compile+ckpt",
)
SWITCHES = ("cl", "fused", "compile", "ckpt", "lit")
#: Lightning's precision for each of ``--precision``'s.
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
#: AdamW learning rate of the paper's ZIM fine-tuning (it does not change the step time).
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Config:
    """One measured configuration (see the module docstring for the grammar)."""

    base: str
    channels_last: bool
    fused: bool
    compiled: bool
    checkpointing: bool
    lightning: bool = False

    @classmethod
    def parse(cls, text: str) -> Config:
        base, *switches = [t.strip() for t in text.split("+")]
        if base != "stock" and base not in ATTENTION_BACKENDS:
            raise ValueError(
                f"configuration {text!r}: base must be 'stock' or one of {list(ATTENTION_BACKENDS)}"
            )
        unknown = sorted(set(switches) - set(SWITCHES))
        if unknown:
            raise ValueError(
                f"configuration {text!r}: unknown switches {unknown}; expected some of {list(SWITCHES)}"
            )
        if base == "stock" and {"ckpt", "lit"} & set(switches):
            raise ValueError(
                f"configuration {text!r}: stock SAM has no activation-checkpointing switch and no "
                "LightningModule"
            )
        on = [s in switches for s in SWITCHES]
        return cls(base, *on)

    @property
    def name(self) -> str:
        flags = [
            s
            for s, on in zip(
                SWITCHES,
                (self.channels_last, self.fused, self.compiled, self.checkpointing, self.lightning),
                strict=True,
            )
            if on
        ]
        return "+".join([self.base, *flags])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b", choices=sorted(ZIM_VARIANTS), help="model size")
    parser.add_argument(
        "--image-size", type=int, default=1024, help="input side (1024; smaller for CPU smoke runs)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=sorted(speed.PRECISIONS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated configurations (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--attention",
        default=None,
        choices=ATTENTION_BACKENDS,
        help="measure stock and this one ZIM configuration",
    )
    parser.add_argument("--compile", action="store_true", help="with --attention: torch.compile")
    parser.add_argument(
        "--checkpointing", action="store_true", help="with --attention: activation checkpointing"
    )
    parser.add_argument("--compile-mode", default="default", choices=speed.COMPILE_MODES)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile this many steps and report the top operators/kernels (0: off)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense peak of the card at --precision"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.configs is not None and args.attention is not None:
        parser.error("give either --configs or --attention (with --compile/--checkpointing), not both")
    if args.attention is not None:
        switches = ["cl", "fused"] + ["compile"] * args.compile + ["ckpt"] * args.checkpointing
        texts = ["stock", "+".join([args.attention, *switches])]
    else:
        if args.compile or args.checkpointing:
            parser.error("--compile and --checkpointing need --attention (or write them into --configs)")
        texts = DEFAULT_CONFIGS if args.configs is None else [t for t in args.configs.split(",") if t.strip()]
    try:
        # a configuration named twice runs once (the suite's lists repeat one when compiling is off)
        args.configs = list(dict.fromkeys(Config.parse(t) for t in texts))
    except ValueError as error:
        parser.error(str(error))
    return args


def synthetic_batch(batch: int, side: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random uint8 images Bx3xSxS, soft-disc alpha targets Bx1xSxS in [0, 1] (``alpha``; in 8-bit steps,
    so that ``alpha_u8``, the datamodule's uint8 form, holds the same targets), and one box per image Bx4."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
    centres = torch.rand(batch, 2, generator=generator) * side * 0.5 + side * 0.25  # (x, y) pixels
    radii = torch.rand(batch, generator=generator) * side * 0.2 + side * 0.05
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    distance = torch.sqrt(
        (xs[None] - centres[:, 0, None, None]) ** 2 + (ys[None] - centres[:, 1, None, None]) ** 2
    )
    alpha = torch.clamp((radii[:, None, None] - distance) / (0.05 * side) + 0.5, 0.0, 1.0)[:, None]
    alpha_u8 = (alpha * 255).round().to(torch.uint8)
    alpha = unpack_batch({"alpha": alpha_u8})["alpha"]
    boxes = torch.cat([centres - radii[:, None], centres + radii[:, None]], dim=1).clamp(0, side - 1)  # Bx4
    return {
        k: v.to(device) for k, v in dict(images=images, alpha=alpha, alpha_u8=alpha_u8, boxes=boxes).items()
    }


def zim_loss_fn(zim: Zim, batch: dict[str, torch.Tensor], precision: str) -> Callable[[], torch.Tensor]:
    coords, labels = benchmarking.box_prompts(batch["boxes"])
    side = batch["images"].shape[-1]
    criterion = MattingLoss()

    def loss() -> torch.Tensor:
        with speed.autocast(coords.device, precision):
            logits = zim(batch["images"], coords, labels)["logits"]
        pred = torch.sigmoid(
            F.interpolate(logits.float(), (side, side), mode="bilinear", align_corners=False)
        )
        return criterion(pred, batch["alpha"])["loss"]

    return loss


def sam_loss_fn(
    sam: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str
) -> Callable[[], torch.Tensor]:
    device = batch["images"].device
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, -1, 1, 1)
    side = batch["images"].shape[-1]
    criterion = MattingLoss()

    def loss() -> torch.Tensor:
        with speed.autocast(device, precision):
            embeddings = sam.image_encoder((batch["images"].float() - mean) / std)
            low_res = []
            for i in range(embeddings.shape[0]):  # as Sam.forward: one decoder call per image
                sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"][i : i + 1], masks=None)
                masks, _ = sam.mask_decoder(
                    image_embeddings=embeddings[i : i + 1],
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                low_res.append(masks)
        logits = torch.cat(low_res).float()
        pred = torch.sigmoid(F.interpolate(logits, (side, side), mode="bilinear", align_corners=False))
        return criterion(pred, batch["alpha"])["loss"]

    return loss


def build(
    config: Config, args: argparse.Namespace, device: torch.device, *, plain: bool = False
) -> torch.nn.Module:
    """The network of ``config`` on ``device``, in train mode; ``plain``: without any speed switch."""
    torch.manual_seed(args.seed)
    if config.base == "stock":
        model = benchmarking.build_stock_sam(args.model, image_size=args.image_size)
    else:
        model = Zim(**ZIM_VARIANTS[args.model], image_size=args.image_size)
        # SAM starts the relative-position tables at zero: drawn here, so that the final losses, which
        # agree across ZIM configurations, also check each attention backend's bias and its gradients
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "rel_pos" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        speed.set_attention(model, "eager" if plain else config.base)
        speed.set_activation_checkpointing(model, config.checkpointing and not plain)
    model = model.to(device).train()
    if plain:
        return model
    if config.channels_last:
        speed.to_channels_last(model)
    if config.compiled:
        parts = ("image_encoder", "mask_decoder") if config.base == "stock" else speed.ZIM_COMPILED_PARTS
        speed.compile_model(model, mode=args.compile_mode, parts=parts)
    return model


def loss_fn(model: torch.nn.Module, config: Config, batch: dict[str, torch.Tensor], precision: str):
    return (
        sam_loss_fn(model, batch, precision)
        if config.base == "stock"
        else zim_loss_fn(model, batch, precision)
    )


def count_flops_per_image(config: Config, args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one forward + backward of the plain model, per image (counted at batch 1)."""
    model = build(config, args, device, plain=True)
    batch = synthetic_batch(1, args.image_size, args.seed, device)
    loss = loss_fn(model, config, batch, args.precision)
    with FlopCounterMode(display=False) as counter:
        loss().backward()
    flops = float(counter.get_total_flops())
    del model
    return flops


class _SameBatch(torch.utils.data.IterableDataset):
    """One host batch, endlessly (the DataLoader copies it to pinned memory every step, as in training)."""

    def __init__(self, batch: dict) -> None:
        super().__init__()
        self.batch = batch

    def __iter__(self):
        return itertools.repeat(self.batch)


class _StepClock(L.Callback):
    """Wall time of the steps after ``warmup`` ones, with the device synchronised only at both ends."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.seconds = self.loss = None
        self.skipped = 0  # steps ZimModule skipped for a non-finite loss (their loss reads 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            benchmarking.synchronize(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.skipped += bool(pl_module._skip_optimizer_step)
        if batch_idx == self.warmup + self.steps - 1:
            benchmarking.synchronize(self.device)
            self.seconds = time.perf_counter() - self.start
            self.loss = float(outputs["loss"])


def lightning_step_s(
    model: torch.nn.Module, config: Config, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """Seconds per step of ZimModule's training in a Lightning Trainer, and the last step's loss (NaN
    when a step was skipped for a non-finite loss)."""
    host = synthetic_batch(args.batch_size, args.image_size, args.seed, torch.device("cpu"))
    side = args.image_size
    coords, labels = benchmarking.box_prompts(host["boxes"])
    batch = {  # the datamodule's layout (samples.collate): one box per image as its two corners
        "image": host["images"],
        "alpha": host["alpha_u8"],
        "input_size": torch.tensor([[side, side]]).expand(args.batch_size, 2).contiguous(),
        "point_coords": coords,
        "point_labels": labels.contiguous(),
        "key": [f"k{i}" for i in range(args.batch_size)],
    }
    optimizer = partial(torch.optim.AdamW, lr=LEARNING_RATE, fused=config.fused or None)
    module = ZimModule(net=model, optimizer=optimizer)
    clock = _StepClock(args.warmup, args.steps, device)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=LIGHTNING_PRECISION[args.precision],
            max_steps=args.warmup + args.steps,
            logger=L.pytorch.loggers.CSVLogger(logs),  # as the configs: every 50 steps
            log_every_n_steps=50,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[clock, ProgressBar(console_kwargs={"stderr": True})],  # as the configs
        )
        loader = torch.utils.data.DataLoader(
            _SameBatch(batch), batch_size=None, pin_memory=device.type == "cuda"
        )
        trainer.fit(module, train_dataloaders=loader)
    return clock.seconds / args.steps, math.nan if clock.skipped else clock.loss


def measure(
    config: Config, args: argparse.Namespace, device: torch.device, flops_per_image: float
) -> dict[str, object]:
    result: dict[str, object] = {"config": config.name}
    try:
        model = build(config, args, device)
        optimizer = batch = loss = None
        if config.lightning:  # the steps as one span (no per-step timings): its mean
            step_s, final_loss = lightning_step_s(model, config, args, device)
            result.update(
                step_ms={"mean": step_s * 1e3}, final_loss=final_loss, finite=math.isfinite(final_loss)
            )
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=config.fused or None)
            batch = synthetic_batch(args.batch_size, args.image_size, args.seed, device)
            loss = loss_fn(model, config, batch, args.precision)
            losses: list[float] = []

            def step() -> None:
                value = loss()
                value.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value.detach())

            for _ in range(args.warmup):
                step()
            benchmarking.synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = benchmarking.measure_ms(step, device=device, warmup=0, repeats=args.steps)
            step_s = timing["median"] / 1e3
            result.update(
                step_ms=timing,
                final_loss=float(losses[-1]),
                finite=bool(all(torch.isfinite(v).item() for v in losses)),
            )
        result.update(
            images_per_s=args.batch_size / step_s,
            model_tflops_per_step=flops_per_image * args.batch_size / 1e12,
            mfu=flops_per_image * args.batch_size / step_s / (args.peak_tflops * 1e12),
        )
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.profile and not config.lightning:
            try:  # a profiler failure (CUPTI, say) costs the profile, not the timings
                result["profile"] = benchmarking.profile_top_ops(step, device=device, steps=args.profile)
            except Exception as error:  # noqa: BLE001
                result["profile_error"] = benchmarking.describe_error(error)
    except Exception as error:  # one failing configuration (OOM, a compile error) must not hide the others
        result["error"] = benchmarking.describe_error(error)
    finally:
        model = optimizer = batch = loss = None
        if config.compiled:
            torch.compiler.reset()  # drop compiled graphs (and what they hold) before the next configuration
        benchmarking.release_memory(device)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    flops: dict[str, float] = {}
    results: list[dict[str, object]] = []
    report = {
        "benchmark": "train_throughput",
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "environment": benchmarking.describe_environment(device),
        "results": results,
    }
    for config in args.configs:
        family = "stock" if config.base == "stock" else "zim"
        if family not in flops:
            flops[family] = count_flops_per_image(config, args, device)
        results.append(measure(config, args, device, flops[family]))
        report["model_gflops_per_image"] = {k: v / 1e9 for k, v in flops.items()}
        report["relpos_tiles"] = relpos_flash.autotuned_choices()  # triton_relpos: the autotuner's choices
        benchmarking.emit_report(report, args.json_out, complete=False)  # a killed run keeps what it measured
    benchmarking.emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
