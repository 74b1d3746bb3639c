from __future__ import annotations

import subprocess
import sys

import pytest

from cellkit.cli import main


@pytest.mark.slow
def test_demo_job_runs_and_reports(tmp_path, capsys):
    """The README's main job: the shipped demo model on real PBMCs, end to end (one epoch here)."""
    code = main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in (
        "data    pbmc68k_reduced",
        "tokens  700 cells",
        "embed   cell embeddings (700, 128)",
        "map     ",
        "train   ",
    ):
        assert stage in out, out
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"pbmc_cellkit.h5ad", "umap.html", "training.html", "confusion.html", "model"} <= files
    assert main(["info", str(tmp_path / "demo" / "model")]) == 0
    assert "CellModel(family='scgpt'" in capsys.readouterr().out


def test_cli_reports_cellkit_errors_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "cellkit: error:" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "cellkit", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in r.stdout


def test_studio_command_opens_the_studio_notebook(tmp_path, capsys, monkeypatch):
    """The README's first command ends with `cellkit studio`: JupyterLab on the studio notebook."""
    import os

    import nbformat

    monkeypatch.chdir(tmp_path)
    assert main(["studio", "--print-command", "--no-browser", "--port", "8899"]) == 0
    out = capsys.readouterr().out
    nb = tmp_path / "cellkit_studio.ipynb"
    assert nb.is_file()  # no notebooks/ here: a fresh studio notebook was written
    assert "-m jupyterlab cellkit_studio.ipynb --ServerApp.port=8899 --no-browser" in out
    assert ("--allow-root" in out) == (os.geteuid() == 0)
    book = nbformat.read(nb, as_version=4)
    nbformat.validate(book)
    assert "cellkit.Studio(" in book.cells[-1].source
    nb.write_text("{}")  # an existing notebook is never overwritten
    assert main(["studio", "--print-command"]) == 0
    assert nb.read_text() == "{}"
    # inside a checkout it opens the repo's notebook
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_studio.ipynb").write_text("{}")
    capsys.readouterr()
    assert main(["studio", "--print-command"]) == 0
    assert "-m jupyterlab notebooks/00_studio.ipynb" in capsys.readouterr().out
    assert main(["studio", "missing.ipynb", "--print-command"]) == 2
    assert "No notebook at missing.ipynb" in capsys.readouterr().err
