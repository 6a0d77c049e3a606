"""The package's public surface: the SAM-style API and the command-line dispatcher."""

import subprocess
import sys

import zim_lightning
from zim_lightning.cli import COMMANDS, main


def test_public_names_resolve_and_match_all():
    assert sorted(zim_lightning.__all__) == sorted(zim_lightning._LAZY)
    for name in zim_lightning.__all__:
        assert getattr(zim_lightning, name) is not None, name
    from zim_lightning import ZimPredictor, zim_model_registry

    assert set(zim_model_registry) == {"vit_b", "vit_l", "vit_h", "tiny"}
    assert callable(ZimPredictor)


def test_help_lists_every_command_without_importing_torch():
    code = "import sys; from zim_lightning.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    assert out.strip().endswith("False")


def test_every_command_module_has_a_main():
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_unknown_command_is_refused(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
