"""An ONNX checkpoint in the official layout, run with onnxruntime behind the interface of :class:`Zim`.

The official release ships ZIM as ONNX only (a folder with ``encoder.onnx`` and ``decoder.onnx``, such
as ``zim_vit_b_2043``; :mod:`zim_lightning.export` writes the same layout). :class:`OnnxZim` runs such a
folder where this project runs a :class:`~zim_lightning.models.zim.Zim`: in
:class:`~zim_lightning.predictor.ZimPredictor` and in ``zim-lightning eval --onnx DIR``, so the released
weights can be scored with this project's datasets, prompts and metrics.

It takes what the official runner takes: the image normalised and zero-padded to the 1024 frame
(:meth:`Zim.preprocess`, shared), the attention map built from the prompts (the official runner's,
:func:`~zim_lightning.models.attention_mask.attention_map_from_prompts`), SAM's labelled points; and it
brings the logits back to the image as the official predictor does (:meth:`Zim.postprocess_masks`,
shared). The graphs run where the module is: on the CPU, or with onnxruntime's CUDA provider on the
module's GPU when ``onnxruntime-gpu`` offers it; every tensor passes through host memory, and there is
no gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from zim_lightning.export import (
    DECODER_FILE,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    OFFICIAL_IMAGE_SIZE,
)
from zim_lightning.models.attention_mask import ATTENTION_SIGMA, ATTENTION_STRIDE, attention_map_from_prompts
from zim_lightning.models.zim import PIXEL_MEAN, PIXEL_STD, Zim
from zim_lightning.prompt_labels import LABEL_ABSENT


class OnnxZim(nn.Module):
    """``encoder.onnx`` + ``decoder.onnx`` with the methods :class:`ZimPredictor` calls on a :class:`Zim`.

    Args:
        folder: the ONNX checkpoint folder.
        providers: onnxruntime execution providers; None follows the module's device: onnxruntime's CUDA
            provider on the module's GPU where the installed onnxruntime offers it (so each DDP rank runs
            on its own GPU), else the CPU.
        threads: onnxruntime intra-op threads (0: its default).

    Raises:
        FileNotFoundError: the folder lacks ``encoder.onnx`` or ``decoder.onnx``.
        ValueError: a graph's inputs or outputs are not the official layout's.
        ImportError: onnxruntime is not installed.
    """

    # The official layout's pre- and post-processing are Zim's (same buffers and frame attributes).
    preprocess = Zim.preprocess
    postprocess_masks = Zim.postprocess_masks
    device = Zim.device

    def __init__(self, folder: str | Path, *, providers: list[str] | None = None, threads: int = 0) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(
                "running an ONNX checkpoint needs onnxruntime: pip install onnxruntime "
                "(onnxruntime-gpu for CUDA)"
            ) from error
        self.folder = Path(folder)
        missing = [name for name in (ENCODER_FILE, DECODER_FILE) if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"ONNX checkpoint {str(self.folder)!r} has no {' or '.join(missing)}; expected a folder with "
                f"{ENCODER_FILE} and {DECODER_FILE}, as the official release ships (zim_vit_b_2043) and "
                "`zim-lightning export-onnx` writes"
            )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        self._ort, self._options = ort, ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._given_providers, self._providers = providers, None
        self._load_sessions()  # on the CPU until the module moves: the graphs are checked here
        side = self.encoder.get_inputs()[0].shape[-1]
        self.image_size = side if isinstance(side, int) else OFFICIAL_IMAGE_SIZE
        self.attention_stride, self.attention_sigma = ATTENTION_STRIDE, ATTENTION_SIGMA

    def _load_sessions(self) -> None:
        """Both sessions, for the providers of the module's device (made again after it moves)."""
        providers = self._given_providers or providers_for(self.device, self._ort.get_available_providers())
        if providers == self._providers:
            return
        folder, options = self.folder, self._options
        self.encoder = _session(
            self._ort, folder / ENCODER_FILE, options, providers, ENCODER_INPUTS, ENCODER_OUTPUTS
        )
        self.decoder = _session(
            self._ort, folder / DECODER_FILE, options, providers, DECODER_INPUTS, DECODER_OUTPUTS
        )
        self._providers = providers

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`Zim.encode_image`: ``preprocess`` then ``encoder.onnx``, one image at a time."""
        return self.encode_preprocessed(self.preprocess(images))

    def encode_preprocessed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`Zim.encode_preprocessed`: Bx3xSxS normalised, padded images -> embeddings and features."""
        self._load_sessions()
        per_image = [
            self.encoder.run(list(ENCODER_OUTPUTS), {ENCODER_INPUTS[0]: _host(image[None])}) for image in x
        ]
        embedding, *feats = (self._tensor(np.concatenate(parts)) for parts in zip(*per_image, strict=True))
        return embedding, tuple(feats)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        feats: tuple[torch.Tensor, ...],
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`Zim.decode` by ``decoder.onnx`` (the attention map built from the prompts if not given).

        Raises:
            ValueError: labels with an absent point (-2), which the official decoder does not know:
                decode prompt sets of different lengths one at a time.
        """
        self._load_sessions()
        if bool((point_labels == LABEL_ABSENT).any()):
            raise ValueError(
                f"an ONNX decoder takes SAM's point labels only, not the absent-point filler "
                f"{LABEL_ABSENT}; decode prompt sets of different lengths one at a time"
            )
        if attn_mask is None:
            attn_mask = attention_map_from_prompts(
                point_coords,
                point_labels,
                size=self.image_size // self.attention_stride,
                stride=self.attention_stride,
                sigma=self.attention_sigma,
            )
        inputs = dict(zip(DECODER_INPUTS[:3], feats, strict=True))
        inputs.update(
            image_embeddings=image_embeddings,
            attn_mask=attn_mask,
            point_coords=point_coords,
            point_labels=point_labels,
        )
        masks, iou = self.decoder.run(list(DECODER_OUTPUTS), {k: _host(v) for k, v in inputs.items()})
        if not multimask_output:
            masks, iou = masks[:, :1], iou[:, :1]
        return self._tensor(masks), self._tensor(iou)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


def providers_for(device: torch.device, available: list[str]) -> list:
    """onnxruntime providers for a module on ``device``, of those ``available``: the CUDA provider on that
    GPU (then the CPU) for a CUDA device where offered, else the CPU."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _session(
    ort, path: Path, options, providers: list[str], inputs: tuple[str, ...], outputs: tuple[str, ...]
):
    """An onnxruntime session of ``path``, whose graph has the official layout's input and output names."""
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime's own exception types (a truncated or foreign file)
        raise ValueError(f"onnxruntime cannot load {str(path)!r}: {error}") from error
    found_inputs = {i.name for i in session.get_inputs()}
    found_outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in inputs if n not in found_inputs] + [n for n in outputs if n not in found_outputs]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a graph of the official layout: it lacks {', '.join(missing)} (its inputs: "
            f"{', '.join(sorted(found_inputs))}; outputs: {', '.join(sorted(found_outputs))})"
        )
    return session
