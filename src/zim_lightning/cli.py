"""The `zim-lightning` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes ``main(argv: list[str] | None) -> int``;
this file only dispatches, and imports a job's module (and so torch, Lightning, ...) only when that job
runs, so ``zim-lightning --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Training subcommands share LightningCLI in zim_lightning.lit.cli.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": (
        "zim_lightning.data.synthetic",
        "write the synthetic dataset (SA-1B, matting, MicroMat-3K formats)",
    ),
    "pack-shards": (
        "zim_lightning.data.pack",
        "pack folders of images and alphas (or masks) into matting (or segmentation) shards",
    ),
    "fit": ("zim_lightning.lit.cli", "train a converter or ZIM from YAML configs (LightningCLI)"),
    "validate": ("zim_lightning.lit.cli", "validate a model from YAML configs (LightningCLI)"),
    "test": ("zim_lightning.lit.cli", "test a model from YAML configs (LightningCLI)"),
    "build-sa1b-matte": ("zim_lightning.sa1b_matte", "convert SA-1B masks into SA1B-Matte shards"),
    "eval": ("zim_lightning.evaluate", "evaluate on MicroMat-3K, AM-2K or AIM-500"),
    "matte": ("zim_lightning.matte_cli", "matte one image from a box or points"),
    "matte-all": ("zim_lightning.automatic", "matte every object in an image (automatic)"),
    "export-onnx": ("zim_lightning.export", "export encoder.onnx + decoder.onnx in the official layout"),
    "serve": ("zim_lightning.serve", "interactive matting in the browser"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: zim-lightning COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `zim-lightning COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"zim-lightning: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Modules serving several commands take the command name first.
    if getattr(module, "MULTI_COMMAND", False):
        return int(module.main([name, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
