"""Fused attention with SAM's decomposed relative-position bias, in Triton (ZIM paper, Sec. 3.3: ZIM keeps
SAM's ViT encoder; this is a faster kernel for the same function in its global blocks).

For queries and keys on one row-major HxW token grid (L = H*W tokens) the attention logits are

    logit[i, j] = scale * q_i . k_j + rel_h[i, j // W] + rel_w[i, j % W]

(see :func:`~zim_lightning.models.vit_attention.decomposed_rel_pos_terms`). The kernels below are a
flash-attention style computation of ``softmax(logit) @ v`` and of its gradients that never store an
LxL tile outside registers:

- **Key blocks are image rows.** A key block holds the W keys of one grid row, so in key block ``n``
  the bias is ``rel_h[i, n]`` (one column, broadcast over the block) plus the whole ``rel_w[i, :]``
  tile, which a query block loads once. W may be [:data:`MIN_WIDTH`, :data:`MAX_WIDTH`]: SAM's global
  grid at 256 to 2048 pixels (W = 16 to 128) and its 14x14 windows. The tile is the next power of two
  (:func:`key_block`, at least 16); its padding keys are masked to zero probability, a cost only rows
  whose width is not a power of two pay (a compile-time switch).
- **Forward** (one program per query block): online softmax over the H key rows, output and the
  per-query log-sum-exp (base 2) saved for the backward pass.
- **Backward, dq pass** (one program per query block, loop over key rows): ``dS = P * (dP - delta)``
  with ``delta = rowsum(dO * O)``; ``dq += dS @ k``; ``d_rel_w`` is ``dS`` summed over the key rows, kept
  in registers; ``d_rel_h[:, n]`` is the row sum of ``dS`` of key row ``n``, stored directly. Every
  output element has exactly one writer: no atomics. The row term and its gradient are laid out H x L
  inside the op, so the column of key row ``n`` is contiguous over the queries (coalesced accesses).
- **Backward, dk/dv pass** (one program per key row, loop over query blocks): ``dv += P^T @ dO``,
  ``dk += dS^T @ q``; P is recomputed from the saved log-sum-exp.

Head widths that are not a power of two (80 in ViT-H) are padded to the next one with load/store masks;
all accumulation is float32, inputs are float32, bfloat16 or float16 (one dtype for all five).
Float32 inputs use IEEE float32 products (not TF32), so the kernel matches the eager reference.

On CUDA each kernel's tile size, warps and pipeline depth are chosen by Triton's autotuner among
:func:`tuning_candidates` the first time a problem size is seen (a few seconds, which synchronise the
GPU: under CUDA graphs, run an uncaptured call first, as ``torch.compile``'s ``reduce-overhead`` mode
does; ``ZIM_RELPOS_AUTOTUNE=0`` keeps the defaults). ``benchmarks/kernel_resources.py`` compiles every candidate for a GPU on a machine
without one and reports registers, spills and shared memory.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in
the environment before this module is imported: Triton reads it when the kernels are decorated). The
op is registered with :func:`torch.library.custom_op` (with a fake implementation and an autograd
formula), so ``torch.compile`` keeps it in the graph as one opaque call, no graph break, and never
traces into the Triton code.
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with PyTorch's CUDA wheels only; elsewhere the kernel is unavailable.
    triton = None
    tl = None

#: Triton's interpreter was requested when this module was imported (then the kernels run on CPU tensors).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on", "y"}

#: Grid widths W the kernel takes (a key block is one grid row, held in a tile of :func:`key_block` keys):
#: ``tl.dot`` needs tiles of at least 16 keys, so narrower rows are padded (14 -> 16 in SAM's windows; below
#: 8 most of the tile would be padding), and the dq pass keeps a BLOCK_M x tile float32 ``d_rel_w`` tile in
#: registers, which caps W.
MIN_WIDTH = 8
MAX_WIDTH = 128
#: The smallest key tile (``tl.dot``'s minimum).
MIN_KEY_BLOCK = 16
#: The most B*heads sequences one launch takes: they run on the grid's second axis, which CUDA caps at
#: 65535 (in the windowed blocks B counts windows: 25 per ViT-B image at 1024, so 218 images).
MAX_SEQUENCES = 65535


@dataclass(frozen=True)
class TileConfig:
    """How one kernel is launched: queries per program (or per loop step of the dk/dv pass), warps per
    program and software-pipelining depth of its main loop."""

    block_m: int
    num_warps: int
    num_stages: int


# Launch settings for an H100 with ViT-B's global blocks (W = 64, d = 64). The defaults are common
# flash-attention settings for head width 64 (a 128-query forward tile over 64 keys in 8 warps; the
# backward holds about twice the live tiles, so 64 queries). In bf16 and fp16 at W = 64, every candidate
# compiles for sm_90 at d = 64 without spilling registers; at d = 80 (padded to 128) the defaults do not
# spill but some other candidates do (benchmarks/kernel_resources.py; tests/test_benchmarks.py checks
# both). float32 inputs and W = 128 spill with most settings. Which one is fastest is for the autotuner
# to measure on the GPU; a spilling setting is simply slower.
#: Forward kernel, when not autotuned.
FWD_TILE = TileConfig(block_m=128, num_warps=8, num_stages=3)
#: Both backward passes, when not autotuned.
BWD_TILE = TileConfig(block_m=64, num_warps=8, num_stages=2)
_CANDIDATES: dict[str, tuple[TileConfig, ...]] = {
    "fwd": (
        FWD_TILE,
        TileConfig(block_m=128, num_warps=8, num_stages=4),
        TileConfig(block_m=128, num_warps=4, num_stages=3),
        TileConfig(block_m=64, num_warps=4, num_stages=3),
        TileConfig(block_m=64, num_warps=4, num_stages=4),
    ),
    "bwd_dq": (
        BWD_TILE,
        TileConfig(block_m=64, num_warps=8, num_stages=3),
        TileConfig(block_m=64, num_warps=4, num_stages=2),
        TileConfig(block_m=128, num_warps=8, num_stages=2),
        TileConfig(block_m=32, num_warps=4, num_stages=2),
    ),
    "bwd_dkv": (
        BWD_TILE,
        TileConfig(block_m=64, num_warps=4, num_stages=2),
        TileConfig(block_m=64, num_warps=4, num_stages=3),
        TileConfig(block_m=128, num_warps=8, num_stages=2),
        TileConfig(block_m=32, num_warps=4, num_stages=3),
    ),
}
#: Pick each kernel's launch settings among :func:`tuning_candidates` by timing them on the GPU, once per
#: shape and dtype (Triton's autotuner); False keeps :data:`FWD_TILE` and :data:`BWD_TILE`.
AUTOTUNE: bool = os.environ.get("ZIM_RELPOS_AUTOTUNE", "1").strip().lower() not in {"0", "false", "no", "off"}


def tuning_candidates(kernel: str) -> tuple[TileConfig, ...]:
    """The launch settings the autotuner times for ``kernel`` ("fwd", "bwd_dq" or "bwd_dkv")."""
    if kernel not in _CANDIDATES:
        raise ValueError(f"kernel: expected one of {sorted(_CANDIDATES)}, got {kernel!r}")
    return _CANDIDATES[kernel]


_LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), exp2 is the fast hardware op
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def key_block_supported(width: int) -> bool:
    """Whether a grid ``width`` (tokens per row) can be one key block of the kernel."""
    return MIN_WIDTH <= width <= MAX_WIDTH


def key_block(width: int) -> int:
    """Keys per tile for a grid row of ``width`` keys: the next power of two, at least
    :data:`MIN_KEY_BLOCK`; the keys past ``width`` are masked out."""
    return max(MIN_KEY_BLOCK, 1 << (width - 1).bit_length())


class KernelResourcesError(RuntimeError):
    """No launch setting of a kernel fits the GPU (shared memory, registers) for these inputs."""


#: (device, dtype, head_dim, width) where a launch found no setting that fits: the kernel is not tried
#: again there (see :func:`mark_unfit`).
_UNFIT: set[tuple[str, torch.dtype, int, int]] = set()


def kernel_available(
    device: torch.device,
    width: int,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    sequences: int = 1,
) -> bool:
    """Whether the Triton kernel can run on ``device`` for a grid ``width`` tokens wide.

    True on CUDA (Triton installed), or on any device under Triton's interpreter, and only for widths of
    :func:`key_block_supported`, inputs in float32, bfloat16 or float16 (``dtype``, when given), at most
    :data:`MAX_SEQUENCES` B*heads ``sequences``. Callers fall back to another path where this is False
    (and, outside compiled code, where :func:`marked_unfit` says so).
    """
    if triton is None or not key_block_supported(width) or sequences > MAX_SEQUENCES:
        return False
    if dtype is not None and dtype not in _DTYPES:
        return False
    return device.type == "cuda" or INTERPRETED


def marked_unfit(device: torch.device, *, dtype: torch.dtype, head_dim: int, width: int) -> bool:
    """Whether a launch on ``device`` found no setting that fits these inputs (:func:`mark_unfit`)."""
    return (str(device), dtype, head_dim, width) in _UNFIT


def mark_unfit(device: torch.device, *, dtype: torch.dtype, head_dim: int, width: int) -> None:
    """Remember that the kernel does not fit ``device`` for these inputs (for :func:`marked_unfit`)."""
    _UNFIT.add((str(device), dtype, head_dim, width))


if triton is not None:
    # The forward and dq kernels repeat their first dozen lines (offsets, masks, q and rel_w tiles) and the
    # key-row loads. Moving those into @triton.jit helpers was tried: every kernel still compiled, but
    # ptxas allocated registers differently (the default dq tile went from 181 to 209 registers), so they
    # stay inline until a GPU can time both forms.

    @triton.jit(do_not_specialize=["sequences"])
    def _relpos_fwd_kernel(
        Q, K, V, RHT, RW, Out, LSE,
        qk_scale, length, head_dim, rows, width, sequences,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):  # fmt: skip
        """Q, K, V, Out: (B*heads)xLxd; RHT: (B*heads)xHxL; RW: (B*heads)xLxW; LSE: (B*heads)xL float32.

        A key block is one grid row of ``width`` keys in a tile of BLOCK_N (``EVEN_N``: they are equal,
        and no key needs masking). ``sequences`` (B*heads, the grid's second axis) is unused in the body:
        it is an autotuning key, since how many programs fill the GPU decides which tile is fastest (and it
        is not specialised on, so a new batch size re-times the tiles without recompiling them)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < length
        key_ok = offs_n < (BLOCK_N if EVEN_N else width)
        d_ok = offs_d < head_dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        qd_offs = offs_m[:, None] * head_dim + offs_d[None, :]
        seq_base = bh * length * head_dim
        row_len = BLOCK_N if EVEN_N else width

        q = tl.load(Q + seq_base + qd_offs, mask=q_mask, other=0.0)
        # The column term of every key row, in the base-2 logit units used below.
        rel_w = (
            tl.load(
                RW + bh * length * row_len + offs_m[:, None] * row_len + offs_n[None, :],
                mask=row_ok[:, None] & key_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            * 1.4426950408889634
        )
        rh_ptrs = RHT + bh * rows * length + offs_m  # row term of key row n: contiguous over the queries

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n in range(0, rows):
            kv_offs = seq_base + (n * row_len + offs_n)[:, None] * head_dim + offs_d[None, :]
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            rel_h = tl.load(rh_ptrs + n * length, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + rel_h[:, None] + rel_w
            if not EVEN_N:  # padding keys of the tile take no probability
                s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + seq_base + qd_offs, acc.to(Out.dtype.element_ty), mask=q_mask)
        tl.store(LSE + bh * length + offs_m, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit(do_not_specialize=["sequences"])
    def _relpos_bwd_dq_kernel(
        Q, K, V, RHT, RW, DO, LSE, DELTA, DQ, DRHT, DRW,
        sm_scale, qk_scale, length, head_dim, rows, width, sequences,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):  # fmt: skip
        """dq, d_rel_h and d_rel_w of one query block: a loop over all key rows, one writer per output."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < length
        key_ok = offs_n < (BLOCK_N if EVEN_N else width)
        d_ok = offs_d < head_dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        qd_offs = offs_m[:, None] * head_dim + offs_d[None, :]
        seq_base = bh * length * head_dim
        row_len = BLOCK_N if EVEN_N else width
        rw_offs = bh * length * row_len + offs_m[:, None] * row_len + offs_n[None, :]
        rw_mask = row_ok[:, None] & key_ok[None, :]

        q = tl.load(Q + seq_base + qd_offs, mask=q_mask, other=0.0)
        do = tl.load(DO + seq_base + qd_offs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * length + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * length + offs_m, mask=row_ok, other=0.0)
        rel_w = tl.load(RW + rw_offs, mask=rw_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        rh_offs = bh * rows * length + offs_m  # (B*heads)xHxL: contiguous over the queries

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        d_rel_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for n in range(0, rows):
            kv_offs = seq_base + (n * row_len + offs_n)[:, None] * head_dim + offs_d[None, :]
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            rel_h = (
                tl.load(RHT + rh_offs + n * length, mask=row_ok, other=0.0).to(tl.float32)
                * 1.4426950408889634
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + rel_h[:, None] + rel_w
            if not EVEN_N:  # padding keys: P = 0, so dS = 0
                s = tl.where(key_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # gradient of the natural-unit logits
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            d_rel_w += ds
            tl.store(DRHT + rh_offs + n * length, tl.sum(ds, 1).to(DRHT.dtype.element_ty), mask=row_ok)
        tl.store(DQ + seq_base + qd_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
        tl.store(DRW + rw_offs, d_rel_w.to(DRW.dtype.element_ty), mask=rw_mask)

    @triton.jit(do_not_specialize=["sequences"])
    def _relpos_bwd_dkv_kernel(
        Q, K, V, RHT, RW, DO, LSE, DELTA, DK, DV,
        sm_scale, qk_scale, length, head_dim, rows, width, sequences,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):  # fmt: skip
        """dk and dv of one key row (W keys in a BLOCK_N tile): a loop over all query blocks.

        The padding keys of the tile (not EVEN_N) load as zeros and get a nonzero P here, but P of key j
        only reaches dk and dv of key j, and those rows are not stored: nothing needs masking but the
        loads and the stores."""
        row = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        key_ok = offs_n < (BLOCK_N if EVEN_N else width)
        d_ok = offs_d < head_dim
        seq_base = bh * length * head_dim
        row_len = BLOCK_N if EVEN_N else width
        kv_offs = seq_base + (row * row_len + offs_n)[:, None] * head_dim + offs_d[None, :]
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, length, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < length
            q_mask = row_ok[:, None] & d_ok[None, :]
            qd_offs = seq_base + offs_m[:, None] * head_dim + offs_d[None, :]
            # Rows past L load zeros (q = dO = 0, lse = delta = 0), so their dS and dO are zero and they
            # add nothing to dk or dv.
            q = tl.load(Q + qd_offs, mask=q_mask, other=0.0)
            do = tl.load(DO + qd_offs, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * length + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * length + offs_m, mask=row_ok, other=0.0)
            rel_h = tl.load(RHT + (bh * rows + row) * length + offs_m, mask=row_ok, other=0.0)
            rel_w = tl.load(
                RW + bh * length * row_len + offs_m[:, None] * row_len + offs_n[None, :],
                mask=row_ok[:, None] & key_ok[None, :],
                other=0.0,
            )
            bias = (rel_h.to(tl.float32)[:, None] + rel_w.to(tl.float32)) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)

    # Triton >= 3.4 can keep the autotuner's timings on disk.
    _AUTOTUNE_CACHE = (
        {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    )

    def _autotuned(kernel, name: str):
        configs = [
            triton.Config({"BLOCK_M": c.block_m}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in _CANDIDATES[name]
        ]
        # Re-tuned per problem: L, d, H, W, the number of sequences B*heads (how many programs fill the GPU)
        # and the dtypes. Triton >= 3.4 caches the timings on disk with the compiled kernels, so later
        # processes skip them. Outputs are overwritten whole on every run, so timing a configuration leaves
        # nothing to reset. The dk/dv pass sums over query blocks of the chosen size, so another choice
        # changes its gradients at round-off level.
        return triton.autotune(
            configs=configs, key=["length", "head_dim", "rows", "width", "sequences"], **_AUTOTUNE_CACHE
        )(kernel)

    _KERNELS = {
        "fwd": (_relpos_fwd_kernel, _autotuned(_relpos_fwd_kernel, "fwd")),
        "bwd_dq": (_relpos_bwd_dq_kernel, _autotuned(_relpos_bwd_dq_kernel, "bwd_dq")),
        "bwd_dkv": (_relpos_bwd_dkv_kernel, _autotuned(_relpos_bwd_dkv_kernel, "bwd_dkv")),
    }


def kernel_constexprs(*, width: int, head_dim: int, dtype: torch.dtype) -> dict[str, object]:
    """The compile-time constants of every kernel but the tile size, for a grid ``width`` keys wide, a head
    width and an input dtype (launches here; ``benchmarks/kernel_resources.py`` compiles with the same)."""
    block_n = key_block(width)
    return {
        "BLOCK_N": block_n,
        "EVEN_N": block_n == width,
        "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
        # TF32 would cost float32 inputs ~1e-3 relative error against the float32 reference.
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _launch(
    name: str, grid, args: tuple, *, block_m: int, head_dim: int, dtype: torch.dtype, width: int
) -> None:
    """Launch kernel ``name`` autotuned (``block_m`` 0, :data:`AUTOTUNE` on, not interpreted) or with fixed
    tiles (``block_m`` queries, else the default tile's)."""
    fixed, tuned = _KERNELS[name]
    constexprs = kernel_constexprs(width=width, head_dim=head_dim, dtype=dtype)
    try:
        if block_m == 0 and AUTOTUNE and not INTERPRETED:
            tuned[grid](*args, **constexprs)
            return
        tile = FWD_TILE if name == "fwd" else BWD_TILE
        fixed[grid](
            *args,
            BLOCK_M=block_m or tile.block_m,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **constexprs,
        )
    except triton.runtime.errors.OutOfResources as error:
        # The settings are tuned for an H100 (sm_90, 227 KiB of shared memory per program) in bf16/fp16;
        # GPUs with less shared memory, float32 inputs and wide grids can need more than a GPU has.
        raise KernelResourcesError(
            f"relpos_flash: the {name} kernel does not fit this GPU for {dtype} inputs, head width "
            f"{head_dim}, grid width {width} ({error}); use the 'sdpa_fold' attention backend here "
            "(benchmarks/kernel_resources.py shows each setting's shared memory)"
        ) from error


def autotuned_choices() -> list[dict[str, object]]:
    """The launch settings the autotuner has chosen in this process, one entry per kernel and tuning key
    (``key``: L, d, H, B*heads, W and the argument dtypes), for benchmark reports. Empty before any tuned launch."""
    if triton is None:
        return []
    choices = []
    for name, (_, tuner) in _KERNELS.items():
        for key, config in tuner.cache.items():
            choices.append(
                {
                    "kernel": name,
                    "key": [str(part) for part in key],
                    "block_m": config.kwargs["BLOCK_M"],
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                }
            )
    return choices


def _on_device_of(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


@torch.library.custom_op("zim_lightning::relpos_flash_fwd", mutates_args=())
def _relpos_flash_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h_t: Tensor,
    rel_w: Tensor,
    scale: float,
    block_m: int,
    bwd_block_m: int,
) -> tuple[Tensor, Tensor]:
    """Output and base-2 log-sum-exp; ``rel_h_t`` is Bxheadsx H x L (row term, transposed), block sizes 0
    mean autotuned."""
    q, k, v, rel_h_t, rel_w = (t.contiguous() for t in (q, k, v, rel_h_t, rel_w))
    batch, heads, length, head_dim = q.shape
    rows, width = rel_h_t.shape[-2], rel_w.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    args = (q, k, v, rel_h_t, rel_w, out, lse, scale * _LOG2E, length, head_dim, rows, width, batch * heads)
    with _on_device_of(q):
        _launch(
            "fwd",
            lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads),
            args,
            block_m=block_m,
            head_dim=head_dim,
            dtype=q.dtype,
            width=width,
        )
    return out, lse


@_relpos_flash_fwd.register_fake
def _(q, k, v, rel_h_t, rel_w, scale, block_m, bwd_block_m):
    batch, heads, length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=torch.float32)


@torch.library.custom_op("zim_lightning::relpos_flash_bwd", mutates_args=())
def _relpos_flash_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h_t: Tensor,
    rel_w: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    block_m: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, ``rel_h_t`` (Bxheadsx H x L) and rel_w."""
    q, k, v, rel_h_t, rel_w, out, lse = (t.contiguous() for t in (q, k, v, rel_h_t, rel_w, out, lse))
    grad_out = grad_out.to(q.dtype).contiguous()
    batch, heads, length, head_dim = q.shape
    rows, width = rel_h_t.shape[-2], rel_w.shape[-1]
    delta = (grad_out.float() * out.float()).sum(-1)  # Bxheadsx L: rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_rel_h_t, d_rel_w = torch.empty_like(rel_h_t), torch.empty_like(rel_w)
    inputs = (q, k, v, rel_h_t, rel_w, grad_out, lse, delta)
    scalars = (scale, scale * _LOG2E, length, head_dim, rows, width, batch * heads)
    settings = dict(block_m=block_m, head_dim=head_dim, dtype=q.dtype, width=width)
    with _on_device_of(q):
        _launch(
            "bwd_dq",
            lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads),
            (*inputs, dq, d_rel_h_t, d_rel_w, *scalars),
            **settings,
        )
        _launch("bwd_dkv", (rows, batch * heads), (*inputs, dk, dv, *scalars), **settings)
    return dq, dk, dv, d_rel_h_t, d_rel_w


@_relpos_flash_bwd.register_fake
def _(grad_out, q, k, v, rel_h_t, rel_w, out, lse, scale, block_m):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, rel_h_t, rel_w))  # contiguous, like the real outputs


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h_t, rel_w, scale, _, bwd_block_m = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_h_t, rel_w, out, lse)
    ctx.scale = scale
    ctx.bwd_block_m = bwd_block_m
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
    q, k, v, rel_h_t, rel_w, out, lse = ctx.saved_tensors
    grads = _relpos_flash_bwd(grad_out, q, k, v, rel_h_t, rel_w, out, lse, ctx.scale, ctx.bwd_block_m)
    return (*grads, None, None, None)


_relpos_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, *, scale: float, block_m: int | None = None
) -> Tensor:
    """``softmax(scale * q k^T + bias) v`` with SAM's decomposed relative-position bias, fused in Triton.

    The bias of query i for key j is ``rel_h[..., i, j // W] + rel_w[..., i, j % W]`` (tokens row-major on
    an HxW grid). Differentiable in q, k, v, rel_h and rel_w. This function always runs the kernel, so it
    needs CUDA tensors (or Triton's interpreter, see the module docstring) and a grid width W accepted by
    :func:`key_block_supported`; :class:`~zim_lightning.models.vit_attention.ViTAttention`'s
    ``"triton_relpos"`` backend checks :func:`kernel_available` and otherwise takes its ``"sdpa_fold"`` path.

    Args:
        q: Bxheadsx(H*W)xd queries, unscaled.
        k: Bxheadsx(H*W)xd keys.
        v: Bxheadsx(H*W)xd values.
        rel_h: Bxheadsx(H*W)xH row term of the bias (logit units).
        rel_w: Bxheadsx(H*W)xW column term of the bias (logit units).
        scale: the factor of ``q . k`` (``d ** -0.5`` in SAM).
        block_m: queries per program, forward and backward, with the default warps and stages (a power of
            two >= 16; small values are for tests). None: each kernel's launch settings are autotuned on
            CUDA among :func:`tuning_candidates` (or, with :data:`AUTOTUNE` off or under the interpreter,
            :data:`FWD_TILE` and :data:`BWD_TILE`).

    Returns:
        Bxheadsx(H*W)xd in the dtype of ``q`` (k, v, rel_h and rel_w are cast to it).

    Raises:
        ValueError: shapes that disagree, or a W or block_m the kernel does not take.
        TypeError: a dtype other than float32, bfloat16 or float16.
        RuntimeError: Triton is missing, or the tensors are not on CUDA and the interpreter is off.
    """
    if q.dim() != 4:
        raise ValueError(f"q: expected Bxheadsx(H*W)xd (4 dims), got shape {tuple(q.shape)}")
    batch, heads, length, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    rows, width = rel_h.shape[-1], rel_w.shape[-1]
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if t.shape[:-1] != (batch, heads, length):
            raise ValueError(
                f"{name}: expected Bxheadsx(H*W)x{'H' if name == 'rel_h' else 'W'} with "
                f"B, heads, L = {batch}, {heads}, {length} (from q), got {tuple(t.shape)}"
            )
    if rows * width != length:
        raise ValueError(
            f"rel_h, rel_w: expected L = H * W tokens (a row-major HxW grid), got L={length} tokens in q "
            f"but H={rows} (rel_h.shape[-1]) and W={width} (rel_w.shape[-1])"
        )
    if not key_block_supported(width):
        raise ValueError(
            f"rel_w: the grid width W must be in [{MIN_WIDTH}, {MAX_WIDTH}] (one key block per grid row), "
            f"got W={width}"
        )
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected float32, bfloat16 or float16, got {q.dtype}")
    if triton is None:
        raise RuntimeError("relpos_attention needs Triton, which is not installed")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"relpos_attention runs on CUDA tensors, got {q.device.type} (set TRITON_INTERPRET=1 before "
            "importing zim_lightning to run Triton's interpreter on CPU)"
        )
    # Contiguous here, once: the op saves its inputs for the backward pass as they come, so a strided q
    # (a view of the qkv projection) would otherwise be copied again there. The kernels read the row term
    # as H x L, contiguous over the queries of one key row (coalesced loads, and coalesced stores of its
    # gradient); that copy is L*H per head, small next to the attention.
    q = q.contiguous()
    k, v, rel_w = (t.to(q.dtype).contiguous() for t in (k, v, rel_w))
    rel_h_t = rel_h.to(q.dtype).transpose(-1, -2).contiguous()
    out, _ = _relpos_flash_fwd(q, k, v, rel_h_t, rel_w, float(scale), block_m or 0, block_m or 0)
    return out
