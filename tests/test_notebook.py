"""The quickstart notebook runs top to bottom and produces its mattes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path):
    # CHECKPOINT set to what `zim-lightning fit` writes for configs/zim/tiny.yaml (a 256 frame, which the
    # registry's 1024-frame "tiny" cannot take): the notebook must build the network the checkpoint names
    import torch
    import yaml

    from zim_lightning.models.build import network_from_spec
    from zim_lightning.models.checkpoint import NET_SPEC_KEY

    config = Path(__file__).resolve().parents[1] / "configs" / "zim" / "tiny.yaml"
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]["net"]
    net = network_from_spec(spec, source="configs/zim/tiny.yaml")
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    (tmp_path / "runs").mkdir()
    torch.save({"state_dict": state, NET_SPEC_KEY: spec}, tmp_path / "runs" / "last.ckpt")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    setup = nb.cells[1]
    assert "CHECKPOINT = None" in setup.source
    setup.source = setup.source.replace("CHECKPOINT = None", 'CHECKPOINT = "runs/last.ckpt"')
    # run where nothing of the checkout lies around (the notebook must need no local files), in a
    # notebooks/ folder as Jupyter starts it: the path is taken from the folder above
    (tmp_path / "notebooks").mkdir()
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "notebooks")}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "box: mean alpha" in text and "points: mean alpha" in text
    assert f"frame {spec['init_args']['image_size']}, weights: runs/last.ckpt" in text
    # the figure of prompts and mattes was drawn
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
