"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), as a user
would run it; any error in any cell fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "prompts x (embedding + blocks) x hidden" in text and "categories separate best at layer" in text
    assert "plain:" in text and "steered:" in text
    # The trajectories display as an interactive plotly figure, the separation curve as an image.
    kinds = {kind for output in outputs for kind in output.get("data", {})}
    assert "application/vnd.plotly.v1+json" in kinds and "image/png" in kinds
