"""examples/notebook.ipynb runs end to end in a real Jupyter kernel (nbclient + ipykernel)."""

from __future__ import annotations

import base64
import json
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def isolated_jupyter(tmp_path: pathlib.Path, monkeypatch) -> str:
    """A kernel spec for this interpreter, and Jupyter/IPython dirs under tmp_path only."""
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # the future default; else a DeprecationWarning
    kernels = tmp_path / "jupyter" / "kernels" / "aiodagger-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "aiodagger test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched first
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return "aiodagger-test"


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    kernel = isolated_jupyter(tmp_path, monkeypatch)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    work = tmp_path / "cwd"
    work.mkdir()
    client = NotebookClient(nb, timeout=60, kernel_name=kernel, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    client.execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert stderr == []
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "sum of squares: 20540" in stdout
    assert [line for line in stdout.splitlines() if line.startswith("fetch_price")] == [
        f"fetch_price {10 * i}" for i in range(1, 6)]
    assert "<Logs: 41 tasks, 41 runs" in stdout

    results = [o for o in outputs if o.output_type == "execute_result"]
    assert results[0].data["text/plain"] == "3"  # top-level `await dagger.spawn(add, 1, 2)`
    png = base64.b64decode(results[-1].data["image/png"])  # the Gantt chart, shown inline
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 2  # the two tqdm progress bars, as notebook widgets
    assert list(work.iterdir()) == []  # the notebook wrote no file


def test_arrays_notebook_runs_end_to_end(tmp_path, monkeypatch):
    kernel = isolated_jupyter(tmp_path, monkeypatch)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "arrays.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name=kernel, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"] == []
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "matches numpy: True" in stdout
    assert "fitted: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]" in stdout
    assert "matches numpy's lstsq: True" in stdout
