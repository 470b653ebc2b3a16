"""Every notebook runs headless in quick mode, and each ``.ipynb`` is its paired ``.py``.

The notebooks are kept as jupytext pairs: ``notebooks/NAME.py`` (percent format, the one to edit)
and ``notebooks/NAME.ipynb`` without outputs. After editing either, run
``jupytext --sync notebooks/NAME.py`` and clear the outputs.
"""

import pathlib
import sys

import jupytext
import jupytext.compare
import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def execute(notebook: nbformat.NotebookNode) -> None:
  """Runs ``notebook`` in place on a ``python3`` kernel, from the notebooks directory."""
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute()


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


def test_kernel_is_this_interpreter():
  notebook = nbformat.v4.new_notebook(
      cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")])
  execute(notebook)
  assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_and_has_no_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name} has outputs: clear them before committing")
  script = path.with_suffix(".py")
  assert script.exists(), f"{path.name} has no paired {script.name}"
  try:
    jupytext.compare.compare_notebooks(jupytext.read(script), jupytext.read(path),
                                       fmt="py:percent")
  except jupytext.compare.NotebookDifference as error:
    pytest.fail(f"{path.name} and {script.name} differ; run `jupytext --sync {script}`:\n{error}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MARGINS_QUICK", "1")
  monkeypatch.setenv("MARGINS_FIGURES_DIR", str(tmp_path))  # Leaves docs/figures alone.
  # Notebooks 02 and 04 train into a tempfile.mkdtemp() they keep for the reader (about 9 MB).
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  execute(nbformat.read(path, as_version=4))
  figures = sorted(p.name for p in tmp_path.glob("*.png"))
  assert figures, f"{path.name} saved no figure"
  missing = [name for name in figures if not (ROOT / "docs" / "figures" / name).exists()]
  assert not missing, f"{path.name}: commit the full-settings figures {missing} in docs/figures"
