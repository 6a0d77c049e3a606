"""Zero-shot matting evaluation of ZIM with the paper's prompts and metrics (ZIM paper, Sec. 4.1 and 5).

:class:`EvalModule` runs a built ZIM on evaluation instances at their original size, exactly as the
predictor serves it (:class:`~zim_lightning.predictor.ZimPredictor`: resize the longest side to 1024,
pad, encode once, decode each prompt, bring the logits back to the original size), and accumulates
:class:`~zim_lightning.metrics.MattingErrors` per method x prompt x subset. Beside ZIM it can score two
baselines built from the same prediction:

- ``binary``: ZIM's alpha binarised at 0.5 (a SAM-style mask output, ``sigmoid(logit) > 0.5``);
- ``closed_form``: closed-form matting (Levin et al., via pymatting) on a trimap made from the binary mask
  by erosion (definite foreground) and dilation (definite background), ``closed_form_radius`` pixels each
  way, optionally on the image downscaled to ``closed_form_max_side`` (then the alpha is upscaled
  bilinearly). It is slow and off by default.

Every prediction is quantised to ``quantize_bits`` bits before it is scored (16: the PNGs the evaluator
saves), so the reported numbers are exactly those recomputed from saved predictions.

Batches are lists of instance dicts (``zim_lightning.data.micromat``'s ``collate``): ``image`` uint8
HxWx3, ``alpha`` float HxW in [0, 1], ``trimap`` uint8 HxW or None, ``prompt`` {``points`` Nx3 (X, Y,
label), ``box`` (x1, y1, x2, y2)} in original pixels, ``subset``, ``key``, ``matte_relpath``, ``index``.
Under DDP each rank scores a disjoint slice; the metrics sync once at the end of the epoch, and the
gathered results are in :attr:`EvalModule.results` on every rank.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from zim_lightning import speed
from zim_lightning.lit.preemption import expect_worker_deaths_after_sigterm
from zim_lightning.metrics import PROTOCOLS, MattingErrors, scoring_device
from zim_lightning.predictor import ZimPredictor

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("zim", "binary", "closed_form")
BASELINES: tuple[str, ...] = METHODS[1:]
EVAL_PROMPTS: tuple[str, ...] = ("point", "box")
#: Key of each prompt mode in an instance's ``prompt`` dict.
PROMPT_KEYS: dict[str, str] = {"point": "points", "box": "box"}
#: pymatting's closed-form trimap values.
_TRIMAP_BACKGROUND, _TRIMAP_UNKNOWN, _TRIMAP_FOREGROUND = 0.0, 0.5, 1.0


def metric_name(method: str, prompt: str, subset: str) -> str:
    """Key of a metric in :attr:`EvalModule.metrics` (ModuleDict keys cannot hold dots)."""
    return f"{method}__{prompt}__{subset}"


def quantize(alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Round alpha to ``bits``-bit levels ``k / (2^bits - 1)``, as a ``bits``-bit PNG stores it.

    Args:
        alpha: HxW alpha in [0, 1].
        bits: 8 or 16; 0 leaves alpha as it is.

    Returns:
        HxW float64 alpha in [0, 1].
    """
    alpha = alpha.to(torch.float64)
    if bits == 0:
        return alpha
    top = float(2**bits - 1)
    return torch.round(alpha.clamp(0, 1) * top) / top


def closed_form_alpha(
    image: np.ndarray, mask: np.ndarray, *, radius: int, max_side: int | None
) -> np.ndarray:
    """The closed-form matting baseline on a trimap made from a binary mask.

    Args:
        image: HxWx3 uint8 RGB.
        mask: HxW bool, the binarised prediction.
        radius: erosion / dilation radius in pixels (at the working resolution) of the unknown band.
        max_side: downscale so that the longest side is at most this (None: full resolution).

    Returns:
        HxW float64 alpha in [0, 1] at the original size. A mask without definite foreground or
        background after erosion has nothing to propagate from; it is returned as it is.
    """
    from pymatting import estimate_alpha_cf  # imported here: numba compiles it on first import

    height, width = mask.shape
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # (W, H) for cv2
    mask_u8 = mask.astype(np.uint8)
    if scale < 1.0:
        image = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
        mask_u8 = cv2.resize(mask_u8, small_size, interpolation=cv2.INTER_NEAREST)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    foreground = cv2.erode(mask_u8, kernel).astype(bool)
    background = cv2.erode(1 - mask_u8, kernel).astype(bool)
    if not foreground.any() or not background.any():
        return mask.astype(np.float64)
    trimap = np.full(mask_u8.shape, _TRIMAP_UNKNOWN)
    trimap[foreground], trimap[background] = _TRIMAP_FOREGROUND, _TRIMAP_BACKGROUND
    alpha = estimate_alpha_cf(image.astype(np.float64) / 255.0, trimap)
    if scale < 1.0:
        alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(alpha, 0.0, 1.0)


class EvalModule(LightningModule):
    """Scores a ZIM network on evaluation instances (test loop) or returns its predictions (predict loop).

    Args:
        net: a built ZIM (``zim_lightning.models.build.zim_model_registry[...]``), already holding its
            weights.
        prompts: prompt modes to evaluate, each needing its key in the instances' ``prompt``: "point",
            "box" or both.
        protocol: "paper" or "dim" (``zim_lightning.metrics``); dim uses the instance trimap if any.
        subsets: the subsets the instances belong to ("fine", "coarse" for MicroMat-3K; "all").
        baselines: extra methods scored from the same prediction: "binary", "closed_form".
        binary_threshold: the binary baseline's alpha threshold.
        closed_form_radius: half-width in pixels of the closed-form baseline's unknown band.
        closed_form_max_side: longest side of the image the closed-form baseline runs on (None: full
            size; it builds a sparse system of the image's size, so large images take minutes).
        quantize_bits: bits of the stored predictions the metrics are computed on (16; 0: unquantised).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        prompts: list[str] | None = None,
        protocol: str = "paper",
        subsets: list[str] | None = None,
        baselines: list[str] | None = None,
        binary_threshold: float = 0.5,
        closed_form_radius: int = 10,
        closed_form_max_side: int | None = 512,
        quantize_bits: int = 16,
    ) -> None:
        super().__init__()
        prompts = list(EVAL_PROMPTS if prompts is None else prompts)
        subsets = ["all"] if subsets is None else list(subsets)
        baselines = [] if baselines is None else list(baselines)
        if not prompts or any(p not in EVAL_PROMPTS for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of {EVAL_PROMPTS}, got {prompts}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not subsets:
            raise ValueError("subsets must name at least one subset")
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {BASELINES}")
        if quantize_bits not in (0, 8, 16):
            raise ValueError(f"quantize_bits must be 0, 8 or 16, got {quantize_bits}")
        if closed_form_radius < 1:
            raise ValueError(f"closed_form_radius must be >= 1, got {closed_form_radius}")
        self.net = net
        self.prompts = prompts
        self.protocol = protocol
        self.subsets = subsets
        self.methods = ["zim", *(m for m in BASELINES if m in baselines)]
        self.binary_threshold = binary_threshold
        self.closed_form_radius = closed_form_radius
        self.closed_form_max_side = closed_form_max_side
        self.quantize_bits = quantize_bits
        self.metrics = nn.ModuleDict(
            {
                metric_name(m, p, s): MattingErrors(protocol=protocol)
                for m in self.methods
                for p in prompts
                for s in subsets
            }
        )
        #: After the test epoch: {method: {prompt: {subset: MattingErrors.compute() dict}}}.
        self.results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        #: After the test epoch: the same nesting, each an Nx7 float64 tensor of per-instance rows
        #: ``(index, sad, mse, mae, grad, conn, fg_fraction)`` from every rank.
        self.instance_rows: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._predictor: ZimPredictor | None = None

    @property
    def predictor(self) -> ZimPredictor:
        """A :class:`ZimPredictor` around ``self.net`` (built on first use, so on the right device)."""
        if self._predictor is None:
            self._predictor = ZimPredictor(self.net)
        return self._predictor

    @torch.no_grad()
    def predict_instance(
        self, item: dict[str, Any], *, methods: list[str] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Predict every method (or the given ones) x prompt for one instance.

        Args:
            item: an instance dict (see the module docstring).
            methods: a subset of :attr:`methods` (None: all of them).

        Returns:
            {method: {prompt: HxW float64 alpha in [0, 1], quantised to ``quantize_bits``, on CPU}}.

        Raises:
            ValueError: the instance lacks the prompt a mode needs, or a method is not this module's.
        """
        methods = self.methods if methods is None else methods
        if any(m not in self.methods for m in methods):
            raise ValueError(f"methods must be among this module's {self.methods}, got {methods}")
        # Under a bf16 trainer only the ViT runs in bf16: the pyramid's and the decoder's bf16 rounding
        # would move the alpha (speed.float32_heads; nothing changes without autocast)
        with speed.float32_heads(self.net):
            return self._predict_instance(item, methods)

    def _predict_instance(
        self, item: dict[str, Any], methods: list[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        predictor = self.predictor
        try:
            predictor.set_image(np.asarray(item["image"]))
        except ValueError as error:  # an image the network cannot take (too elongated for the frame)
            raise ValueError(f"instance {item['key']!r}: {error}") from error
        out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in methods}
        for prompt in self.prompts:
            given = item["prompt"].get(PROMPT_KEYS[prompt])
            if given is None:
                raise ValueError(
                    f"instance {item['key']!r} has no {PROMPT_KEYS[prompt]!r} prompt for the {prompt!r} mode; "
                    f"build the dataset with prompt={prompt!r} or 'both'"
                )
            given = np.asarray(given, dtype=np.float64)
            if prompt == "point":
                masks, _, _ = predictor.predict(
                    point_coords=given[:, :2], point_labels=given[:, 2], multimask_output=False
                )
            else:
                masks, _, _ = predictor.predict(box=given, multimask_output=False)
            alpha = torch.from_numpy(masks[0])  # HxW float32 in [0, 1]
            if "zim" in out:
                out["zim"][prompt] = quantize(alpha, self.quantize_bits)
            binary = alpha > self.binary_threshold
            if "binary" in out:
                out["binary"][prompt] = binary.to(torch.float64)
            if "closed_form" in out:
                cf = closed_form_alpha(
                    np.asarray(item["image"]),
                    binary.numpy(),
                    radius=self.closed_form_radius,
                    max_side=self.closed_form_max_side,
                )
                out["closed_form"][prompt] = quantize(torch.from_numpy(cf), self.quantize_bits)
        return out

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Score a batch of instances.

        Returns:
            Per instance: ``index``, ``key``, ``subset``, ``matte_relpath`` and ``alphas``
            {method: {prompt: HxW float64 alpha}} (what callbacks save or draw).
        """
        outputs = []
        for item in batch:
            if item["subset"] not in self.subsets:
                raise ValueError(
                    f"instance {item['key']!r} is in subset {item['subset']!r}, not in this module's {self.subsets}"
                )
            alphas = self.predict_instance(item)
            device = scoring_device(self.device)
            gt = torch.as_tensor(np.asarray(item["alpha"]), dtype=torch.float64, device=device)
            trimap = None
            if self.protocol == "dim" and item.get("trimap") is not None:
                trimap = torch.as_tensor(np.asarray(item["trimap"]), device=device)
            # Under a mixed-precision trainer the metric filters must still run in float64.
            with torch.autocast(device_type=device.type, enabled=False):
                for method, by_prompt in alphas.items():
                    for prompt, alpha in by_prompt.items():
                        self.metrics[metric_name(method, prompt, item["subset"])].update(
                            alpha.to(device), gt, index=int(item["index"]), trimap=trimap
                        )
            outputs.append({**_identity(item), "alphas": alphas})
        return outputs

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Predict a batch of instances without scoring them (same outputs as :meth:`test_step`)."""
        return [{**_identity(item), "alphas": self.predict_instance(item)} for item in batch]

    def on_test_start(self) -> None:
        expect_worker_deaths_after_sigterm()  # a SIGTERM to the process group stops it as a preemption

    def on_test_epoch_start(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.results, self.instance_rows = {}, {}

    def on_test_epoch_end(self) -> None:
        # compute() syncs across ranks: every rank calls it for every metric in the same order.
        for method in self.methods:
            for prompt in self.prompts:
                for subset in self.subsets:
                    metric = self.metrics[metric_name(method, prompt, subset)]
                    with warnings.catch_warnings():
                        # A rank may have no instance of a subset; it still joins the gather.
                        warnings.filterwarnings(
                            "ignore", message=".*was called before the ``update`` method.*"
                        )
                        result = metric.compute()
                    self.results.setdefault(method, {}).setdefault(prompt, {})[subset] = result
                    rows = metric.computed_instances
                    self.instance_rows.setdefault(method, {}).setdefault(prompt, {})[subset] = rows
                    if result["n"]:
                        for name in ("sad", "mse", "mae", "grad", "conn"):
                            self.log(
                                f"test/{method}/{prompt}/{subset}/{name}", result[name], rank_zero_only=True
                            )


def _identity(item: dict[str, Any]) -> dict[str, Any]:
    return {name: item[name] for name in ("index", "key", "subset", "matte_relpath")}
