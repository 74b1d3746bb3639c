"""``cellkit finetune`` / ``cellkit pretrain``: in-process and under torchrun (2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cellkit import CheckpointError, load_model
from cellkit.cli import main

from .test_finetune import make_adata, make_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(data)
    model_dir = tmp_path / "model"
    make_model().save(model_dir)
    return data, model_dir


def test_finetune_command(files, tmp_path, capsys):
    data, model_dir = files
    out = tmp_path / "tuned"
    code = main(
        [
            "finetune",
            "--model", str(model_dir),
            "--data", str(data),
            "--label-key", "cell_type",
            "--epochs", "3",
            "--lr", "3e-3",
            "--batch-size", "16",
            "--out", str(out),
            "--checkpoint-dir", str(out / "ckpt"),  # inside the run directory, as users lay runs out
            "--option", "schedule=constant",
            "--quiet",
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "test    accuracy" in text
    assert "baseline logistic regression (same cells" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["classes"] == ["type0", "type1", "type2"]
    assert (out / "history_epochs.csv").is_file()
    tuned = load_model(out / "model")
    with pytest.raises(CheckpointError, match="run directory"):
        load_model(out)
    assert tuned.config.heads["classifier"]["labels"] == ["type0", "type1", "type2"]
    assert (out / "ckpt" / "latest").is_file()  # the run directory keeps its checkpoints
    # a second run into the same --out replaces the model as a whole and keeps the other entries
    (out / "notes.txt").write_text("mine")
    again = ["finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "cell_type",
             "--epochs", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(again) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "ckpt" / "latest").is_file()
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
    load_model(out / "model")
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_pretrain_command_fresh_model(files, tmp_path, capsys):
    data, _ = files
    out = tmp_path / "pre"
    code = main(
        ["pretrain", "--data", str(data), "--family", "scgpt", "--arch", "d_model=16", "--arch", "n_heads=2",
         "--arch", "n_layers=1", "--arch", "d_ff=32", "--epochs", "2", "--out", str(out), "--quiet"]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "loss" in text
    model = load_model(out / "model")
    assert model.config.encoder.d_model == 16
    assert "G0" in model.vocab


def test_finetune_and_pretrain_from_a_shard_directory(files, tmp_path, capsys):
    """Big atlases are tokenized once into shards; the training commands read them directly."""
    import cellkit

    _data, model_dir = files
    model = load_model(model_dir)
    shards = tmp_path / "shards"
    cellkit.tokenize(
        make_adata(), model, output=shards, obs_columns=["cell_type"], max_shard_samples=40, progress=False
    )
    out = tmp_path / "tuned"
    args = ["finetune", "--model", str(model_dir), "--data", str(shards), "--label-key", "cell_type",
            "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "pre-tokenized cells ('scgpt' scheme" in text
    assert "test    accuracy" in text
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["type0", "type1", "type2"]
    pre = ["pretrain", "--model", str(model_dir), "--data", str(shards), "--epochs", "1", "--quiet"]
    assert main(pre) == 0
    assert "status  completed" in capsys.readouterr().out
    # a fresh model needs genes, which shards do not carry; a directory without a manifest is no data
    assert main(["pretrain", "--data", str(shards), "--epochs", "1", "--quiet"]) == 2
    assert "needs --model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(["finetune", "--model", str(model_dir), "--data", str(tmp_path / "empty"), "--label-key", "x"])
        == 2
    )
    assert "not a cellkit shard directory" in capsys.readouterr().err


def test_use_raw_flag_is_three_valued():
    import argparse

    from cellkit.cli import _training_parser

    p = argparse.ArgumentParser()
    _training_parser(p, needs_model=False)
    assert p.parse_args(["--data", "x"]).use_raw is None  # the model's convention
    assert p.parse_args(["--data", "x", "--use-raw"]).use_raw is True
    assert p.parse_args(["--data", "x", "--no-use-raw"]).use_raw is False


def test_bad_command_line_inputs(files, capsys):
    data, model_dir = files
    assert (
        main(["finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "nope", "--quiet"])
        == 2
    )
    assert "label_key='nope' is not an obs column" in capsys.readouterr().err
    assert main(["finetune", "--model", str(model_dir), "--data", "missing.h5ad", "--label-key", "x"]) == 2
    assert "No data at" in capsys.readouterr().err
    args = [
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--label-key",
        "cell_type",
        "--lr",
        "0",
    ]
    assert main(args) == 2
    assert "learning rate" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_under_torchrun(files, tmp_path):
    data, model_dir = files
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "cellkit", "finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "cell_type",
        "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--out", str(out), "--quiet",
        "--checkpoint-dir", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ddp     2 processes") == 1  # rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["status"] == "completed"
    assert (tmp_path / "ckpt" / "latest").is_file()
