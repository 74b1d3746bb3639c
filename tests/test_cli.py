from __future__ import annotations

import subprocess
import sys

from cellkit.cli import main


def test_demo_job_runs_and_reports(tmp_path, capsys):
    """The README's main job: the shipped demo model on real PBMCs, end to end (one epoch here)."""
    code = main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in (
        "data    pbmc68k_reduced",
        "tokens  700 cells",
        "embed   cell embeddings (700, 64)",
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
