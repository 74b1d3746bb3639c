from __future__ import annotations

import subprocess
import sys

from cellkit.cli import main


def test_demo_job_runs_and_reports(tmp_path, capsys):
    code = main(
        ["demo", "--out", str(tmp_path / "demo"), "--cells", "16", "--genes", "200", "--max-len", "40"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bit-for-bit identical after save/load: True" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file()
    assert main(["info", str(tmp_path / "demo")]) == 0
    assert "CellModel(family='scgpt'" in capsys.readouterr().out


def test_cli_reports_cellkit_errors_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "cellkit: error:" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "cellkit", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in r.stdout
