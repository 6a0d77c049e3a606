"""The quickstart notebook runs top to bottom and produces its mattes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # run where nothing of the checkout lies around: the notebook must need no local files
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "box: mean alpha" in text and "points: mean alpha" in text
    # the figure of prompts and mattes was drawn
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
