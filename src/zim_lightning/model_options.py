"""The command-line options that name a ZIM network and its weights, shared by every command that runs one.

``matte``, ``matte-all``, ``export-onnx``, ``serve`` and ``eval`` add them with :func:`add_zim_arguments`
and build the network with :func:`zim_for_command`: a registered size (``--model``), a training run's
saved config (``--run-config``) or a checkpoint of ``zim-lightning fit`` (which carries its network).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from zim_lightning.models.build import (
    RunConfigError,
    zim_from_checkpoint,
    zim_from_run_config,
    zim_model_registry,
)
from zim_lightning.models.checkpoint import CheckpointError, weights_loaded_later
from zim_lightning.models.pixel_decoder import DECODER_STRIDES
from zim_lightning.models.zim import Zim

log = logging.getLogger(__name__)


def add_zim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that choose a registered ZIM and its weights to a command's parser.

    ``--model`` (a key of :data:`zim_model_registry`), ``--checkpoint``, ``--pixel-decoder`` and
    ``--no-masked-attention`` (the two architecture switches a checkpoint was trained with), or
    ``--sam-checkpoint`` instead of ``--checkpoint``: segment-anything's weights, run as SAM itself (both
    switches off, which a SAM checkpoint fills completely). Shared by
    ``matte``, ``matte-all``, ``export-onnx``, ``serve`` and ``eval``; read back with
    :func:`zim_for_command` (or :func:`check_checkpoint_argument` and :func:`zim_from_arguments`).
    ``--run-config`` (a training run's saved ``config.yaml``, see :func:`~zim_lightning.models.build.
    zim_from_run_config`) may replace ``--model``, and neither is needed with a ``--checkpoint`` of
    ``zim-lightning fit``, which carries its network.
    """
    model_help = (
        "ZIM architecture (not needed with a --checkpoint of `zim-lightning fit`: it carries its own)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", choices=sorted(zim_model_registry), help=model_help)
    which.add_argument(
        "--run-config",
        default=None,
        help="config.yaml that `zim-lightning fit` saved in a ZIM run's log directory: builds the "
        "network exactly as that run did (sizes, frame, switches); give the run's .ckpt as --checkpoint",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint",
        default=None,
        help="state dict or Lightning checkpoint of that architecture; without it the model has RANDOM "
        "weights (useful only to test the pipeline)",
    )
    weights.add_argument(
        "--sam-checkpoint",
        default=None,
        help="a segment-anything checkpoint (sam_vit_b_01ec64.pth) of --model's size: runs SAM itself "
        "(the network with SAM's pixel decoder and no masked attention, which it implies), the paper's "
        "SAM baseline",
    )
    parser.add_argument(
        "--pixel-decoder",
        choices=tuple(DECODER_STRIDES),
        default=None,
        help="pixel decoder the checkpoint was trained with (default hierarchical; not with --run-config)",
    )
    parser.add_argument(
        "--no-masked-attention",
        action="store_true",
        help="the checkpoint was trained without prompt-aware masked attention (not with --run-config)",
    )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the :class:`~zim_lightning.predictor.ZimPredictor` a command runs (fp32 or bf16)."""
    from zim_lightning.speed import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="bf16: autocast the ViT encoder (GPUs with bf16); the pyramid and decoder stay float32",
    )


def check_checkpoint_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when ``--checkpoint``, ``--sam-checkpoint`` or ``--run-config`` is not
    a file, when architecture switches come with ``--run-config`` (its config fixes them), or when
    ``--sam-checkpoint`` comes without ``--model`` or with ZIM's pixel decoder; warn when no checkpoint is
    given."""
    if args.sam_checkpoint is not None:
        _check_sam_checkpoint_argument(parser, args)
        return
    run_config = args.run_config
    if args.model is None and run_config is None:
        if args.checkpoint is None:
            parser.error(
                "name the network: --model, --run-config, or a --checkpoint saved by `zim-lightning fit` "
                "(it carries its network's config)"
            )
        if args.pixel_decoder is not None or args.no_masked_attention:
            parser.error("--pixel-decoder and --no-masked-attention describe a --model")
    if run_config is not None:
        if not Path(run_config).is_file():
            parser.error(
                f"--run-config {run_config!r} does not exist or is not a file; expected the config.yaml "
                "that `zim-lightning fit` saved in a ZIM training run's log directory"
            )
        if args.pixel_decoder is not None or args.no_masked_attention:
            parser.error(
                "--pixel-decoder and --no-masked-attention describe a --model; with --run-config the "
                "run's config fixes the architecture"
            )
    if args.checkpoint is None:
        log.warning(
            "no --checkpoint given: %s has RANDOM weights (useful only to test the pipeline)",
            args.model or run_config,
        )
    elif not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint!r} does not exist or is not a file")


def _check_sam_checkpoint_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is None:
        parser.error(
            "--sam-checkpoint needs --model, the ViT size of the segment-anything checkpoint (vit_b for "
            "sam_vit_b_01ec64.pth), not --run-config"
        )
    if args.pixel_decoder not in (None, "sam"):
        parser.error(
            f"--sam-checkpoint runs SAM, whose pixel decoder is 'sam'; --pixel-decoder {args.pixel_decoder} "
            "would leave that decoder with random weights (a SAM checkpoint has none for it)"
        )
    if not Path(args.sam_checkpoint).is_file():
        parser.error(f"--sam-checkpoint {args.sam_checkpoint!r} does not exist or is not a file")


def zim_from_arguments(args: argparse.Namespace) -> Zim:
    """Build the ZIM that :func:`add_zim_arguments`' options name (train mode, as ``build_zim`` leaves it).

    Raises:
        RunConfigError: ``--run-config`` is not the config of a ZIM training run.
        CheckpointError: ``--checkpoint`` holds weights of another network.
    """
    if args.run_config is not None:
        return zim_from_run_config(args.run_config, args.checkpoint)
    if args.model is None:  # a checkpoint of `zim-lightning fit`, which names its network itself
        return zim_from_checkpoint(args.checkpoint)
    if args.sam_checkpoint is not None:  # SAM itself: every tensor comes from the checkpoint
        return zim_model_registry[args.model](
            sam_checkpoint=args.sam_checkpoint, masked_attention=False, pixel_decoder="sam"
        )
    # Switches not given keep the builder's defaults (ZIM's hierarchical pixel decoder).
    switches = {} if args.pixel_decoder is None else {"pixel_decoder": args.pixel_decoder}
    # (a fit checkpoint given with --model and other sizes: build_zim's error says to leave out --model)
    with weights_loaded_later():  # without --checkpoint, check_checkpoint_argument has warned
        return zim_model_registry[args.model](
            checkpoint=args.checkpoint, masked_attention=not args.no_masked_attention, **switches
        )


def zim_for_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Zim:
    """:func:`check_checkpoint_argument`, then :func:`zim_from_arguments`; a run config or checkpoint
    that does not fit ends the command through ``parser.error`` (a usage message, not a traceback)."""
    check_checkpoint_argument(parser, args)
    try:
        return zim_from_arguments(args)
    except (RunConfigError, CheckpointError) as err:
        parser.error(str(err))


def describe_model(args: argparse.Namespace) -> str:
    """The model the options name, for messages and reports: ``vit_b``, or ``run config config.yaml``."""
    if args.run_config is not None:
        return f"run config {Path(args.run_config).name}"
    if args.model is None:
        return f"the network of checkpoint {Path(args.checkpoint).name}"
    if args.sam_checkpoint is not None:
        return f"SAM {args.model}"
    return str(args.model)
