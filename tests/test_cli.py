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


def test_studio_command_opens_a_copy_of_the_studio_notebook(tmp_path, capsys, monkeypatch):
    """`cellkit studio` (the end of the README's first command) opens the user's copy of the studio
    notebook, never a tracked file: the copy is made in ./cellkit-studio, JupyterLab serves that
    directory, its URL is the notebook (not the Launcher), and news is off."""
    import os

    from cellkit import cli

    monkeypatch.chdir(tmp_path)
    assert main(["studio", "--print-command", "--no-browser", "--port", "8899"]) == 0
    out = capsys.readouterr().out
    nb = tmp_path / "cellkit-studio" / "studio.ipynb"
    assert nb.read_bytes() == cli.SHIPPED_STUDIO_NOTEBOOK.read_bytes()
    assert f"studio  {nb}: a fresh copy" in out
    cmd = out.split("+ ", 1)[1].split()
    assert cmd[1:3] == ["-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={nb.parent}" in cmd
    assert "--LabApp.default_url=/lab/tree/studio.ipynb" in cmd
    assert "--LabApp.news_url=None" in cmd
    assert {"--ServerApp.port=8899", "--no-browser"} <= set(cmd)
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)
    assert "Shift+Enter" in out

    # an edited copy is kept, and the user is told
    nb.write_text('{"edited": true}')
    assert main(["studio", "--print-command"]) == 0
    assert nb.read_text() == '{"edited": true}'
    assert "kept your copy" in capsys.readouterr().out
    # --dir puts the copy elsewhere; a given notebook is opened as it is
    assert main(["studio", "--dir", "work/lab", "--print-command"]) == 0
    assert (tmp_path / "work" / "lab" / "studio.ipynb").is_file()
    assert f"--ServerApp.root_dir={tmp_path / 'work' / 'lab'}" in capsys.readouterr().out
    (tmp_path / "mine.ipynb").write_text("{}")
    assert main(["studio", "mine.ipynb", "--print-command"]) == 0
    assert "--LabApp.default_url=/lab/tree/mine.ipynb" in capsys.readouterr().out
    assert main(["studio", "missing.ipynb", "--print-command"]) == 2
    assert "No notebook at missing.ipynb" in capsys.readouterr().err
    # a checkout's notebooks/00_studio.ipynb is never what it opens (JupyterLab would autosave outputs into it)
    assert not (tmp_path / "notebooks").exists()


def test_studio_command_starts_jupyterlab_with_news_off(tmp_path, monkeypatch):
    """What `cellkit studio` hands to JupyterLab: the command line above and cellkit's page config on the
    Jupyter config path (the announcements plugin off), added to the user's own configuration."""
    import json
    import os

    from cellkit import cli

    seen = {}

    def fake_execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", "/somewhere/else")
    with pytest.raises(SystemExit):
        main(["studio", "--no-browser"])
    assert seen["path"] == sys.executable
    assert seen["argv"] == cli._studio_command(
        tmp_path / "cellkit-studio" / "studio.ipynb", port=None, no_browser=True
    ) + (["--allow-root"] if os.geteuid() == 0 else [])
    paths = seen["env"]["JUPYTER_CONFIG_PATH"].split(os.pathsep)
    assert paths == [str(cli._LAB_CONFIG), "/somewhere/else"]
    page_config = json.loads((cli._LAB_CONFIG / "labconfig" / "page_config.json").read_text())
    assert page_config["disabledExtensions"] == {"@jupyterlab/apputils-extension:announcements": True}


def test_shipped_studio_notebook_is_the_repo_notebook():
    """The package ships the studio notebook (so `cellkit studio` works from an installed package);
    notebooks/00_studio.ipynb is its source: the two are identical."""
    from pathlib import Path

    from cellkit import cli

    repo = Path(__file__).resolve().parents[1] / "notebooks" / "00_studio.ipynb"
    assert cli.SHIPPED_STUDIO_NOTEBOOK.read_bytes() == repo.read_bytes(), (
        "copy notebooks/00_studio.ipynb to cellkit/_lab/studio.ipynb"
    )


def test_studio_notebook_has_one_code_cell_to_run():
    """The README says: run its cell (Shift+Enter). There is exactly one code cell, and it makes the studio."""
    import nbformat

    from cellkit import cli

    nb = nbformat.read(cli.SHIPPED_STUDIO_NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1
    assert "cellkit.Studio(" in code[0].source
    assert "Shift+Enter" in nb.cells[0].source


def test_demo_writes_a_named_directory_as_a_whole(tmp_path, capsys, monkeypatch):
    """`cellkit demo` writes ./cellkit-demo (or --out) as a whole and prints where; a directory holding
    anything but earlier demo results is refused before the job runs."""
    from cellkit import cli

    runs = []

    def fake_job(args, out):
        runs.append(out)
        (out / "umap.html").write_text(f"run {len(runs)}")
        return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_demo_job", fake_job)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    demo = tmp_path / "cellkit-demo"
    assert f"saved   {demo}: umap.html" in out
    assert runs[0] != demo  # written next to it, then swapped in
    assert main(["demo"]) == 0  # an earlier demo output is replaced
    assert (demo / "umap.html").read_text() == "run 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cellkit-demo"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["demo", "--out", "mine"]) == 2
    assert "non-empty directory" in capsys.readouterr().err
    assert len(runs) == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_what_the_readme_first_command_writes_is_ignored_by_git():
    """`cellkit demo` and `cellkit studio` write into the working directory, a fresh clone in the README:
    git ignores it all, so `git status` stays clean after the README's first command."""
    import shutil
    from pathlib import Path

    from cellkit import cli

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [
        f"{cli.DEMO_DIR}/pbmc_cellkit.h5ad",
        f"{cli.DEMO_DIR}/model/model.safetensors",
        f".{cli.DEMO_DIR}.tmp-0123456789ab/umap.html",
        f".{cli.DEMO_DIR}.old-0123456789ab/umap.html",
        f"{cli.STUDIO_DIR}/{cli.STUDIO_NOTEBOOK_NAME}",
        f"{cli.STUDIO_DIR}/.ipynb_checkpoints/studio-checkpoint.ipynb",
    ]
    r = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True, check=False
    )
    assert r.stdout.split() == paths
