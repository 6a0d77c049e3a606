"""One global attention layer of SAM's ViT under each attention backend, measured in one process; prints JSON.

The layer is :class:`~zim_lightning.models.vit_attention.ViTAttention` as in ViT-B's global blocks at 1024
(a 64x64 token grid, 12 heads of width 64, decomposed relative-position bias): qkv projection, the
bias terms, attention, output projection. Per backend it reports

- ``forward_ms``: the layer's forward without autograd (the predictor's case);
- ``train_ms``: forward and backward, gradients for the input and every parameter (the training case);
- ``peak_memory_gib`` of the training call (CUDA only);
- ``attention_tflops``: the attention core's arithmetic over ``train_ms``, counted as FlashAttention does
  (``4 L^2 d`` per head forward; the backward 2.5 times that, as it recomputes ``q k^T``; so 3.5 times
  the forward in all), whatever the backend actually computes (``sdpa_fold``'s wider heads are not
  counted): a rate to compare backends by, on the part they differ in (the projections are the same);
- ``max_error`` of the output and of every gradient against ``eager`` at the same precision, relative
  to the largest reference value;
- ``relpos_tiles`` (``triton_relpos`` on CUDA): the launch settings the autotuner chose.

``--sdpa-kernel`` forces one of PyTorch's fused kernels (flash, memory-efficient, cuDNN) where the
backends call ``scaled_dot_product_attention``: which one serves ``sdpa``'s dense bias or ``sdpa_fold``'s
unequal q/k and v widths fastest is a question for the GPU.

``sdpa_nobias`` is the same layer without the bias (plain flash attention): not SAM's function, but the
ceiling that a fused bias can approach. Weights and inputs are random; the relative-position tables are
drawn too (SAM initialises them to zero, which would hide a wrong bias).

GPU run (an H100)::

    python benchmarks/attention_layer.py --device cuda --json-out attention.json

CPU smoke run (small layer; ``triton_relpos`` takes its ``sdpa_fold`` fallback off CUDA)::

    python benchmarks/attention_layer.py --device cpu --precision fp32 --batch-size 1 --heads 2 --grid 16 \
        --warmup 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from zim_lightning import benchmarking, speed
from zim_lightning.models import relpos_flash
from zim_lightning.models.vit_attention import ATTENTION_BACKENDS, ViTAttention

#: The bias-free layer timed next to the backends (flash attention at head width d).
NO_BIAS = "sdpa_nobias"
#: ``--sdpa-kernel`` choices: PyTorch's own pick, or one of its fused SDPA kernels forced
#: (``torch.nn.attention.sdpa_kernel``) for the backends that call ``scaled_dot_product_attention``.
SDPA_KERNELS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DEFAULT_BACKENDS = ("eager", "sdpa_fold", "flex", "triton_relpos", NO_BIAS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="attention_layer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=sorted(speed.PRECISIONS))
    parser.add_argument("--batch-size", type=int, default=8, help="images (8: the training batch)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (12: ViT-B)")
    parser.add_argument("--head-dim", type=int, default=64, help="head width (64: ViT-B/L, 80: ViT-H)")
    parser.add_argument("--grid", type=int, default=64, help="token grid side (64: 1024 pixels / 16)")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated, from {', '.join((*ATTENTION_BACKENDS, NO_BIAS))}",
    )
    parser.add_argument(
        "--sdpa-kernel",
        default="auto",
        choices=sorted(SDPA_KERNELS),
        help="force one SDPA kernel for sdpa / sdpa_fold / sdpa_nobias (a backend it cannot serve reports "
        "the error); auto: PyTorch's choice",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (autotuning happens here)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - {*ATTENTION_BACKENDS, NO_BIAS})
    if unknown:
        parser.error(f"--backends: unknown {unknown}; expected names from {[*ATTENTION_BACKENDS, NO_BIAS]}")
    # eager first: it is the reference of every later backend's max_error, reported as each one ends
    args.backends.sort(key=lambda backend: backend != "eager")
    return args


def build_layer(args: argparse.Namespace, backend: str, device: torch.device) -> ViTAttention:
    """The layer with seeded weights (the same for every backend) and drawn relative-position tables."""
    torch.manual_seed(args.seed)
    layer = ViTAttention(
        dim=args.heads * args.head_dim,
        num_heads=args.heads,
        use_rel_pos=backend != NO_BIAS,
        input_size=(args.grid, args.grid),
        backend="sdpa" if backend == NO_BIAS else backend,
    )
    if layer.use_rel_pos:
        with torch.no_grad():
            layer.rel_pos_h.normal_(0.0, 0.5)
            layer.rel_pos_w.normal_(0.0, 0.5)
    return layer.to(device)


def attention_flops(args: argparse.Namespace) -> float:
    """Forward FLOPs of the attention core: q k^T and P v, 2 L^2 d each, per head and image."""
    length = args.grid * args.grid
    return 4.0 * length * length * args.head_dim * args.heads * args.batch_size


def measure(args: argparse.Namespace, backend: str, device: torch.device, inputs: dict) -> dict[str, object]:
    layer = build_layer(args, backend, device)
    x, grad_out = inputs["x"], inputs["grad_out"]

    def forward() -> torch.Tensor:
        with torch.no_grad(), speed.autocast(device, args.precision):
            return layer(x)

    def train() -> tuple[torch.Tensor, list[torch.Tensor]]:
        x_grad = x.detach().requires_grad_()
        with speed.autocast(device, args.precision):
            out = layer(x_grad)
        params = [x_grad, *layer.parameters()]
        grads = torch.autograd.grad(out, params, grad_out.to(out.dtype))
        return out, list(grads)

    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    result: dict[str, object] = {"backend": backend}
    result["forward_ms"] = benchmarking.measure_ms(forward, **timing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["train_ms"] = benchmarking.measure_ms(train, **timing)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["attention_tflops"] = 3.5 * attention_flops(args) / (result["train_ms"]["median"] * 1e-3) / 1e12
    if backend == "triton_relpos":
        result["kernel_ran"] = relpos_flash.kernel_available(device, args.grid)
        result["relpos_tiles"] = relpos_flash.autotuned_choices()
    out, grads = train()
    names = ["out", "grad_x", *(f"grad_{name}" for name, _ in layer.named_parameters())]
    # on the host: kept on the GPU, they would raise every later backend's peak memory
    result["_outputs"] = dict(zip(names, (t.detach().float().cpu() for t in (out, *grads)), strict=True))
    return result


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference of each tensor, relative to the largest reference value."""
    return {
        name: float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        for name, ref in want.items()
    }


def run(args: argparse.Namespace, backend: str, device: torch.device, inputs: dict) -> dict[str, object]:
    kernel = SDPA_KERNELS[args.sdpa_kernel]
    try:
        with contextlib.nullcontext() if kernel is None else sdpa_kernel([kernel]):
            return measure(args, backend, device, inputs)
    except Exception as error:  # one failing backend must not lose the others' figures
        return {"backend": backend, "error": benchmarking.describe_error(error)}
    finally:
        benchmarking.release_memory(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch_size, args.grid, args.grid, args.heads * args.head_dim)
    inputs = {
        "x": torch.randn(shape, generator=generator),
        "grad_out": torch.randn(shape, generator=generator),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    results: list[dict[str, object]] = []
    report = {
        "benchmark": "attention_layer",
        "precision": args.precision,
        "sdpa_kernel": args.sdpa_kernel,
        "batch_size": args.batch_size,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "grid": args.grid,
        "attention_gflops_forward": attention_flops(args) / 1e9,
        "environment": benchmarking.describe_environment(device),
        "results": results,
    }
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for backend in args.backends:  # eager first (the reference)
        result = run(args, backend, device, inputs)
        if "_outputs" in result:
            outputs[backend] = result.pop("_outputs")
        if "eager" in outputs and backend in outputs and backend != NO_BIAS:
            result["max_error"] = relative_errors(outputs[backend], outputs["eager"])
        print(f"[attention_layer] {result}", file=sys.stderr)
        results.append(result)
        benchmarking.emit_report(report, args.json_out, complete=False)
    benchmarking.emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
