"""Compile the Triton relative-position attention kernels for a GPU without one; prints JSON.

``zim_lightning.models.relpos_flash`` holds three kernels (forward, backward dq pass, backward dk/dv
pass). Triton can compile them ahead of time for any NVIDIA architecture on a machine with no GPU: the
PTX comes from Triton's own compiler and the machine code from the ``ptxas`` shipped in Triton's wheel.
For each kernel and launch configuration this script reports what ``ptxas -v`` says and what that
implies, without running anything:

- ``registers`` per thread, and ``spill_stores`` / ``spill_loads`` in bytes (spilled registers go to
  local memory, which is slow: a tile configuration that spills is a bad one);
- ``shared_bytes`` per program (the software pipeline's buffers);
- ``tensor_cores``: the matrix instructions in the PTX (``wgmma`` on Hopper, ``mma`` before);
- ``programs_per_sm``: how many programs of this configuration fit on one SM at once, the minimum over
  registers, shared memory and threads (an occupancy estimate, not a speed).

Arguments are specialised as at run time on contiguous CUDA tensors (pointers and the integers L, d and
H divisible by 16), so the code is the one a launch on that GPU would compile. What this cannot tell is
the speed: ``benchmarks/train_throughput.py`` and ``predictor_latency.py`` measure that on a GPU.

    python benchmarks/kernel_resources.py                       # the module's tile settings, sm_90
    python benchmarks/kernel_resources.py --arch 80 90 --dtype bf16 fp16 --head-dim 64 80
    python benchmarks/kernel_resources.py --configs candidates  # every autotuning candidate
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zim_lightning import benchmarking
from zim_lightning.models import relpos_flash

#: Per-SM limits of the architectures this script knows: registers, shared memory a program may use,
#: shared memory per SM, resident threads (CUDA programming guide, "Compute capabilities").
ARCHS: dict[int, dict[str, int]] = {
    80: {"registers": 65536, "shared_per_program": 163 * 1024, "shared_per_sm": 164 * 1024, "threads": 2048},
    86: {"registers": 65536, "shared_per_program": 99 * 1024, "shared_per_sm": 100 * 1024, "threads": 1536},
    89: {"registers": 65536, "shared_per_program": 99 * 1024, "shared_per_sm": 100 * 1024, "threads": 1536},
    90: {"registers": 65536, "shared_per_program": 227 * 1024, "shared_per_sm": 228 * 1024, "threads": 2048},
}
#: Shared memory the driver reserves per program (CUDA 11+).
RESERVED_SHARED = 1024
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")  # the keys of relpos_flash's kernels, in launch order
#: Scalar arguments of the kernels, by name (pointer arguments are the capitalised ones).
FLOAT_ARGS = frozenset({"sm_scale", "qk_scale"})
INT_ARGS = frozenset({"length", "head_dim", "rows", "width", "sequences"})
#: Pointer arguments that are float32 whatever the input dtype (softmax statistics).
FLOAT32_POINTERS = frozenset({"LSE", "DELTA"})


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    width: int
    block_m: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    tensor_cores: str
    programs_per_sm: int


def kernel_function(name: str):
    """The Triton kernel ``name`` (its plain form; the module also holds an autotuned wrapper of it)."""
    return relpos_flash._KERNELS[name][0]


def signature(kernel, dtype: str, ints: dict[str, int]) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Triton's signature of ``kernel`` for inputs of ``dtype``, and the divisibility hints a launch with
    the integer arguments ``ints`` (name -> value) would get: aligned pointers, integers divisible by 16.

    Raises:
        ValueError: an argument this script does not know how to type (the kernel changed).
    """
    types: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    divisible = [["tt.divisibility", 16]]
    for index, name in enumerate(kernel.arg_names):
        if index in kernel.constexprs:
            types[name] = "constexpr"
        elif name in FLOAT_ARGS:
            types[name] = "fp32"
        elif name in INT_ARGS:
            types[name] = "i32"
            if ints[name] % 16 == 0 and name != "sequences":  # the kernels do not specialise on it
                attrs[(index,)] = divisible
        elif name[:1].isupper():
            types[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{DTYPES[dtype]}"
            attrs[(index,)] = divisible  # PyTorch's allocations are 16-byte aligned
        else:
            raise ValueError(f"{kernel.__name__}: argument {name!r} has no known type; update signature()")
    return types, attrs


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def programs_per_sm(arch: int, *, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident programs per SM, limited by registers (allocated per warp in units of 256), shared memory
    and threads; 0 when one program does not fit."""
    limits = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * num_warps)
    by_threads = limits["threads"] // (32 * num_warps)
    if shared_bytes > limits["shared_per_program"]:
        return 0
    by_shared = limits["shared_per_sm"] // (shared_bytes + RESERVED_SHARED)
    return min(by_registers, by_threads, by_shared)


def compile_kernel(
    kernel_name: str,
    *,
    arch: int,
    dtype: str,
    head_dim: int,
    width: int,
    block_m: int,
    num_warps: int,
    num_stages: int,
) -> Resources:
    """Compile one kernel for ``sm_<arch>`` (no GPU needed) and read its resources off ``ptxas -v``."""
    kernel = kernel_function(kernel_name)
    # A square W x W grid (SAM's global blocks), 8 images x 12 heads (sequences: a tuning key, unused).
    ints = {"length": width * width, "head_dim": head_dim, "rows": width, "width": width, "sequences": 96}
    types, attrs = signature(kernel, dtype, ints)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    constexprs = {
        "BLOCK_M": block_m,
        **relpos_flash.kernel_constexprs(width=width, head_dim=head_dim, dtype=torch_dtype),
    }
    source = ASTSource(fn=kernel, signature=types, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # A fresh cache, so ptxas runs (a cached kernel would skip it) and prints its report here.
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        with triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
            triton.knobs.cache.dir = cache
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": num_warps, "num_stages": num_stages},
            )
    report = log.getvalue()
    spills, used = _PTXAS_SPILLS.search(report), _PTXAS_REGISTERS.search(report)
    if spills is None or used is None:
        raise RuntimeError(f"{kernel_name}: no resource report from ptxas in:\n{report}")
    ptx = compiled.asm["ptx"]
    tensor_cores = "wgmma" if "wgmma" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
    registers, shared = int(used.group(1)), int(compiled.metadata.shared)
    return Resources(
        kernel=kernel_name,
        arch=arch,
        dtype=dtype,
        head_dim=head_dim,
        width=width,
        block_m=block_m,
        num_warps=num_warps,
        num_stages=num_stages,
        registers=registers,
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        shared_bytes=shared,
        tensor_cores=tensor_cores,
        programs_per_sm=programs_per_sm(arch, registers=registers, shared_bytes=shared, num_warps=num_warps),
    )


def launch_configs(kernel_name: str, which: str) -> list[tuple[int, int, int]]:
    """(block_m, num_warps, num_stages) to compile: the module's defaults, or its autotuning candidates."""
    if which == "default":
        tiles = [relpos_flash.FWD_TILE if kernel_name == "fwd" else relpos_flash.BWD_TILE]
    else:
        tiles = relpos_flash.tuning_candidates(kernel_name)
    return [(t.block_m, t.num_warps, t.num_stages) for t in tiles]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kernel_resources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64], help="64: ViT-B/L; 80: ViT-H")
    parser.add_argument(
        "--width", type=int, default=64, help="token grid side W, square grid (64: SAM at 1024)"
    )
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument(
        "--configs",
        default="default",
        choices=("default", "candidates"),
        help="the module's tile settings, or every autotuning candidate of relpos_flash.tuning_candidates",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if relpos_flash.triton is None:
        print("kernel_resources: Triton is not installed", file=sys.stderr)
        return 1
    if not relpos_flash.key_block_supported(args.width):
        print(f"kernel_resources: --width {args.width} is not a width the kernel takes", file=sys.stderr)
        return 2
    results = []
    for arch in args.arch:
        for dtype in args.dtype:
            for head_dim in args.head_dim:
                for kernel_name in args.kernels:
                    for block_m, num_warps, num_stages in launch_configs(kernel_name, args.configs):
                        res = compile_kernel(
                            kernel_name,
                            arch=arch,
                            dtype=dtype,
                            head_dim=head_dim,
                            width=args.width,
                            block_m=block_m,
                            num_warps=num_warps,
                            num_stages=num_stages,
                        )
                        results.append(asdict(res))
                        print(
                            f"[kernel_resources] sm_{arch} {dtype} d={head_dim} {kernel_name} "
                            f"block_m={block_m} warps={num_warps} stages={num_stages}: {res.registers} regs, "
                            f"{res.spill_stores} B spilled, {res.shared_bytes} B shared, "
                            f"{res.programs_per_sm}/SM",
                            file=sys.stderr,
                        )
    report = {"triton": triton.__version__, "width": args.width, "configs": args.configs, "results": results}
    benchmarking.emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
