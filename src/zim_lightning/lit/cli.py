"""`zim-lightning fit | validate | test -c CONFIG.yaml ...`: training and validation through LightningCLI
(ZIM paper, Sec. 4.1: the converter and ZIM training recipes live in configs/).

Every part comes from YAML by ``class_path``/``init_args``: the LightningModule
(:class:`~zim_lightning.lit.converter_module.ConverterModule` or
:class:`~zim_lightning.lit.zim_module.ZimModule`), its network (a registry builder such as
``zim_lightning.models.build.build_zim``, which jsonargparse calls with the validated ``init_args``), the
optimiser and scheduler callables, the datamodule, the trainer and its callbacks. Several ``-c`` files
merge in order, and any value can be overridden on the command line::

    zim-lightning fit -c configs/trainer/gpu.yaml -c configs/zim/vit_b.yaml \\
        --model.init_args.net.init_args.masked_attention=false --trainer.max_steps=1000

The scheduler takes the run's length from ``trainer.max_steps`` (see
:class:`~zim_lightning.lit.optimization.WarmupCosineLR`), so the cosine always ends with the run, and
the data streams take the run's ``seed_everything`` unless the datamodule's ``seed`` is given. The
resolved configuration is saved as ``config.yaml`` in each run's log directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zim_lightning.lit.preemption import stop_or_raise
from zim_lightning.models.checkpoint import CheckpointError, load_checkpoint, shape_mismatch, shapes_of

#: The dispatcher passes the subcommand (fit, validate, test) as the first argument.
MULTI_COMMAND = True


def _module_mismatch(checkpoint: Any, config: Any) -> str | None:
    """Why a loaded checkpoint cannot be restored into the run ``config`` (the subcommand's parsed
    config) describes: not a Lightning checkpoint, or one of another LightningModule; or None."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return "it is not a Lightning checkpoint (a plain state dict holds no module or trainer state)"
    hparams = checkpoint.get("hyper_parameters")
    saved = hparams.get("_class_path") if isinstance(hparams, dict) else None
    wanted = config.get("model.class_path")
    if saved and wanted and saved != wanted:
        return f"it is a checkpoint of {saved}, and this run's model is {wanted}"
    return None


#: ``ckpt_path`` values Lightning resolves itself.
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


def _net_shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("net."): tuple(v.shape) for k, v in state.items() if k.startswith("net.")}


class ZimLightningCLI(LightningCLI):
    """LightningCLI that stores the network's config in the module (checkpoints carry it) and checks a
    ``--ckpt_path`` against the run before Lightning reads it."""

    _ckpt_net_shapes: dict[str, tuple[int, ...]] | None = None
    #: The trainer of the latest run, set once it exists: whether it received SIGTERM tells a preemption
    #: from a failure (:func:`main`).
    last_trainer: Trainer | None = None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        ZimLightningCLI.last_trainer = trainer
        return trainer

    def _ckpt_error(self, ckpt_path: str, problem: str) -> None:
        self.parser.error(
            f"--ckpt_path {ckpt_path!r} does not fit this run: {problem}. Give a checkpoint that this "
            "config wrote, or start from a trained network's weights with "
            "--model.init_args.net.init_args.checkpoint"
        )

    def _ckpt_path(self) -> str | None:
        """The local checkpoint file ``--ckpt_path`` names, or None: no ckpt_path, or one of Lightning's
        own (``last``, ``best``, ``hpc``, ``registry...``, a ``scheme://`` url). A local path that is no
        file is a usage error now, not a traceback after the run started its log folder."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return None
        if ckpt_path in _LIGHTNING_CKPT_NAMES or ckpt_path.startswith("registry") or "://" in ckpt_path:
            return None  # Lightning resolves these itself
        if not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {ckpt_path!r} does not exist or is not a file")
        return ckpt_path

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the run's model config with the checkpoint's hyperparameters here; a
        # checkpoint of another module then fails later on state-dict keys, naming no file, and a file
        # that is no checkpoint with a bare unpickling error. Check it first, by name; the network's
        # shapes are checked once it is built (instantiate_classes).
        ckpt_path = self._ckpt_path()
        if ckpt_path is not None:
            try:
                checkpoint = load_checkpoint(ckpt_path, mmap=True)  # names and shapes: no data read
                problem = _module_mismatch(checkpoint, self.config[self.config.subcommand])
            except CheckpointError as err:
                problem = str(err)
            if problem is not None:
                self._ckpt_error(ckpt_path, problem)
            self._ckpt_net_shapes = _net_shapes(checkpoint["state_dict"])
            del checkpoint
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        # A value the classes refuse (a batch size of 0, an unknown stage) and, for a run, shards that do
        # not exist or a fit from random weights that require_pretrained forbids are usage errors, before
        # the run makes its log folder, not tracebacks from inside it.
        try:
            super().instantiate_classes()
            check_shards = getattr(getattr(self, "datamodule", None), "check_shards", None)
            if self.subcommand is not None and check_shards is not None:
                check_shards()
            random_start_problem = getattr(self.model, "random_start_problem", None)
            if self.subcommand == "fit" and random_start_problem is not None:
                problem = random_start_problem(resuming=bool(self.config["fit"].get("ckpt_path")))
                if problem is not None:
                    raise ValueError(problem)
        except (ValueError, FileNotFoundError) as error:
            self.parser.error(str(error))
        # Checkpoints carry the network's config, so they rebuild it without the run's config.yaml.
        # (set on the module, whose checkpoint hook also runs for weights-only checkpoints)
        config = self.config[self.subcommand] if self.subcommand else self.config
        net = config.get("model.init_args.net")
        if net is not None and hasattr(net, "as_dict") and hasattr(self.model, "net_spec"):
            self.model.net_spec = net.as_dict()
        own = getattr(self.model, "net", None)
        if self._ckpt_net_shapes is not None and isinstance(own, torch.nn.Module):
            problem = shape_mismatch(shapes_of(own.state_dict()), self._ckpt_net_shapes)
            if problem is not None:
                self._ckpt_error(str(self._ckpt_path()), f"its network is not this run's ({problem})")


def cli_main(args: list[str] | None = None, *, run: bool = True) -> LightningCLI:
    """Build (and with ``run`` execute) the CLI.

    Args:
        args: command-line arguments; with ``run`` they start with the subcommand (``["fit", "-c",
            "configs/converter/tiny.yaml"]``), without it they are the subcommand's arguments only.
        run: run the subcommand; False only parses and instantiates (for tests and config checks).

    Returns:
        The CLI object, holding ``model``, ``datamodule`` and ``trainer``.
    """
    return ZimLightningCLI(
        model_class=None,  # any LightningModule by class_path: converter, ZIM, evaluation
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # The modules take OptimizerCallable / LRSchedulerCallable arguments and build their own.
        auto_configure_optimizers=False,
        # Re-running into the same log directory (resume, the demo) must not abort on config.yaml.
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "zim-lightning"},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zim-lightning fit | validate | test``; returns 0, or 143 when stopped by SIGTERM
    (a preemption; parse errors exit with 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Our INFO lines (what a SAM or backbone checkpoint loaded, what stayed random) and warnings are
    # shown; other libraries keep their own levels.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("zim_lightning").setLevel(logging.INFO)
    # LightningCLI warns when given arguments beside a command line; from the dispatcher they are the
    # command line itself, so let it read sys.argv.
    ZimLightningCLI.last_trainer = None  # an error before this run's trainer exists is no preemption
    try:
        cli_main(None if args == sys.argv[1:] else args)
    except (SIGTERMException, Exception) as error:
        # Lightning stops a SIGTERM'd run (a preemption) with SystemExit(None), an exit status of 0:
        # a preempted run must not look finished to `fit && eval` or to torchrun's restarts
        fit = bool(args) and args[0] == "fit"
        advice = "resume with --ckpt_path=.../last.ckpt" if fit else "run it again"
        return stop_or_raise(error, ZimLightningCLI.last_trainer, advice)
    return 0
