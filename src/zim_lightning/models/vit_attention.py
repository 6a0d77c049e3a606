"""Fast attention for the ViT blocks of SAM's image encoder (ZIM paper, Sec. 3.3: ZIM keeps SAM's encoder).

SAM's ViT adds MViTv2's *decomposed relative-position bias* to every attention logit:

    logit[i, j] = scale * q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]

with ``rel_h[i, r] = q_i . R_h[row(i) - r]`` and ``rel_w[i, c] = q_i . R_w[col(i) - c]`` (``q`` unscaled)
for a key at grid cell ``(row(j), col(j))``. segment-anything's reference materialises the full
``(HW x HW)`` logits per head, adds the bias to them and runs softmax itself; in the global blocks of
ViT-B at 1024 that is 4096 x 4096 per head and per image, and the same again for its gradient.

:class:`ViTAttention` keeps SAM's module and parameter names (``qkv``, ``proj``, ``rel_pos_h``,
``rel_pos_w``) so SAM checkpoints load unchanged, and computes the same function through one of these
backends:

- ``"eager"``: segment-anything's own code, the reference.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` with the bias as an additive float mask, built by
  broadcasting the small ``rel_h`` (LxH) and ``rel_w`` (LxW) terms. The mask is still dense
  (``B x heads x L x L``), but the logits, softmax and their gradients stay inside the fused kernel.
- ``"sdpa_fold"``: no mask at all. The bias is a dot product too, so it is folded into the query and key:
  ``q' = [scale * q, rel_h, rel_w]``, ``k' = [k, onehot(row), onehot(col)]`` gives
  ``q'_i . k'_j = logit[i, j]`` exactly. Head width grows from d to ``d + H + W`` (64 -> 192 in ViT-B's
  global blocks; zero-padded to a multiple of 8 for the fused kernels) and nothing of size L x L is ever
  stored, forward or backward.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a ``score_mod`` that adds
  ``rel_h[b, h, i, j // W] + rel_w[b, h, i, j % W]`` inside the kernel. It is compiled on CUDA (flex is
  only fast compiled) and runs eagerly elsewhere (the reference math, for tests on CPU).
- ``"triton_relpos"`` (experimental): our fused Triton kernel
  (:mod:`~zim_lightning.models.relpos_flash`), flash-attention style with the bias added inside the
  kernel and its gradient produced without atomics; head width stays d. It runs where
  :func:`~zim_lightning.models.relpos_flash.kernel_available` says so: CUDA (or Triton's interpreter)
  and a grid width W in [8, 128], i.e. SAM's global blocks and its 14x14 windows. Everywhere else (CPU
  without the interpreter, no Triton, no relative positions) it computes the same function through the
  ``"sdpa_fold"`` path.

All five agree to float32 round-off; ``tests/test_speed.py`` checks outputs and gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor

from zim_lightning.models import relpos_flash

logger = logging.getLogger(__name__)

#: Backends of :class:`ViTAttention`, in the order the benchmarks report them.
ATTENTION_BACKENDS: tuple[str, ...] = ("eager", "sdpa", "sdpa_fold", "flex", "triton_relpos")
#: Fused SDPA kernels want the head width a multiple of this (alignment of the memory-efficient kernel).
HEAD_DIM_ALIGNMENT = 8

#: Devices where PyTorch's flex attention runs forward only (it raises in training).
NO_FLEX_BACKWARD: frozenset[str] = frozenset({"cpu", "mps"})

_compiled_flex: Callable[..., Tensor] | None = None
_eager_flex: Callable[..., Tensor] | None = None


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names an attention backend, else raise a clear error."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    return backend


def _flex_attention(device: torch.device) -> Callable[..., Tensor]:
    """flex_attention, compiled once per process on CUDA (its eager form is the slow reference math).

    Elsewhere it stays eager, even inside a compiled model: inductor's CPU flex kernel rejects the
    relative-position tables (an assertion on captured buffers), so the call is kept out of the graph.
    """
    global _compiled_flex, _eager_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        if _eager_flex is None:
            _eager_flex = torch.compiler.disable(flex_attention)
        return _eager_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def relative_embeddings(size: int, rel_pos: Tensor) -> Tensor:
    """``segment_anything``'s ``get_rel_pos(size, size, rel_pos)``: the ``size x size x d`` table
    ``[i, j] -> rel_pos[i - j + size - 1]``, with its index built on ``rel_pos``'s device. SAM's builds it
    on the CPU, and indexing a GPU tensor with a CPU index is a blocking copy: two host-device syncs per
    attention layer. A table sized for another grid is interpolated by SAM's function, as in SAM.

    Args:
        size: side of the (square in this dimension) query and key grid.
        rel_pos: (2L-1)xd relative embeddings; L = ``size`` in every SAM block at its trained resolution.
    """
    if rel_pos.shape[0] != 2 * size - 1:
        return get_rel_pos(size, size, rel_pos)
    index = torch.arange(size, device=rel_pos.device)
    return rel_pos[index[:, None] - index[None, :] + (size - 1)]


def decomposed_rel_pos_terms(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The row and column terms of SAM's decomposed relative-position bias.

    Args:
        q: Bxheadsx(H*W)xd unscaled queries, tokens row-major over the HxW grid.
        rel_pos_h: (2H-1)xd relative embeddings along the height.
        rel_pos_w: (2W-1)xd relative embeddings along the width.
        size: (H, W) of the token grid (queries and keys share it).

    Returns:
        ``rel_h`` Bxheadsx(H*W)xH and ``rel_w`` Bxheadsx(H*W)xW: the bias of query i for key j is
        ``rel_h[..., i, j // W] + rel_w[..., i, j % W]``.
    """
    height, width = size
    batch, heads, length, dim = q.shape
    r_h = relative_embeddings(height, rel_pos_h).to(q.dtype)  # HxHxd: [row(i), row(j)]
    r_w = relative_embeddings(width, rel_pos_w).to(q.dtype)  # WxWxd
    grid_q = q.reshape(batch, heads, height, width, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, r_h).reshape(batch, heads, length, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, r_w).reshape(batch, heads, length, width)
    return rel_h, rel_w


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    extra = (-x.shape[-1]) % multiple
    return F.pad(x, (0, extra)) if extra else x


class ViTAttention(Attention):
    """SAM's ViT attention (same parameters, same function) with a selectable backend.

    Args:
        dim: token width C.
        num_heads: attention heads; the head width is ``dim // num_heads``.
        qkv_bias: learnable bias of the qkv projection (True in SAM).
        use_rel_pos: add the decomposed relative-position bias (True in SAM).
        input_size: (H, W) of the token grid the relative embeddings are sized for (the window, or the
            whole grid in global blocks).
        backend: one of :data:`ATTENTION_BACKENDS`.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
        backend: str = "eager",
    ) -> None:
        super().__init__(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=input_size
        )
        self.backend = check_backend(backend)

    @classmethod
    def from_sam(cls, attn: Attention, *, backend: str) -> ViTAttention:
        """Replace a segment-anything ``Attention`` by this class, weights copied.

        Args:
            attn: the module to replace.
            backend: one of :data:`ATTENTION_BACKENDS`.

        Returns:
            A :class:`ViTAttention` with the same weights, dtype and device.
        """
        input_size = None
        if attn.use_rel_pos:
            input_size = ((attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2)
        new = cls(
            dim=attn.qkv.in_features,
            num_heads=attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            use_rel_pos=attn.use_rel_pos,
            input_size=input_size,
            backend=backend,
        )
        new.load_state_dict(attn.state_dict())
        return new.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the token grid.

        Args:
            x: BxHxWxC tokens (a window or the whole grid).

        Returns:
            BxHxWxC.
        """
        if self.backend == "eager":
            return super().forward(x)
        batch, height, width, _ = x.shape
        length = height * width
        qkv = (
            self.qkv(x).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        )  # 3xBxheadsxLxd
        q, k, v = qkv.unbind(0)
        rel: tuple[Tensor, Tensor] | None = None
        if self.use_rel_pos:
            rel = decomposed_rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        if self.backend == "sdpa":
            out = self._sdpa_mask(q, k, v, rel)
        elif self.backend == "sdpa_fold":
            out = self._sdpa_fold(q, k, v, rel, (height, width))
        elif self.backend == "triton_relpos":
            out = self._triton_relpos(q, k, v, rel, (height, width))
        else:
            out = self._flex(q, k, v, rel, width)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)  # BxheadsxLxd -> BxHxWxC
        return self.proj(out)

    def _sdpa_mask(self, q: Tensor, k: Tensor, v: Tensor, rel: tuple[Tensor, Tensor] | None) -> Tensor:
        mask = None
        if rel is not None:
            rel_h, rel_w = rel
            # Bxheadsx L x H x W -> Bxheadsx L x L: key j = (row, col) row-major, as the tokens.
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _sdpa_fold(
        self, q: Tensor, k: Tensor, v: Tensor, rel: tuple[Tensor, Tensor] | None, size: tuple[int, int]
    ) -> Tensor:
        if rel is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        rel_h, rel_w = rel
        height, width = size
        batch, heads, length, _ = k.shape
        cells = torch.arange(length, device=q.device)
        onehot_row = (cells[:, None] // width == torch.arange(height, device=q.device)).to(k.dtype)  # LxH
        onehot_col = (cells[:, None] % width == torch.arange(width, device=q.device)).to(k.dtype)  # LxW
        q_fold = torch.cat([q * self.scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1)
        k_fold = torch.cat(
            [k, onehot_row.expand(batch, heads, -1, -1), onehot_col.expand(batch, heads, -1, -1)], dim=-1
        )
        # Zero columns change no dot product; they only align the width for the fused kernels.
        q_fold = _pad_last(q_fold, HEAD_DIM_ALIGNMENT)
        k_fold = _pad_last(k_fold, HEAD_DIM_ALIGNMENT)
        return F.scaled_dot_product_attention(q_fold, k_fold, v, scale=1.0)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, rel: tuple[Tensor, Tensor] | None, width: int) -> Tensor:
        if q.device.type in NO_FLEX_BACKWARD and torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError(
                f"attention='flex' cannot train on {q.device.type}: PyTorch's flex attention has no backward "
                "there; use attention='sdpa_fold' (or 'sdpa') for training on this device, or train on CUDA"
            )
        flex = _flex_attention(q.device)
        if rel is None:
            return flex(q, k, v, scale=self.scale)
        rel_h, rel_w = rel

        def add_rel_pos(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + rel_h[b, h, q_idx, kv_idx // width] + rel_w[b, h, q_idx, kv_idx % width]

        kwargs: dict[str, Any] = {"score_mod": add_rel_pos, "scale": self.scale}
        return flex(q, k, v, **kwargs)

    def _triton_relpos(
        self, q: Tensor, k: Tensor, v: Tensor, rel: tuple[Tensor, Tensor] | None, size: tuple[int, int]
    ) -> Tensor:
        """The fused Triton kernel where it runs (global and windowed blocks on CUDA), else the
        ``"sdpa_fold"`` path.

        The fallback computes the same function: it covers blocks without relative positions, grids the
        kernel does not take, and devices other than CUDA unless ``TRITON_INTERPRET=1``.
        """
        fits = dict(dtype=q.dtype, head_dim=q.shape[-1], width=size[1])
        sequences = q.shape[0] * q.shape[1]
        if rel is None or not relpos_flash.kernel_available(q.device, sequences=sequences, **fits):
            return self._sdpa_fold(q, k, v, rel, size)
        rel_h, rel_w = rel
        if torch.compiler.is_compiling():  # a compiled graph cannot take the fallback at run time
            return relpos_flash.relpos_attention(q, k, v, rel_h, rel_w, scale=self.scale)
        if relpos_flash.marked_unfit(q.device, **fits):
            return self._sdpa_fold(q, k, v, rel, size)
        try:
            return relpos_flash.relpos_attention(q, k, v, rel_h, rel_w, scale=self.scale)
        except relpos_flash.KernelResourcesError as error:
            # Only the forward can fall back (a backward that does not fit raises): from here on this
            # device takes the fold for these inputs.
            logger.warning("%s; taking the sdpa_fold path for these inputs from now on", error)
            relpos_flash.mark_unfit(q.device, **fits)
            return self._sdpa_fold(q, k, v, rel, size)
