"""Chunked, resumable inference into files (``embed_cells(..., output=...)``) and under torchrun.

The torchrun tests start 2 gloo processes on the CPU (``python -m torch.distributed.run``) on 60
cells with a tiny model; they are marked slow (process start-up takes seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

import cellkit.analysis.embeddings as embeddings_mod
from cellkit import ConfigError
from cellkit._inference import ChunkPlan, read_cells, run_inference
from cellkit.analysis.embeddings import cell_embeddings, embed_cells
from cellkit.data.tokenize import tokenize
from cellkit.data.tokenized import ShardedTokens

from .test_finetune import make_adata, make_model

pytestmark = pytest.mark.timeout(600)

EMBED = {"batch_size": 8, "chunk_size": 16, "progress": False}


@pytest.fixture
def adata():
    return make_adata(n_per_class=20)  # 60 cells


@pytest.fixture
def model():
    return make_model()


def reference(adata, model, **kw):
    a = adata.copy()
    embed_cells(a, model, **{**EMBED, **kw})
    return a.obsm["X_cellkit"]


def test_chunk_plan_deals_every_chunk_once():
    plan = ChunkPlan(60, 16)
    assert plan.n_chunks == 4
    assert [plan.bounds(k) for k in range(4)] == [(0, 16), (16, 32), (32, 48), (48, 60)]
    for world in (1, 2, 3, 5):
        dealt = sorted(k for r in range(world) for k in plan.for_rank(r, world))
        assert dealt == [0, 1, 2, 3]
    assert plan.for_rank(1, 2) == [1, 3]


def test_read_cells_across_shards_equals_memory(adata, model, tmp_path):
    mem = tokenize(adata, model, progress=False)
    shards = tokenize(adata, model, output=tmp_path / "tok", max_shard_samples=7, progress=False)
    assert shards.n_shards == 9
    for a, b in [(0, 60), (3, 19), (14, 15), (20, 20), (55, 60)]:
        part = read_cells(shards, a, b)
        want = mem.subset(np.arange(a, b))
        np.testing.assert_array_equal(part.gene_ids, want.gene_ids)
        np.testing.assert_array_equal(part.values, want.values)
        np.testing.assert_array_equal(part.offsets, want.offsets)
        assert list(part.obs_names) == list(want.obs_names)


def test_shards_are_read_lazily_with_the_same_result(adata, model, tmp_path, monkeypatch):
    mem = tokenize(adata, model, progress=False)
    shards = tokenize(adata, model, output=tmp_path / "tok", max_shard_samples=7, progress=False)

    def refuse(self):
        raise AssertionError("run_inference must not load a shard directory into memory")

    monkeypatch.setattr(ShardedTokens, "to_memory", refuse)
    want = cell_embeddings(model, mem, batch_size=8, progress=False)
    # one window holding all 60 cells: the same batches as in memory, the same bits
    np.testing.assert_array_equal(cell_embeddings(model, shards, batch_size=8, progress=False), want)

    def fn(out, batch):  # what cell_embeddings computes for this scGPT-family model (L2-normalised)
        return {"e": torch.nn.functional.normalize(out.cell_embedding.float(), dim=1)}

    small = run_inference(model, shards, fn, batch_size=8, progress=False, window=16)["e"]
    np.testing.assert_allclose(small, want, rtol=1e-5, atol=1e-6)  # other batches: within rounding


def test_output_dir_equals_in_memory_bit_for_bit(adata, model, tmp_path):
    want = reference(adata, model)
    out = tmp_path / "emb"
    before = set(adata.obsm)
    assert embed_cells(adata, model, output=out, **EMBED) is None
    assert set(adata.obsm) == before  # with output=, the AnnData is left as it is
    got = np.load(out / "X_cellkit.npy", mmap_mode="r")
    np.testing.assert_array_equal(got, want)
    assert list(np.load(out / "obs_names.npy")) == list(adata.obs_names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_chunks"] == 4
    assert not (out / "parts").exists()  # chunk results are removed once assembled


def test_output_h5ad_of_a_backed_file(adata, model, tmp_path):
    want = reference(adata, model)
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    backed = ad.read_h5ad(src, backed="r")
    embed_cells(backed, model, output=tmp_path / "out.h5ad", **EMBED)
    got = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(got.obsm["X_cellkit"], want)
    assert (got.X != adata.X).nnz == 0 and list(got.obs.columns) == list(adata.obs.columns)
    assert "X_cellkit" in got.uns["cellkit"]["written"]["obsm"]
    assert not (tmp_path / "out.h5ad.parts").exists()
    assert "X_cellkit" not in ad.read_h5ad(src).obsm  # the input file is untouched


def test_selected_cells_only_rows_nan_elsewhere(adata, model, tmp_path):
    want = reference(adata, model, cells="cell_type == 'type1'")
    embed_cells(adata, model, output=tmp_path / "o.h5ad", cells="cell_type == 'type1'", **EMBED)
    got = ad.read_h5ad(tmp_path / "o.h5ad").obsm["X_cellkit"]
    np.testing.assert_array_equal(got, want)  # NaN rows compare equal position by position
    assert np.isnan(got[adata.obs["cell_type"] != "type1"]).all()


@pytest.mark.parametrize("name", ["emb", "emb.h5ad"])
def test_killed_run_resumes_and_skips_done_chunks(adata, model, tmp_path, monkeypatch, name):
    want = reference(adata, model)
    real = embeddings_mod._embed_tokens
    calls = []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is stopped mid-way (after 2 chunks were written)
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings_mod, "_embed_tokens", dies_on_third)
    out = tmp_path / name
    parts = out / "parts" if name == "emb" else tmp_path / "emb.h5ad.parts" / "parts"
    with pytest.raises(KeyboardInterrupt):
        embed_cells(adata, model, output=out, **EMBED)
    assert sorted(p.name for p in parts.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz"]
    assert not (out / "X_cellkit.npy").exists() and not out.is_file()

    calls.clear()
    monkeypatch.setattr(embeddings_mod, "_embed_tokens", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    embed_cells(adata, model, output=out, **EMBED)
    assert len(calls) == 2  # only the 2 chunks not written before
    got = np.load(out / "X_cellkit.npy") if name == "emb" else ad.read_h5ad(out).obsm["X_cellkit"]
    np.testing.assert_array_equal(got, want)
    if name == "emb":
        calls.clear()
        embed_cells(adata, model, output=out, **EMBED)  # complete: nothing to recompute
        assert calls == []
    else:
        assert not parts.parent.exists()  # the work directory is removed once the file is written


def test_other_arguments_are_refused_or_start_over(adata, model, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    embed_cells(adata, model, output=out, **EMBED)
    with pytest.raises(ConfigError, match="batch_size"):
        embed_cells(adata, model, output=out, **{**EMBED, "batch_size": 4})
    with pytest.raises(ConfigError, match="model"):
        embed_cells(adata, make_model(seed=1), output=out, **EMBED)
    embed_cells(adata, model, output=out, overwrite=True, **{**EMBED, "batch_size": 4})
    assert json.loads((out / "manifest.json").read_text())["parameters"]["batch_size"] == 4
    np.testing.assert_allclose(np.load(out / "X_cellkit.npy"), reference(adata, model), rtol=1e-5, atol=1e-6)


def test_output_checked_before_work(adata, model, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("no cell may be embedded before the output is checked")

    monkeypatch.setattr(embeddings_mod, "_embed_tokens", no_work)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a cellkit result store"):
        embed_cells(adata, model, output=tmp_path / "mine", **EMBED)
    (tmp_path / "taken.h5ad").write_text("x")
    with pytest.raises(ConfigError, match="exists"):
        embed_cells(adata, model, output=tmp_path / "taken.h5ad", **EMBED)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        embed_cells(adata, model, output=tmp_path / "file" / "emb", **EMBED)
    with pytest.raises(ConfigError, match="copy"):
        embed_cells(adata, model, output=tmp_path / "x", copy=True, **EMBED)


def test_precision_fp32_default_and_amp_alias_conflict(adata, model):
    tokens = tokenize(adata, model, progress=False)
    a = cell_embeddings(model, tokens, batch_size=8, progress=False)
    b = cell_embeddings(model, tokens, batch_size=8, progress=False, precision="fp32")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="precision"):
        cell_embeddings(model, tokens, progress=False, precision="fp8")
    with pytest.raises(ConfigError, match="not both"):
        cell_embeddings(model, tokens, progress=False, precision="bf16", amp="bf16")


# ------------------------------------------------------------------------------------------ torchrun
def _cli(args, *, nproc=1, env_extra=None, check=True):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "cellkit", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def files(adata, model, tmp_path):
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    model_dir = tmp_path / "model"
    model.save(model_dir)
    return data, model_dir


@pytest.mark.slow
def test_torchrun_embed_equals_one_process_bit_for_bit(files, tmp_path):
    data, model_dir = files
    opts = ["--model", model_dir, "--batch-size", 8, "--chunk-size", 16, "--quiet"]
    _cli(["embed", data, "--output", tmp_path / "one", *opts])
    two = _cli(["embed", data, "--output", tmp_path / "two", *opts], nproc=2)
    assert two.stdout.count("4 chunks: 4 computed") == 1  # rank 0 reports
    a, b = np.load(tmp_path / "one" / "X_cellkit.npy"), np.load(tmp_path / "two" / "X_cellkit.npy")
    assert a.shape == (60, 16) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    names = np.load(tmp_path / "two" / "obs_names.npy")
    assert list(names) == list(ad.read_h5ad(data).obs_names)  # input order
    # .h5ad output under torchrun: the same bits in obsm
    _cli(["embed", data, "--output", tmp_path / "two.h5ad", *opts], nproc=2)
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "two.h5ad").obsm["X_cellkit"], a)


@pytest.mark.slow
def test_torchrun_killed_job_resumes(files, tmp_path):
    data, model_dir = files
    opts = ["--model", model_dir, "--batch-size", 8, "--chunk-size", 8, "--quiet"]  # 8 chunks
    _cli(["embed", data, "--output", tmp_path / "one", *opts])
    out = tmp_path / "two"
    # each rank leaves abruptly (os._exit, like a kill) after writing 2 of its 4 chunks; torchrun
    # then stops the other rank, which may not have written its second chunk yet
    env = {"CELLKIT_EXIT_AFTER_CHUNKS": "2"}
    killed = _cli(["embed", data, "--output", out, *opts], nproc=2, env_extra=env, check=False)
    assert killed.returncode != 0
    done = len(list((out / "parts").glob("chunk-*.npz")))
    assert 2 <= done <= 4 and not (out / "X_cellkit.npy").exists()
    again = _cli(["embed", data, "--output", out, *opts], nproc=2)
    assert f"8 chunks: {8 - done} computed, {done} found done earlier" in again.stdout
    np.testing.assert_array_equal(np.load(out / "X_cellkit.npy"), np.load(tmp_path / "one" / "X_cellkit.npy"))


def test_bf16_on_a_cpu_without_bf16_units_stays_fp32_with_a_warning(adata, model, tmp_path, monkeypatch):
    """precision='bf16' goes through cellkit.core.precision: without bf16 units it runs fp32 (bit-equal)."""
    import cellkit.core.precision as P

    monkeypatch.setattr(P, "_warned", set())
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)
    tokens = tokenize(adata, model, progress=False)
    with pytest.warns(RuntimeWarning, match="staying in fp32"):
        got = cell_embeddings(model, tokens, batch_size=8, progress=False, device="cpu", precision="bf16")
    np.testing.assert_array_equal(got, cell_embeddings(model, tokens, batch_size=8, progress=False))


def test_bf16_where_the_cpu_has_units_runs_bf16_close_to_fp32(adata, model, tmp_path, monkeypatch):
    """With bf16 units (faked: emulated bf16 gives the same numbers, only slower) the run is bf16, and the
    resumable output records it: a rerun in fp32 is another run."""
    import cellkit.core.precision as P

    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "AMX")
    tokens = tokenize(adata, model, progress=False)
    ref = cell_embeddings(model, tokens, batch_size=8, progress=False, device="cpu")
    got = cell_embeddings(model, tokens, batch_size=8, progress=False, device="cpu", precision="bf16")
    assert not np.array_equal(got, ref)  # bf16 really ran
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos.min()  # bf16 keeps ~3 significant digits per value
    embed_cells(adata, model, output=tmp_path / "e", precision="bf16", **EMBED)
    with pytest.raises(ConfigError, match="precision"):
        embed_cells(adata, model, output=tmp_path / "e", precision="fp32", **EMBED)


def test_an_unknown_precision_fails_before_work(adata, model, tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of"):
        embed_cells(adata, model, output=tmp_path / "e", precision="int8", **EMBED)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_torchrun_predict_equals_one_process(files, tmp_path):
    from cellkit.tasks import finetune

    data, _ = files
    result = finetune(ad.read_h5ad(data), make_model(), label_key="cell_type", epochs=1, batch_size=16, progress=False)
    tuned = tmp_path / "tuned"
    result.model.save(tuned)
    opts = ["--model", tuned, "--batch-size", 8, "--chunk-size", 16, "--quiet"]
    _cli(["predict", data, "--output", tmp_path / "one.h5ad", *opts])
    _cli(["predict", data, "--output", tmp_path / "two.h5ad", *opts], nproc=2)
    one, two = ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "two.h5ad")
    key = "cellkit_prediction"
    np.testing.assert_array_equal(one.obsm[f"{key}_probabilities"], two.obsm[f"{key}_probabilities"])
    assert list(one.obs[key]) == list(two.obs[key]) and one.obs[key].notna().all()
