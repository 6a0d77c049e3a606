"""ONNX export of a ZIM network in the official ``zim_anything`` layout (ZIM release, "ONNX checkpoint").

The official release ships a model as a folder with two files, which its ``ZimPredictor`` runs with
onnxruntime:

- ``encoder.onnx``: input ``image`` 1x3x1024x1024 (normalised with SAM's mean/std and zero-padded, the
  official predictor calls ``preprocess`` before the encoder); outputs ``image_embeddings`` 1xCx64x64 and
  the pixel decoder's image features ``feat_D0``, ``feat_D1``, ``feat_D2`` (strides 2, 4, 8);
- ``decoder.onnx``: inputs ``feat_D0``, ``feat_D1``, ``feat_D2``, ``image_embeddings``, ``attn_mask``
  (Bx64x64), ``point_coords`` (BxNx2, ``(X, Y)`` pixels in the 1024 frame) and ``point_labels`` (BxN,
  SAM's ONNX labels); outputs ``masks`` (the logits of all 4 mask tokens, Bx4x(1024/s)x(1024/s)) and
  ``iou_predictions`` (Bx4).

The official runner feeds every decoder input by name, so all seven must exist even when a variant
ignores one (the ``sam`` pixel decoder ignores the features, ``masked_attention=False`` ignores
``attn_mask``). The TorchScript exporter drops unused inputs; they are declared again afterwards as
graph inputs that no node reads, which ONNX allows.

``zim-lightning export-onnx [--model NAME] [--checkpoint PATH] --out DIR`` (a ``zim-lightning fit``
checkpoint names its own network, so ``--model`` is for plain weights), or ``--run-config
RUN/config.yaml --checkpoint RUN/...ckpt`` for a training run's own network.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from zim_lightning.data.tar_writer import staging_folder
from zim_lightning.models.attention_mask import ATTENTION_MAP_SIZE, ATTENTION_SIGMA, ATTENTION_STRIDE
from zim_lightning.models.vit_attention import ViTAttention
from zim_lightning.models.zim import Zim

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
#: Name prefix of the hidden folder in ``--out`` where both graphs are written before they move in.
STAGING_PREFIX = ".export-"
ENCODER_INPUTS: tuple[str, ...] = ("image",)
ENCODER_OUTPUTS: tuple[str, ...] = ("image_embeddings", "feat_D0", "feat_D1", "feat_D2")
DECODER_INPUTS: tuple[str, ...] = (
    "feat_D0",
    "feat_D1",
    "feat_D2",
    "image_embeddings",
    "attn_mask",
    "point_coords",
    "point_labels",
)
DECODER_OUTPUTS: tuple[str, ...] = ("masks", "iou_predictions")
#: The frame the official runner feeds the encoder (it resizes every image to it).
OFFICIAL_IMAGE_SIZE = 1024
#: ViT attention backends the exporter traces as they are; others (``flex``: a higher-order op,
#: ``triton_relpos``: a custom kernel) are exported as ``sdpa_fold``, the same function.
_TRACEABLE_ATTENTION = ("eager", "sdpa", "sdpa_fold")

#: Symbolic sizes of the decoder: prompt sets per call and points per set (SAM's runner pads with one
#: point, a box gives two).
_PROMPTS, _POINTS = "num_prompts", "num_points"
_DECODER_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "attn_mask": {0: _PROMPTS},
    "point_coords": {0: _PROMPTS, 1: _POINTS},
    "point_labels": {0: _PROMPTS, 1: _POINTS},
    "masks": {0: _PROMPTS},
    "iou_predictions": {0: _PROMPTS},
}


class EncoderGraph(nn.Module):
    """What ``encoder.onnx`` computes: :meth:`Zim.encode_preprocessed` with flat outputs."""

    def __init__(self, zim: Zim) -> None:
        super().__init__()
        self.zim = zim

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: image 1x3xSxS normalised and padded. Returns: embeddings, feat_D0, feat_D1, feat_D2."""
        embedding, (feat_d0, feat_d1, feat_d2) = self.zim.encode_preprocessed(image)
        return embedding, feat_d0, feat_d1, feat_d2


class DecoderGraph(nn.Module):
    """What ``decoder.onnx`` computes: :meth:`Zim.decode` of all four mask tokens, official input order."""

    def __init__(self, zim: Zim) -> None:
        super().__init__()
        self.zim = zim

    def forward(
        self,
        feat_D0: torch.Tensor,  # noqa: N803 - names are the official ONNX input names
        feat_D1: torch.Tensor,  # noqa: N803
        feat_D2: torch.Tensor,  # noqa: N803
        image_embeddings: torch.Tensor,
        attn_mask: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns: masks Bx4xhxw logits, iou_predictions Bx4."""
        return self.zim.decode(
            image_embeddings,
            (feat_D0, feat_D1, feat_D2),
            point_coords,
            point_labels,
            attn_mask=attn_mask,
            multimask_output=True,
        )


def _dummy_decoder_inputs(encoder_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Decoder inputs for tracing: one prompt set of two points plus SAM's padding point."""
    embedding, feat_d0, feat_d1, feat_d2 = encoder_outputs
    side = embedding.shape[-1]
    # Three points (not one) so the exporter cannot specialise on N = 1; the graph is the same for box
    # and point prompts (the mode is computed from the labels inside it).
    point_coords = torch.tensor([[[300.0, 400.0], [600.0, 500.0], [-0.5, -0.5]]], device=embedding.device)
    point_labels = torch.tensor([[1.0, 0.0, -1.0]], device=embedding.device)
    attn_mask = torch.rand(1, side, side, device=embedding.device)
    return feat_d0, feat_d1, feat_d2, embedding, attn_mask, point_coords, point_labels


def _value_info(name: str, tensor: torch.Tensor, dynamic: dict[int, str]) -> onnx.ValueInfoProto:
    shape = [dynamic.get(axis, size) for axis, size in enumerate(tensor.shape)]
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _restore_inputs(
    path: Path,
    names: tuple[str, ...],
    examples: tuple[torch.Tensor, ...],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Declare again the graph inputs the exporter dropped, in the official order, and check the file."""
    # Weights stay where they are: models over protobuf's 2 GiB limit (ViT-H) keep them as external data.
    model = onnx.load(str(path), load_external_data=False)
    present = {value.name: value for value in model.graph.input}
    missing = [name for name in names if name not in present]
    if missing:
        log.info("%s: re-declaring inputs unused by this variant: %s", path.name, ", ".join(missing))
    ordered = [
        present[name] if name in present else _value_info(name, example, dynamic_axes.get(name, {}))
        for name, example in zip(names, examples, strict=True)
    ]
    # initializers can also appear as graph inputs in older opsets; keep them after ours
    extra = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(ordered + extra)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path, so external data and large models are checked too


#: ONNX opsets the export takes: scaled-dot-product attention needs 14; the TorchScript exporter, which
#: traces this model reliably (see ``_export``), writes at most 20.
MIN_OPSET, MAX_OPSET = 14, 20


@torch.no_grad()
def export_onnx(model: Zim, out_dir: str | Path, *, opset: int = 17) -> tuple[Path, Path]:
    """Export ``model`` as ``encoder.onnx`` + ``decoder.onnx`` in the official layout.

    Args:
        model: the ZIM network (any variant at the official 1024 frame). It is exported in eval mode on
            the CPU, with ``flex`` or ``triton_relpos`` attention traced as ``sdpa_fold``; its device,
            mode and attention backend are restored afterwards.
        out_dir: folder to write; created if needed. Existing files of the same names are replaced.
        opset: ONNX opset version, :data:`MIN_OPSET` to :data:`MAX_OPSET`.

    Returns:
        ``(encoder_path, decoder_path)``.

    Raises:
        ValueError: an opset out of range, the model's frame is not 1024 (the official runner could not
            feed it), or its masked attention expects other maps than the runner builds (sigma 21
            cells, 16-pixel cells, 64x64).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: expected an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    if model.image_size != OFFICIAL_IMAGE_SIZE:
        raise ValueError(
            f"the official zim_anything runner feeds {OFFICIAL_IMAGE_SIZE}x{OFFICIAL_IMAGE_SIZE} images; this "
            f"model's frame is {model.image_size} (image_size), so its ONNX files could not run there. Train "
            "at 1024 to export: the vit_b config does; the tiny one takes --model.init_args.net.init_args."
            "image_size=1024 --data.init_args.image_size=1024"
        )
    official = (ATTENTION_SIGMA, ATTENTION_STRIDE, ATTENTION_MAP_SIZE)
    own = (model.attention_sigma, model.attention_stride, model.embedding_size)
    if model.masked_attention and own != official:
        raise ValueError(
            "the official zim_anything runner builds the attention maps with sigma, cell size and grid "
            f"{official}; this model's masked attention uses {own} (attention_sigma, attention_stride, "
            "the embedding grid), so it would decode the runner's maps differently than here"
        )
    backends = {module: module.backend for module in model.modules() if isinstance(module, ViTAttention)}
    device, training = model.device, model.training
    try:
        for module, backend in backends.items():
            if backend not in _TRACEABLE_ATTENTION:
                module.backend = "sdpa_fold"
        return _export_model(model.eval().cpu(), Path(out_dir), opset)
    finally:
        for module, backend in backends.items():
            module.backend = backend
        model.to(device).train(training)


def _export_model(model: Zim, out_dir: Path, opset: int) -> tuple[Path, Path]:
    # Both graphs are written to a temporary folder first (each .onnx file and any external-data files
    # beside it) and moved into place only once both are written and checked: a failed export leaves
    # neither a half-written model nor a new encoder beside an earlier export's decoder.
    encoder, decoder = EncoderGraph(model), DecoderGraph(model)
    size = model.image_size
    with staging_folder(out_dir, STAGING_PREFIX) as staging:
        # A random image rather than zeros, so no data-dependent shortcut is traced.
        image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        encoder_outputs = encoder(image)
        _export(encoder, (image,), staging / ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS, {}, opset)
        _export(
            decoder,
            _dummy_decoder_inputs(encoder_outputs),
            staging / DECODER_FILE,
            DECODER_INPUTS,
            DECODER_OUTPUTS,
            _DECODER_DYNAMIC_AXES,
            opset,
        )
        for produced in sorted(staging.iterdir()):
            produced.replace(out_dir / produced.name)
    encoder_path, decoder_path = out_dir / ENCODER_FILE, out_dir / DECODER_FILE
    log.info("exported %s and %s", encoder_path, decoder_path)
    return encoder_path, decoder_path


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    # The TorchScript exporter (dynamo=False) traces this model reliably.
    with warnings.catch_warnings():
        # The tracer warns about every Python-side shape check (input validation); shapes are fixed or
        # declared dynamic above, so those checks hold for every input the graph accepts.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or None,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _restore_inputs(path, input_names, args, dynamic_axes)


def main(argv: list[str] | None = None) -> int:
    """``zim-lightning export-onnx``: write encoder.onnx + decoder.onnx for the official runner."""
    from zim_lightning.command_checks import check_out_folder
    from zim_lightning.model_options import add_zim_arguments, zim_for_command

    parser = argparse.ArgumentParser(
        prog="zim-lightning export-onnx",
        description="Export a ZIM network to ONNX in the official zim_anything layout "
        "(a folder with encoder.onnx and decoder.onnx).",
    )
    add_zim_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--opset", type=int, default=17, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default 17)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_out_folder(parser, args.out)

    model = zim_for_command(parser, args)
    try:
        encoder_path, decoder_path = export_onnx(model, args.out, opset=args.opset)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {encoder_path}")
    print(f"wrote {decoder_path}")
    return 0
