"""``cellkit tokenize`` / ``cellkit embed`` / ``cellkit predict``: results, outputs, errors (in-process)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import cellkit.analysis.embeddings as embeddings_mod
from cellkit.analysis.embeddings import embed_cells
from cellkit.cli import main
from cellkit.tasks import finetune, predict

from .test_finetune import make_adata, make_model

pytestmark = pytest.mark.timeout(600)

FAST = ["--batch-size", "8", "--chunk-size", "16", "--quiet"]


@pytest.fixture
def files(tmp_path):
    adata = make_adata(n_per_class=20)
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    model_dir = tmp_path / "model"
    make_model().save(model_dir)
    return data, model_dir


def expected(data, **kw):
    a = ad.read_h5ad(data)
    embed_cells(a, make_model(), batch_size=8, chunk_size=16, progress=False, **kw)
    return a.obsm["X_cellkit"]


def test_tokenize_then_embed_the_shards(files, tmp_path, capsys):
    data, model_dir = files
    shards = tmp_path / "tokens"
    assert main(["tokenize", str(data), "--model", str(model_dir), "--output", str(shards),
                 "--obs-column", "cell_type", "--shard-size", "25", "--quiet"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "60 cells tokenized" in text and "3 shard(s)" in text
    # the shards embed to the same bits as the .h5ad they came from (same chunks, same batches)
    assert main(["embed", str(shards), "--model", str(model_dir), "--output", str(tmp_path / "e"), *FAST]) == 0
    assert "4 chunks: 4 computed, 0 found done earlier" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "X_cellkit.npy"), expected(data))
    # a shard directory to an .h5ad: a new file holding the cells' names and the embedding
    assert main(["embed", str(shards), "--model", str(model_dir), "--output", str(tmp_path / "e.h5ad"), *FAST]) == 0
    got = ad.read_h5ad(tmp_path / "e.h5ad")
    assert list(got.obs_names) == list(ad.read_h5ad(data).obs_names)
    np.testing.assert_array_equal(got.obsm["X_cellkit"], expected(data))
    # tokenizing again into the same directory needs --overwrite
    assert main(["tokenize", str(data), "--model", str(model_dir), "--output", str(shards), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_embed_h5ad_to_h5ad_and_in_place(files, tmp_path, capsys):
    data, model_dir = files
    out = tmp_path / "out.h5ad"
    args = ["embed", str(data), "--model", str(model_dir), "--key-added", "X_mine", "--cells",
            "cell_type != 'type0'", *FAST]  # fmt: skip
    assert main([*args, "--output", str(out)]) == 0
    got, src = ad.read_h5ad(out), ad.read_h5ad(data)
    want = expected(data, cells="cell_type != 'type0'")
    np.testing.assert_array_equal(got.obsm["X_mine"], want)
    assert "X_mine" not in src.obsm and (got.X != src.X).nnz == 0
    # the same command again: the output exists and is not the input
    assert main([*args, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(out), "--overwrite"]) == 0
    # into the input file itself (atomically replaced)
    assert main([*args, "--output", str(data)]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(data).obsm["X_mine"], want)
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob(".*.tmp"))


def test_embed_into_an_h5ad_without_uns_or_obsm(files, tmp_path):
    """A valid .h5ad may lack the uns / obsm groups (anndata's concat_on_disk writes none): still written."""
    import shutil

    import h5py

    data, model_dir = files
    bare = tmp_path / "bare.h5ad"
    shutil.copy(data, bare)
    with h5py.File(bare, "r+") as f:
        for group in ("uns", "obsm"):
            if group in f:
                del f[group]
    out = tmp_path / "out.h5ad"
    assert main(["embed", str(bare), "--model", str(model_dir), "--output", str(out), *FAST]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_cellkit"], expected(data))


def test_predict_matches_cellkit_predict(files, tmp_path, capsys):
    data, model_dir = files
    adata = ad.read_h5ad(data)
    result = finetune(adata, make_model(), label_key="cell_type", epochs=1, batch_size=16, progress=False)
    tuned = tmp_path / "tuned"
    result.model.save(tuned)
    predict(adata, result.model, batch_size=8, progress=False)
    common = ["predict", str(data), "--model", str(tuned), "--batch-size", "8", "--chunk-size", "100", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "p.h5ad")]) == 0
    got = ad.read_h5ad(tmp_path / "p.h5ad")
    key = "cellkit_prediction"
    # one chunk holds all 60 cells: the batches of cellkit.predict, the same bits
    np.testing.assert_array_equal(got.obsm[f"{key}_probabilities"], adata.obsm[f"{key}_probabilities"])
    assert list(got.obs[key]) == list(adata.obs[key])
    np.testing.assert_array_equal(got.obs[f"{key}_confidence"], adata.obs[f"{key}_confidence"])
    assert list(got.uns[key]["classes"]) == ["type0", "type1", "type2"]
    assert main([*common, "--output", str(tmp_path / "p")]) == 0
    assert list(np.load(tmp_path / "p" / f"{key}.npy")) == list(adata.obs[key])
    np.testing.assert_array_equal(np.load(tmp_path / "p" / f"{key}_probabilities.npy"), adata.obsm[f"{key}_probabilities"])
    # a model without a classifier
    assert main(["predict", str(data), "--model", str(model_dir), "--output", str(tmp_path / "q.h5ad")]) == 2
    assert "classifier" in capsys.readouterr().err


def test_errors_exit_2_before_any_work(files, tmp_path, capsys, monkeypatch):
    data, model_dir = files

    def no_work(*a, **k):
        raise AssertionError("nothing may be embedded when the command fails its checks")

    monkeypatch.setattr(embeddings_mod, "_embed_tokens", no_work)
    (tmp_path / "file").write_text("x")
    cases = [
        # an output that cannot be created: checked before the model is even read
        (["embed", str(data), "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "file" / "o")], "is a file"),
        (["embed", str(data), "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist"),
        (["embed", str(tmp_path / "none.h5ad"), "--model", str(model_dir), "--output", str(tmp_path / "o")], "No data"),
        (["embed", str(data), "--model", str(model_dir), "--output", str(tmp_path)], "not a cellkit result store"),
        (["tokenize", str(data), "--model", str(model_dir), "--output", str(tmp_path / "file")], "file"),
        (["predict", str(data), "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "p")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cellkit: error:") and message in err, (argv, err)


def test_rerun_with_other_settings_is_refused(files, tmp_path, capsys):
    data, model_dir = files
    out = tmp_path / "e"
    assert main(["embed", str(data), "--model", str(model_dir), "--output", str(out), *FAST]) == 0
    assert main(["embed", str(data), "--model", str(model_dir), "--output", str(out), *FAST]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["embed", str(data), "--model", str(model_dir), "--output", str(out), *FAST, "--pooling", "mean"]) == 2
    assert "pooling" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["tokenize", "embed", "predict"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"cellkit {command} " in text
