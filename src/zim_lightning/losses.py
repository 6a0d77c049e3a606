"""Matting losses: L1 plus a finite-difference gradient term (ZIM paper, Sec. 3.1 and 3.3).

The paper trains both the label converter and ZIM with

    L = L1(M, M') + lambda * Lgrad,   Lgrad = |dx M - dx M'| + |dy M - dy M'|,   lambda = 10,

where ``dx`` and ``dy`` are horizontal and vertical finite differences. Both terms here are means over
the pixels (or pixel pairs) that count: an optional per-pixel ``valid`` weight removes the zero padding of
the SAM frame from the ZIM loss, so the network is not taught to predict a matte of the black border.

The converter adds MGMatting's progressive-refinement supervision (Yu et al., "Mask Guided Matting via
Progressive Refinement Network", CVPR 2021): the same loss on each of its outputs at output strides 8, 4
and 1, combined with fixed weights (2 on the stride-1 output, 1 on the others, as MGMatting weights its
refinement losses). MGMatting restricts the stride-4 and stride-1 terms to the uncertain band around the
coarser prediction; by default we supervise every pixel instead, which is simpler and keeps those heads
learning where the band is empty (the STL samples, whose target is the coarse mask itself).
``ConverterLoss(band_weighted=True)`` is MGMatting's form.

Not in the paper: an optional binary cross-entropy term on the logits (``bce_weight``, default 0). ZIM
fine-tunes from SAM, whose logits already separate object from background. From random weights (the
tiny CPU configs) the paper's loss alone saturates the sigmoid: the background is ~95% of the pixels, so
L1 pushes every logit down until sigmoid'(logit) is ~0 and no gradient reaches the object either, and
the network settles on an empty matte. Cross-entropy on the logits keeps its gradient (``p - y``) there.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

#: Weight of the gradient term in the paper (lambda).
PAPER_GRAD_WEIGHT = 10.0


def _check_pair(pred: Tensor, target: Tensor, valid: Tensor | None) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction and target mattes must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.dim() != 4:
        raise ValueError(f"mattes must be Bx1xHxW tensors, got shape {tuple(pred.shape)}")
    if valid is not None and valid.shape != pred.shape:
        raise ValueError(
            f"valid weight must have the mattes' shape {tuple(pred.shape)}, got {tuple(valid.shape)}"
        )


def _weighted_mean(values: Tensor, weight: Tensor | None, per_sample: bool = False) -> Tensor:
    # per_sample: one mean per batch element (B), else over everything (a scalar)
    dims = tuple(range(1, values.dim())) if per_sample else tuple(range(values.dim()))
    if weight is None:
        # a 1-pixel-wide matte has no horizontal differences: their mean counts as 0, not NaN
        count = max(1, math.prod(values.shape[d] for d in dims))
        return values.sum(dim=dims) / count
    # An all-zero weight (an image that is all padding cannot happen, but a crop could) gives 0, not NaN:
    # the floor matters only for a sum of about zero (weights summing to less than 1 still give their mean).
    return (values * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-6)


def l1_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, *, per_sample: bool = False) -> Tensor:
    """Mean absolute difference of two mattes.

    Args:
        pred: predicted alpha, Bx1xHxW in [0, 1].
        target: ground-truth alpha, Bx1xHxW in [0, 1].
        valid: optional per-pixel weight, Bx1xHxW in [0, 1] (0 on padding); None weighs all pixels 1.

        per_sample: one value per batch element instead of one over the batch.

    Returns:
        Scalar (or B): sum(valid * |pred - target|) / sum(valid).
    """
    _check_pair(pred, target, valid)
    return _weighted_mean((pred - target).abs(), valid, per_sample)


def gradient_loss(
    pred: Tensor, target: Tensor, valid: Tensor | None = None, *, per_sample: bool = False
) -> Tensor:
    """Finite-difference gradient loss: mean |dx pred - dx target| + mean |dy pred - dy target|.

    ``dx M[y, x] = M[y, x + 1] - M[y, x]`` and ``dy M[y, x] = M[y + 1, x] - M[y, x]``. With ``valid``, a
    difference counts with the product of its two pixels' weights, so no difference crosses into the
    padding.

    Args:
        pred: predicted alpha, Bx1xHxW in [0, 1].
        target: ground-truth alpha, Bx1xHxW in [0, 1].
        valid: optional per-pixel weight, Bx1xHxW in [0, 1]; None weighs all pixels 1.
        per_sample: one value per batch element instead of one over the batch.

    Returns:
        Scalar (or B): the horizontal mean plus the vertical mean.
    """
    _check_pair(pred, target, valid)
    diff = pred - target  # differencing is linear: d(pred) - d(target) = d(pred - target)
    dx = diff[..., :, 1:] - diff[..., :, :-1]
    dy = diff[..., 1:, :] - diff[..., :-1, :]
    wx = wy = None
    if valid is not None:
        wx = valid[..., :, 1:] * valid[..., :, :-1]
        wy = valid[..., 1:, :] * valid[..., :-1, :]
    return _weighted_mean(dx.abs(), wx, per_sample) + _weighted_mean(dy.abs(), wy, per_sample)


class MattingLoss(nn.Module):
    """The paper's matting loss, L1 + grad_weight * Lgrad, on alpha in [0, 1] (+ bce_weight * BCE).

    Args:
        grad_weight: lambda, the weight of the gradient term (paper: 10).
        bce_weight: weight of binary cross-entropy on the logits (paper: 0, off; see the module docstring:
            training from random weights needs it).
    """

    def __init__(self, *, grad_weight: float = PAPER_GRAD_WEIGHT, bce_weight: float = 0.0) -> None:
        super().__init__()
        if grad_weight < 0:
            raise ValueError(f"grad_weight must be >= 0, got {grad_weight}")
        if bce_weight < 0:
            raise ValueError(f"bce_weight must be >= 0, got {bce_weight}")
        self.grad_weight = grad_weight
        self.bce_weight = bce_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        valid: Tensor | None = None,
        *,
        logits: Tensor | None = None,
        per_sample: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the loss and its terms.

        Args:
            pred: predicted alpha, Bx1xHxW in [0, 1] (apply sigmoid to logits first).
            target: ground-truth alpha, Bx1xHxW in [0, 1].
            valid: optional per-pixel weight, Bx1xHxW in [0, 1] (0 on the SAM frame's padding).
            logits: the Bx1xHxW logits ``pred`` is the sigmoid of; needed when ``bce_weight > 0``.
            per_sample: every term per batch element (B-vectors) instead of over the batch.

        Returns:
            dict with ``loss`` (to minimise, the weighted sum of every term), ``l1`` and ``grad`` (the
            unweighted paper terms), all scalars (B-vectors with ``per_sample``).
        """
        # Losses in float32: bf16 sums over a million pixels lose the small differences that matter.
        pred, target = pred.float(), target.float()
        valid = None if valid is None else valid.float()
        l1 = l1_loss(pred, target, valid, per_sample=per_sample)
        grad = gradient_loss(pred, target, valid, per_sample=per_sample)
        loss = l1 + self.grad_weight * grad
        if self.bce_weight > 0:
            if logits is None:
                raise ValueError("bce_weight > 0 needs the logits that pred is the sigmoid of (logits=...)")
            _check_pair(logits, target, valid)
            bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
            loss = loss + self.bce_weight * _weighted_mean(bce, valid, per_sample)
        return {"loss": loss, "l1": l1, "grad": grad}


#: The band each refined output is supervised in, with ``ConverterLoss(band_weighted=True)``.
_BANDS = {"alpha_os4": "band_os4", "alpha_os1": "band_os1"}


class ConverterLoss(nn.Module):
    """MGMatting-style supervision of the label converter's three outputs.

    Each of ``alpha_os8``, ``alpha_os4`` and ``alpha_os1`` gets :class:`MattingLoss` against the same
    target; the total is their weighted mean. Every pixel counts, unless ``band_weighted``.

    Args:
        grad_weight: lambda of each :class:`MattingLoss` (paper: 10).
        weight_os1: weight of the stride-1 (finest) output's loss.
        weight_os4: weight of the stride-4 output's loss.
        weight_os8: weight of the stride-8 (coarsest) output's loss.
        band_weighted: MGMatting's supervision: the stride-4 and stride-1 terms count only inside the
            bands where refinement took those outputs (the converter's ``band_os4`` and ``band_os1``);
            a sample with an empty band adds nothing to them.
    """

    def __init__(
        self,
        *,
        grad_weight: float = PAPER_GRAD_WEIGHT,
        weight_os1: float = 2.0,
        weight_os4: float = 1.0,
        weight_os8: float = 1.0,
        band_weighted: bool = False,
    ) -> None:
        super().__init__()
        self.weights = {"alpha_os1": weight_os1, "alpha_os4": weight_os4, "alpha_os8": weight_os8}
        self.band_weighted = band_weighted
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"output weights must be >= 0 with a positive sum, got {self.weights}")
        self.matting = MattingLoss(grad_weight=grad_weight)

    def forward(
        self, outputs: dict[str, Tensor], target: Tensor, *, per_sample: bool = False
    ) -> dict[str, Tensor]:
        """Compute the loss and its terms.

        Args:
            outputs: the converter's output dict with ``alpha_os1``, ``alpha_os4``, ``alpha_os8``, each
                Bx1xHxW in [0, 1] (and the bool ``band_os4``, ``band_os1`` with ``band_weighted``).
            target: ground-truth alpha, Bx1xHxW in [0, 1].
            per_sample: B-vectors of each sample's own terms (evaluation: with ``band_weighted``, the
                batch's pooled band means would depend on how samples batch).

        Returns:
            dict with ``loss`` (to minimise), and the weighted means ``l1`` and ``grad`` of the terms.
        """
        needed = [*self.weights, *(_BANDS.values() if self.band_weighted else ())]
        missing = [k for k in needed if k not in outputs]
        if missing:
            raise KeyError(f"converter outputs lack {missing}; got keys {sorted(outputs)}")
        total = sum(self.weights.values())
        result: dict[str, Tensor] = {}
        for key, weight in self.weights.items():
            band = outputs[_BANDS[key]] if self.band_weighted and key in _BANDS else None
            valid = None if band is None else band.to(target.dtype)
            terms = self.matting(outputs[key], target, valid, per_sample=per_sample)
            for name, value in terms.items():
                result[name] = result.get(name, 0.0) + value * (weight / total)
        return result
