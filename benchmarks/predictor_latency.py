"""Interactive latency of ZIM against stock segment-anything, measured in one process; prints JSON.

For each configuration it times, on the same synthetic 1024x1024 image and boxes:

- ``set_image``: the image encoder (plus ZIM's feature pyramid) from a uint8 1x3x1024x1024 tensor
  already on the device (stock: ``SamPredictor.set_torch_image``);
- ``one_box``: decode one box and bring the result to the host as a 1024x1024 array (stock: what
  ``SamPredictor.predict(box=...)`` does: ``predict_torch``, masks, scores and low-res logits to NumPy;
  ours: logits upsampled to the image, sigmoid, ``.cpu()``);
- ``set_image_plus_one_box``: both, back to back (the interactive target: <= 8 ms on an H100);
- ``boxes16``: 16 boxes decoded in one batched call, results left on the device (stock:
  ``SamPredictor.predict_torch(boxes=...)``; ours: ``Zim.decode`` with one embedding and 16 prompt sets).

Configurations: stock SAM at fp32 and at ``--precision``; ZIM's plain path (segment-anything's eager
attention, fp32: the reference); then ZIM with each ``--attention`` backend at ``--precision``,
channels-last, compiled when ``--compile`` names a mode. Every ZIM configuration also reports the
mean squared difference of its one-box alpha from the plain fp32 path's (target: < 1e-4).
``--profile N`` adds, per configuration, the top operators and kernels of N ``set_image`` + one-box calls
by self device time (``zim_lightning.benchmarking.profile_top_ops``).

Weights are random (latency does not depend on them). GPU run (an H100, ViT-B)::

    python benchmarks/predictor_latency.py --model vit_b --device cuda --json-out latency.json

CPU smoke run (tiny model, 256 input: only checks that everything runs)::

    python benchmarks/predictor_latency.py --model tiny --image-size 256 --device cpu --precision fp32 \
        --compile none --warmup 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from segment_anything.predictor import SamPredictor

from zim_lightning import benchmarking, speed
from zim_lightning.models import relpos_flash
from zim_lightning.models.build import ZIM_VARIANTS
from zim_lightning.models.vit_attention import ATTENTION_BACKENDS
from zim_lightning.models.zim import Zim

BATCHED_BOXES = 16
#: Standard deviation of the plain path's one-box logits under the benchmark's weights (see build_zim).
LOGIT_STD = 6.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predictor_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b", choices=sorted(ZIM_VARIANTS), help="model size")
    parser.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="input side (SAM and ZIM: 1024; smaller for CPU smoke runs)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--attention",
        default="sdpa,sdpa_fold,flex",
        help=f"comma-separated ViT attention backends of the fast ZIM configurations ({', '.join(ATTENTION_BACKENDS)})",
    )
    parser.add_argument("--precision", default="bf16", choices=sorted(speed.PRECISIONS))
    parser.add_argument(
        "--compile",
        default="default",
        choices=("none", *speed.COMPILE_MODES),
        help="torch.compile mode of the fast ZIM configurations ('none': eager)",
    )
    parser.add_argument(
        "--compile-scope",
        default="parts",
        choices=("parts", "calls"),
        help="parts: one graph per submodule (speed.compile_model); calls: encode_image and decode whole "
        "(speed.compile_inference: one CUDA graph per call under reduce-overhead)",
    )
    parser.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW conv weights in the fast path"
    )
    parser.add_argument(
        "--bf16-heads",
        action="store_true",
        help="with --precision bf16, also run the feature pyramid and decoder in bf16 (the predictor keeps "
        "them in float32: speed.set_float32_heads)",
    )
    parser.add_argument("--skip-stock", action="store_true", help="do not measure stock segment-anything")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed calls first (compilation happens here)"
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile this many set_image + one-box calls per configuration (0: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.attention = [a.strip() for a in args.attention.split(",") if a.strip()]
    for backend in args.attention:
        if backend not in ATTENTION_BACKENDS:
            parser.error(f"--attention: {backend!r} is not one of {list(ATTENTION_BACKENDS)}")
    return args


def synthetic_inputs(seed: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 1x3xSxS image (smooth colours plus noise) and 16 boxes Bx4 ``(x1, y1, x2, y2)`` pixels."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, side)
    image = torch.stack(
        [
            ramp[None, :].expand(side, -1),
            ramp[:, None].expand(-1, side),
            ramp.flip(0)[None].expand(side, -1),
        ]
    )
    image = (image + torch.randint(-40, 40, image.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    corners = torch.rand(BATCHED_BOXES, 2, 2, generator=generator) * (side - 1)
    boxes = torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)  # Bx4 (x1, y1, x2, y2)
    return image[None].to(device), boxes.to(device)


def ours_calls(
    zim: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, precision: str
) -> dict[str, Callable[[], object]]:
    """The timed calls for ZIM (state: the last encoded image)."""
    device = image.device
    side = image.shape[-1]
    state: dict[str, object] = {}
    one_coords, one_labels = benchmarking.box_prompts(boxes[:1])
    many_coords, many_labels = benchmarking.box_prompts(boxes)
    size = (side, side)

    @torch.no_grad()
    def set_image() -> None:
        with speed.autocast(device, precision):
            state["encoded"] = zim.encode_image(image)

    @torch.no_grad()
    def decode_alpha(coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embedding, feats = state["encoded"]
        with speed.autocast(device, precision):
            logits, _ = zim.decode(embedding, feats, coords, labels)
        return torch.sigmoid(zim.postprocess_masks(logits.float(), size, size))

    def one_box() -> np.ndarray:
        return decode_alpha(one_coords, one_labels)[0, 0].cpu().numpy()

    def both() -> np.ndarray:
        set_image()
        return one_box()

    return {
        "set_image": set_image,
        "one_box": one_box,
        "set_image_plus_one_box": both,
        "boxes16": lambda: decode_alpha(many_coords, many_labels),
    }


def stock_calls(
    sam: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, precision: str
) -> dict[str, Callable[[], object]]:
    """The timed calls for stock segment-anything through its own SamPredictor."""
    device = image.device
    side = image.shape[-1]
    predictor = SamPredictor(sam)
    one = predictor.transform.apply_boxes_torch(boxes[:1], (side, side))
    many = predictor.transform.apply_boxes_torch(boxes, (side, side))

    def set_image() -> None:
        with speed.autocast(device, precision):
            predictor.set_torch_image(image, (side, side))

    def one_box() -> np.ndarray:
        # SamPredictor.predict's own steps: predict_torch, then the results to NumPy. predict itself
        # cannot convert bf16 scores to NumPy, hence the explicit .float().
        with speed.autocast(device, precision):
            masks, scores, low_res = predictor.predict_torch(None, None, boxes=one, multimask_output=False)
        host = (masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy())
        return host[0]

    def both() -> np.ndarray:
        set_image()
        return one_box()

    def boxes16() -> torch.Tensor:
        with speed.autocast(device, precision):
            masks, _, _ = predictor.predict_torch(None, None, boxes=many, multimask_output=False)
        return masks

    return {"set_image": set_image, "one_box": one_box, "set_image_plus_one_box": both, "boxes16": boxes16}


def _cudagraph_skips() -> int | None:
    """How many times inductor has given up CUDA graphs in this process (None where torch keeps no count)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["inductor"]["cudagraph_skips"])


def run_config(
    name: str,
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    args: argparse.Namespace,
    check: Callable[[], dict[str, object]] | None = None,
) -> dict[str, object]:
    """Time ``calls``; then ``check()``'s fields (the alpha agreement) and the profile, each of which
    failing leaves the timings standing (``alpha_error``, ``profile_error``)."""
    result: dict[str, object] = {"config": name}
    skips_before = _cudagraph_skips()
    try:
        calls["set_image"]()  # the one-box calls need an encoded image
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for key, fn in calls.items():
            result[f"{key}_ms"] = benchmarking.measure_ms(
                fn, device=device, warmup=args.warmup, repeats=args.repeats
            )
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as error:  # one failing configuration (OOM, a compile error) must not hide the others
        result["error"] = benchmarking.describe_error(error)
        return result
    skips = _cudagraph_skips()
    if skips is not None and skips_before is not None and args.compile == "reduce-overhead":
        # inductor falls back to plain compiled code, with only a warning, where it cannot use CUDA
        # graphs: the row's name would still say reduce-overhead
        result["cudagraph_skips"] = skips - skips_before
    if check is not None:  # the alpha agreement, before profiling can get in its way
        try:
            result.update(check())
        except Exception as error:  # noqa: BLE001 (the timings stand; the report says why no alpha)
            result["alpha_error"] = benchmarking.describe_error(error)
    if args.profile:  # a profiler failure (CUPTI, say) costs the profile, not the timings
        try:
            result["profile"] = benchmarking.profile_top_ops(
                calls["set_image_plus_one_box"], device=device, steps=args.profile
            )
        except Exception as error:  # noqa: BLE001
            result["profile_error"] = benchmarking.describe_error(error)
    return result


def build_zim(
    args: argparse.Namespace, device: torch.device, attention: str, *, logit_scale: float = 1.0
) -> torch.nn.Module:
    """The same ZIM for every configuration, with weights under which the alpha agreement means something.

    Random weights alone would make it meaningless: SAM initialises the relative-position tables to
    zero, so the attention backends' handling of the bias (what sdpa, sdpa_fold, flex and triton_relpos
    do differently) would not count at all; and a random decoder's logits stay within about +-0.5, so
    every alpha is near 0.5 and even a broken encoder passes. So the tables are drawn from N(0, 0.5),
    and the mask hypernetworks' last layers (the logits are linear in them) are scaled by
    ``logit_scale``, which :func:`main` picks so that the plain path's logits spread to alphas near 0
    and 1.
    """
    torch.manual_seed(args.seed)
    zim = Zim(**ZIM_VARIANTS[args.model], image_size=args.image_size).eval()
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, parameter in zim.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for mlp in zim.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
            mlp.layers[-1].bias.mul_(logit_scale)
    return speed.set_attention(zim.to(device), attention)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    image, boxes = synthetic_inputs(args.seed, args.image_size, device)
    results: list[dict[str, object]] = []
    report = {
        "benchmark": "predictor_latency",
        "model": args.model,
        "image_size": args.image_size,
        "batched_boxes": BATCHED_BOXES,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile_scope": args.compile_scope,
        "environment": benchmarking.describe_environment(device),
        "results": results,
    }

    def add(result: dict[str, object]) -> None:
        results.append(result)
        report["relpos_tiles"] = relpos_flash.autotuned_choices()  # triton_relpos: the autotuner's choices
        benchmarking.emit_report(report, args.json_out, complete=False)  # a killed run keeps what it measured

    if not args.skip_stock:
        for precision in dict.fromkeys(["fp32", args.precision]):
            torch.manual_seed(args.seed)
            sam = benchmarking.build_stock_sam(args.model, image_size=args.image_size).to(device).eval()
            add(run_config(f"stock_sam/{precision}", stock_calls(sam, image, boxes, precision), device, args))
            del sam
            benchmarking.release_memory(device)

    # the logit scale that spreads the plain path's one-box logits to a standard deviation of LOGIT_STD
    probe = build_zim(args, device, "eager")
    with torch.no_grad():
        embedding, feats = probe.encode_image(image)
        coords, labels = benchmarking.box_prompts(boxes[:1])
        logits, _ = probe.decode(embedding, feats, coords, labels)
    logit_scale = LOGIT_STD / max(float(logits.float().std()), 1e-6)
    report["logit_scale"] = logit_scale
    del probe, embedding, feats, logits
    benchmarking.release_memory(device)

    plain = build_zim(args, device, "eager", logit_scale=logit_scale)
    plain_calls = ours_calls(plain, image, boxes, "fp32")
    add(run_config("zim/eager/fp32", plain_calls, device, args))
    plain_calls["set_image"]()
    plain_alpha = torch.from_numpy(plain_calls["one_box"]())
    # the agreement is judged against the alpha's own spread: MSE 1e-4 means little if alpha barely varies
    report["plain_alpha"] = {
        "variance": plain_alpha.var().item(),
        "fraction_below_0.1": (plain_alpha < 0.1).float().mean().item(),
        "fraction_above_0.9": (plain_alpha > 0.9).float().mean().item(),
    }
    del plain, plain_calls
    benchmarking.release_memory(device)

    for attention in args.attention:
        zim = build_zim(args, device, attention, logit_scale=logit_scale)
        switches = [attention, args.precision]
        if not args.no_channels_last:
            speed.to_channels_last(zim)
            switches.append("channels_last")
        if args.precision == "bf16" and not args.bf16_heads:  # as ZimPredictor(precision="bf16")
            speed.set_float32_heads(zim, True)
            switches.append("fp32_heads")
        if args.compile != "none" and args.compile_scope == "calls":
            speed.compile_inference(zim, mode=args.compile)
            switches.append(f"compile_calls={args.compile}")
        elif args.compile != "none":
            speed.compile_model(zim, mode=args.compile)
            switches.append(f"compile={args.compile}")
        calls = ours_calls(zim, image, boxes, args.precision)

        def alpha_check(calls: dict[str, Callable[[], object]] = calls) -> dict[str, object]:
            calls["set_image"]()
            alpha = torch.from_numpy(calls["one_box"]())
            return {"alpha_mse_vs_plain_fp32": torch.mean((alpha - plain_alpha) ** 2).item()}

        add(run_config("zim/" + "/".join(switches), calls, device, args, check=alpha_check))
        del zim, calls
        torch.compiler.reset()  # drop compiled graphs (and what they hold) before the next configuration
        benchmarking.release_memory(device)

    benchmarking.emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
