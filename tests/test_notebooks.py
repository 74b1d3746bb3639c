"""Every notebook in notebooks/ and tutorial in tutorials/ runs end to end (nbclient, no browser).

Each notebook has a code cell tagged ``parameters`` (dataset size, epochs, checkpoint path, ...).
CI runs it small: the notebook's own metadata ``{"cellkit": {"ci_parameters": "EPOCHS = 1\\n..."}}``
is injected as a new cell right after the parameters cell (papermill's convention), so users run
the same notebook big by editing only the parameters cell. A run fails on any error output; it
must also produce what the notebook promises: at least one figure and printed results, and every
string in ``{"cellkit": {"ci_expect": [...]}}`` somewhere in its outputs. The executed notebooks are
kept in ``$CELLKIT_ARTIFACTS/executed/`` (default ``test-artifacts/``) for reading.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every notebook runs end to end; `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("tutorials/*.ipynb")])
FIGURE_MIMES = {
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-view+json",
    "image/png",
}


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            data = out.get("data", {})
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in data:
                    parts.append(data[mime] if isinstance(data[mime], str) else "".join(data[mime]))
    return "\n".join(parts)


def prepare(path: Path):
    """The notebook with its CI parameters injected after the ``parameters`` cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("cellkit", {})
    params = meta.get("ci_parameters")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f"{path.name}: no code cell tagged 'parameters'"
    if params:
        cell = nbformat.v4.new_code_cell(params)
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(tagged[0] + 1, cell)
    return nb, meta


def _keep_executed(nb, path: Path) -> None:
    """Write the executed notebook (also a failed one) next to the browser screenshots, for reading."""
    import nbformat

    out = Path(os.environ.get("CELLKIT_ARTIFACTS", ROOT / "test-artifacts")) / "executed"
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out / f"{path.parent.name}-{path.name}")


def test_every_notebook_is_clean_and_parametrised():
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        # committed without outputs (executed in CI, not stored)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
            f"{path.name} has outputs"
        )
        prepare(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_runs(path, tmp_path):
    from nbclient import NotebookClient

    nb, meta = prepare(path)
    env_backup = dict(os.environ)
    os.environ.update(
        {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "CELLKIT_HOME": str(tmp_path)}
    )
    client = NotebookClient(
        copy.deepcopy(nb),
        timeout=int(meta.get("ci_timeout", 300)),
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        executed = client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
        _keep_executed(client.nb, path)
    errors = [
        out for cell in executed.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors, json.dumps(errors, indent=1)[:3000]
    mimes = {m for c in executed.cells for o in c.get("outputs", []) for m in o.get("data", {})}
    assert mimes & FIGURE_MIMES, f"{path.name}: no figure or widget in the outputs"
    text = _outputs_text(executed)
    assert text.strip(), f"{path.name}: printed nothing"
    missing = [s for s in meta.get("ci_expect", []) if s not in text]
    assert not missing, f"{path.name}: outputs lack {missing}"
