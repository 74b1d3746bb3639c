"""``batch_size="auto"`` with ``output=``: chunked writers (``.h5ad`` and directory), resumption,
``torchrun`` ranks and the CLI's ``--batch-size auto``.

Each chunk file records the batch size its results were computed with; before the outputs are
assembled, every chunk written at a larger size than the smallest one reached (on any rank, or
by the run that is resumed) is computed again, so the outputs are exactly those of a fixed run at
the size that worked. The model (from ``test_auto_batch``) is wide enough that other batches move
results by ~1e-7 (the controls), so these exact comparisons can fail.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

import cellkit
import cellkit.analysis.embeddings as embeddings_mod
from cellkit import CellModel, load_run
from cellkit._inference import CHUNK_BATCH_SIZE, OOM_ABOVE_CELLS_ENV, AutoBatchSize, ResultStore
from cellkit.analysis.atlas import embed_to_output, predict_to_output
from cellkit.cli import main
from cellkit.data.tokenize import tokenize

from .test_auto_batch import make_adata, make_model

OPTS = {"chunk_size": 40, "progress": False}  # 72 cells: chunks of 40 and 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


@pytest.fixture
def adata():
    return make_adata()


@pytest.fixture
def model():
    return make_model()


def _read(out):
    return np.load(out / "X_cellkit.npy") if out.suffix != ".h5ad" else ad.read_h5ad(out).obsm["X_cellkit"]


@pytest.mark.parametrize("name", ["emb", "emb.h5ad"])
def test_output_auto_after_oom_equals_the_fixed_size_exactly(adata, model, tmp_path, monkeypatch, name):
    embed_to_output(adata, model, output=tmp_path / f"fixed16-{name}", batch_size=16, **OPTS)
    embed_to_output(adata, model, output=tmp_path / f"fixed64-{name}", batch_size=64, **OPTS)
    want = _read(tmp_path / f"fixed16-{name}")
    assert np.abs(_read(tmp_path / f"fixed64-{name}") - want).max() > 0  # the control
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "20")  # 64 -> 32 -> 16
    out = tmp_path / name
    run = embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    np.testing.assert_array_equal(_read(out), want)
    assert run.batch_size == 16 and run.redone == 0  # the size carried over from the first chunk
    record = load_run(out)
    assert record.options["batch_size"] == "auto"
    assert record.metrics["batch_size_worked"] == 16
    if name == "emb":
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["parameters"]["batch_size"] == "auto" and manifest["batch_size_worked"] == 16


def test_a_later_chunk_that_halves_redoes_the_earlier_ones(model, tmp_path, monkeypatch, caplog):
    adata = make_adata()
    adata = adata[np.argsort(adata.X.getnnz(axis=1), kind="stable")].copy()  # the long cells last
    lengths = tokenize(adata, model, progress=False).lengths
    l0 = int(lengths[:40].max())
    embed_to_output(adata, model, output=tmp_path / "fixed", batch_size=8, **OPTS)
    forward = CellModel.forward

    def token_budget(self, gene_ids, *args, **kw):  # 16 cells of the first chunk fit, not of the second
        if gene_ids.numel() > 16 * l0:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return forward(self, gene_ids, *args, **kw)

    monkeypatch.setattr(CellModel, "forward", token_budget)
    with caplog.at_level(logging.WARNING, logger="cellkit"):
        run = embed_to_output(adata, model, output=tmp_path / "auto", batch_size="auto", **OPTS)
    assert run.batch_size == 8 and run.redone == 1 and run.computed == 2
    assert "computed again with batches of 8 cells" in caplog.text
    np.testing.assert_array_equal(np.load(tmp_path / "auto" / "X_cellkit.npy"), np.load(tmp_path / "fixed" / "X_cellkit.npy"))


def _dies_after_one_chunk(monkeypatch):
    real = embeddings_mod._embed_tokens
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped after the first chunk was written
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings_mod, "_embed_tokens", dies)
    return real, calls


@pytest.mark.parametrize("name", ["emb", "emb.h5ad"])
def test_a_resumed_auto_run_keeps_its_chunks_and_their_size(adata, model, tmp_path, monkeypatch, name):
    embed_to_output(adata, model, output=tmp_path / f"fixed-{name}", batch_size=16, **OPTS)
    real, calls = _dies_after_one_chunk(monkeypatch)
    out = tmp_path / name
    parts = ResultStore(out if name == "emb" else tmp_path / "emb.h5ad.parts")
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "20")
    with pytest.raises(KeyboardInterrupt):
        embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    assert parts.has_chunk(0) and not parts.has_chunk(1) and parts.chunk_batch_size(0) == 16
    assert CHUNK_BATCH_SIZE not in parts.read_chunk(0)
    # the memory is free now: the resumed run goes on at the size its chunks were computed with
    monkeypatch.delenv(OOM_ABOVE_CELLS_ENV)
    monkeypatch.setattr(embeddings_mod, "_embed_tokens", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    run = embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    assert len(calls) == 1 and (run.computed, run.skipped, run.redone, run.batch_size) == (1, 1, 0, 16)
    np.testing.assert_array_equal(_read(out), _read(tmp_path / f"fixed-{name}"))


def test_a_resumed_run_that_runs_out_of_memory_redoes_the_chunks_on_disk(adata, model, tmp_path, monkeypatch):
    embed_to_output(adata, model, output=tmp_path / "fixed", batch_size=16, **OPTS)
    _dies_after_one_chunk(monkeypatch)
    out = tmp_path / "emb"
    with pytest.raises(KeyboardInterrupt):  # chunk 0 at 64 cells per batch
        embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    assert ResultStore(out).chunk_batch_size(0) == 64
    monkeypatch.undo()
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "20")  # now 64 does not fit: chunk 1 (32 cells) runs at 16
    run = embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    assert (run.computed, run.skipped, run.redone, run.batch_size) == (1, 1, 1, 16)
    np.testing.assert_array_equal(np.load(out / "X_cellkit.npy"), np.load(tmp_path / "fixed" / "X_cellkit.npy"))
    again = embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)  # complete: nothing to do
    assert again.already_complete and again.batch_size == 16


def test_auto_and_a_fixed_size_are_different_runs(adata, model, tmp_path):
    out = tmp_path / "emb"
    embed_to_output(adata, model, output=out, batch_size="auto", **OPTS)
    with pytest.raises(cellkit.ConfigError, match="batch_size"):
        embed_to_output(adata, model, output=out, batch_size=64, **OPTS)
    with pytest.raises(cellkit.ConfigError, match="batch_size"):
        embed_to_output(adata, model, output=out, batch_size="big", **OPTS)


def test_predict_output_auto_equals_fixed(adata, tmp_path, monkeypatch):
    model = make_model(classifier=True)
    predict_to_output(adata, model, output=tmp_path / "fixed.h5ad", batch_size=8, **OPTS)
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "9")
    auto = AutoBatchSize()
    run = predict_to_output(adata, model, output=tmp_path / "auto.h5ad", batch_size=auto, **OPTS)
    assert run.batch_size == auto.size == 8
    got, want = ad.read_h5ad(tmp_path / "auto.h5ad"), ad.read_h5ad(tmp_path / "fixed.h5ad")
    key = "cellkit_prediction"
    np.testing.assert_array_equal(got.obsm[f"{key}_probabilities"], want.obsm[f"{key}_probabilities"])
    assert list(got.obs[key]) == list(want.obs[key])
    assert got.uns[key]["batch_size"] == {"auto": 64, "worked": 8}
    assert "batch_size" not in want.uns[key]
    predict_to_output(adata, model, output=tmp_path / "d", batch_size="auto", **OPTS)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["batch_size_worked"] == 8


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def files(adata, model, tmp_path):
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    model.save(tmp_path / "model")
    return data, tmp_path / "model"


def test_cli_batch_size_auto(files, tmp_path, monkeypatch, capsys):
    data, model_dir = files
    opts = ["--model", str(model_dir), "--chunk-size", "40", "--quiet"]
    assert main(["embed", str(data), "--output", str(tmp_path / "fixed"), "--batch-size", "16", *opts]) == 0
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "20")
    capsys.readouterr()
    assert main(["embed", str(data), "--output", str(tmp_path / "auto"), "--batch-size", "auto", *opts]) == 0
    printed = capsys.readouterr().out
    assert "batch size auto: 64 → 16 after out-of-memory" in printed
    np.testing.assert_array_equal(np.load(tmp_path / "auto" / "X_cellkit.npy"), np.load(tmp_path / "fixed" / "X_cellkit.npy"))
    record = load_run(tmp_path / "auto")
    assert record.options["batch_size"] == "auto" and record.metrics["batch_size_worked"] == 16


@pytest.mark.parametrize("bad", ["0", "-3", "big", "1.5"])
def test_cli_batch_size_is_checked(files, tmp_path, capsys, bad):
    data, model_dir = files
    with pytest.raises(SystemExit) as err:
        main(["embed", str(data), "--model", str(model_dir), "--output", str(tmp_path / "o"), "--batch-size", bad])
    assert err.value.code == 2
    assert "--batch-size: takes a positive integer or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- torchrun
def _cli(args, *, nproc=1, env_extra=None):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([*launcher, "-m", "cellkit", *map(str, args)], capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_ranks_agree_on_the_smallest_size(model, tmp_path):
    # 100 cells in chunks of 60 (rank 0) and 40 (rank 1); more than 45 cells per forward run out of
    # memory: rank 0 halves to 32, rank 1 fits at 64 and must compute its chunk again at 32
    data = tmp_path / "cells.h5ad"
    make_adata(100).write_h5ad(data)
    model.save(tmp_path / "model")
    opts = ["--model", tmp_path / "model", "--chunk-size", 60, "--quiet"]
    _cli(["embed", data, "--output", tmp_path / "fixed32", "--batch-size", 32, *opts])
    _cli(["embed", data, "--output", tmp_path / "fixed64", "--batch-size", 64, *opts])
    want = np.load(tmp_path / "fixed32" / "X_cellkit.npy")
    assert np.abs(np.load(tmp_path / "fixed64" / "X_cellkit.npy") - want).max() > 0  # the control
    two = _cli(
        ["embed", data, "--output", tmp_path / "two", "--batch-size", "auto", *opts],
        nproc=2,
        env_extra={OOM_ABOVE_CELLS_ENV: "45"},
    )
    assert "batch size auto: 64 → 32 after out-of-memory (1 chunk computed again)" in two.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "X_cellkit.npy"), want)
    assert load_run(tmp_path / "two").metrics["batch_size_worked"] == 32
