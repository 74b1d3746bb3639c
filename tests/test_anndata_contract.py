"""The caller's AnnData and results stay trustworthy (issue 15 §5).

Every AnnData entry point refuses duplicate ``obs_names`` up front; no writer replaces an entry
cellkit did not write unless ``overwrite=True`` (its own entries, recorded in
``uns["cellkit"]``, are replaced freely); non-finite weights, inputs and results raise; the CLI's
``--objectives`` is checked by argparse; selecting no cell says so. After every failing call the
caller's AnnData is deep-equal to what it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import CheckpointError, DataError
from cellkit.analysis import (
    attention_difference,
    attention_maps,
    contextual_gene_embeddings,
    embed_cells,
    embedding_metrics,
    gene_attention,
    in_silico_perturb,
    score_programs,
    transfer_labels,
    umap,
)
from cellkit.cli import main as cli_main
from cellkit.datasets import synthetic_perturbation
from cellkit.perturbation import PerturbationArchitecture, evaluate_perturbation, fit_perturbation_model

from .test_finetune import make_adata, make_model

# anndata warns when duplicate names are made; refusing them is what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:Observation names are not unique:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


# ============================================================================ deep equality
def _equal_values(a: Any, b: Any, where: str) -> None:
    """Recursive equality of AnnData entries (arrays, sparse, frames, dicts, scalars); NaN == NaN."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping), where
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)} differ"
        for k in a:
            _equal_values(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, obj=where)
    elif sp.issparse(a):
        assert sp.issparse(b) and a.shape == b.shape and a.dtype == b.dtype, where
        assert (a != b).nnz == 0 or np.array_equal(a.toarray(), b.toarray(), equal_nan=True), where
    elif isinstance(a, np.ndarray):
        b = np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if a.dtype.kind in "fc":
            assert np.array_equal(a, b, equal_nan=True), where
        else:
            assert np.array_equal(a, b), where
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal_values(x, y, f"{where}[{i}]")
    else:
        assert (a == b) or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def assert_adata_equal(a: ad.AnnData, b: ad.AnnData) -> None:
    """X, layers, obs, var, obsm, varm, obsp, varp, uns and raw are equal (names and order too)."""
    assert a.shape == b.shape
    _equal_values(a.X, b.X, "X")
    pd.testing.assert_frame_equal(a.obs, b.obs, obj="obs")
    pd.testing.assert_frame_equal(a.var, b.var, obj="var")
    for attr in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
        _equal_values(dict(getattr(a, attr)), dict(getattr(b, attr)), attr)
    assert (a.raw is None) == (b.raw is None)
    if a.raw is not None:
        _equal_values(a.raw.X, b.raw.X, "raw.X")
        pd.testing.assert_frame_equal(a.raw.var, b.raw.var, obj="raw.var")


def test_deep_equal_helper_sees_changes():
    a = rich_adata()
    assert_adata_equal(a, a.copy())
    for change in (
        lambda x: x.obs.__setitem__("extra", 1),
        lambda x: x.obsm.__setitem__("X_pca", x.obsm["X_pca"] + 1),
        lambda x: x.uns["info"].__setitem__("k", 2),
        lambda x: x.layers.__setitem__("counts", x.layers["counts"] * 2),
        lambda x: x.obsp.__setitem__("conn", sp.eye(x.n_obs, format="csr")),
    ):
        b = a.copy()
        change(b)
        with pytest.raises(AssertionError):
            assert_adata_equal(a, b)


# ============================================================================ data and models
N_PER_CLASS = 8


def rich_adata(n_per_class: int = N_PER_CLASS) -> ad.AnnData:
    """Counts with labels, a foreign embedding, layers, a graph, uns and raw: something to keep intact."""
    a = make_adata(n_per_class=n_per_class)
    r = np.random.default_rng(1)
    a.layers["counts"] = a.X.copy()
    a.obsm["X_pca"] = r.normal(size=(a.n_obs, 5)).astype(np.float32)
    a.obsm["X_cellkit"] = r.normal(size=(a.n_obs, 16)).astype(np.float32)  # "embedded" (for mapping, umap)
    a.obsp["conn"] = sp.random(a.n_obs, a.n_obs, density=0.05, format="csr", random_state=0)
    a.varm["loadings"] = r.normal(size=(a.n_vars, 3))
    a.uns["info"] = {"k": 1, "name": "mine"}
    a.raw = a.copy()
    return a


def with_duplicates(a: ad.AnnData) -> ad.AnnData:
    names = list(a.obs_names)
    names[1] = names[0]
    names[5] = names[4]
    a.obs_names = names
    return a


def classifier_model() -> cellkit.CellModel:
    m = make_model()
    m.add_head("classifier", n_classes=3, labels=["type0", "type1", "type2"])
    return m.eval()


@pytest.fixture(scope="module")
def model() -> cellkit.CellModel:
    return make_model().eval()


@pytest.fixture(scope="module")
def clf_model() -> cellkit.CellModel:
    return classifier_model()


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return synthetic_perturbation(
        n_genes=12, n_control=20, n_cells_per_perturbation=6, n_single=3, n_double=1, n_targets=3, seed=0
    )


# ============================================================================ 1. duplicate obs_names
FIX = "obs_names_make_unique()"

#: entry point -> call(adata, model, classifier model); the AnnData carries duplicate names
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "tokenize": lambda a, m, c: cellkit.tokenize(a, m, progress=False),
    "embed_cells": lambda a, m, c: embed_cells(a, m, key_added="X_new", progress=False),
    "predict": lambda a, m, c: cellkit.predict(a, c, progress=False),
    "finetune": lambda a, m, c: cellkit.finetune(
        a, m, label_key="cell_type", epochs=1, copy_model=True, progress=False
    ),
    "pretrain": lambda a, m, c: cellkit.pretrain(a, make_model(), epochs=1, progress=False),
    "transfer_labels (query)": lambda a, m, c: transfer_labels(
        a, rich_adata(), label_key="cell_type", key_added="t"
    ),
    "transfer_labels (reference)": lambda a, m, c: transfer_labels(
        rich_adata(), a, label_key="cell_type", key_added="t"
    ),
    "embedding_metrics": lambda a, m, c: embedding_metrics(a, label_key="cell_type"),
    "umap": lambda a, m, c: umap(a, use_rep="X_cellkit", key_added="X_new_umap"),
    "contextual_gene_embeddings": lambda a, m, c: contextual_gene_embeddings(a, m, progress=False),
    "score_programs": lambda a, m, c: score_programs(a, {"P0": ["G1", "G2", "G3"]}, key_added="prog"),
    "attention_maps": lambda a, m, c: attention_maps(a, m, cells=[0, 2]),
    "gene_attention": lambda a, m, c: gene_attention(a, m, key_added="ga"),
    "attention_difference": lambda a, m, c: attention_difference(
        a, m, groupby="cell_type", condition="type0", control="type1"
    ),
    "in_silico_perturb": lambda a, m, c: in_silico_perturb(a, m, genes=["G1"], progress=False),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_duplicate_obs_names_refused_up_front(name, model, clf_model):
    a = with_duplicates(rich_adata())
    before = a.copy()
    with pytest.raises(DataError, match="not unique") as e:
        ENTRY_POINTS[name](a, model, clf_model)
    msg = str(e.value)
    assert FIX in msg and "'cell0'" in msg
    assert_adata_equal(a, before)


def test_duplicate_obs_names_refused_on_backed_anndata(tmp_path, model):
    a = with_duplicates(make_adata(n_per_class=4))
    path = tmp_path / "dup.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(DataError, match=r"obs_names_make_unique\(\)"):
            cellkit.tokenize(b, model, progress=False)
        with pytest.raises(DataError, match=r"obs_names_make_unique\(\)"):
            embed_cells(b, model, progress=False)
    finally:
        b.file.close()


def test_duplicate_names_in_tokens_refused_by_finetune(model):
    tokens = cellkit.tokenize(make_adata(n_per_class=6), model, obs_columns=["cell_type"], progress=False)
    tokens.obs_names = tokens.obs_names.copy()
    tokens.obs_names[1] = tokens.obs_names[0]
    with pytest.raises(DataError, match="not unique"):
        cellkit.finetune(tokens, model, label_key="cell_type", epochs=1, copy_model=True, progress=False)


@pytest.mark.parametrize("which", ["fit_perturbation_model", "evaluate_perturbation"])
def test_duplicate_obs_names_refused_by_perturbation_functions(screen, which):
    a = with_duplicates(screen.copy())
    before = a.copy()
    pred = pd.DataFrame({"G0001+ctrl": np.zeros(a.n_vars)}, index=a.var_names)

    def call():
        if which == "fit_perturbation_model":
            return fit_perturbation_model(
                a,
                epochs=1,
                architecture=PerturbationArchitecture(d_model=8, n_heads=2, n_layers=1, d_ff=8),
                progress=False,
                device="cpu",
            )
        return evaluate_perturbation(a, pred)

    with pytest.raises(DataError, match=r"obs_names_make_unique\(\)"):
        call()
    assert_adata_equal(a, before)


# ============================================================================ 2. no silent overwrite
def _run_embed(a, m, c, **kw):
    return embed_cells(a, m, progress=False, **kw)


def _run_predict(a, m, c, **kw):
    return cellkit.predict(a, c, progress=False, **kw)


def _run_umap(a, m, c, **kw):
    return umap(a, use_rep="X_cellkit", n_neighbors=5, **kw)


def _run_transfer(a, m, c, **kw):
    return transfer_labels(a, rich_adata(), label_key="cell_type", n_neighbors=3, **kw)


def _run_score(a, m, c, **kw):
    return score_programs(a, {"P0": ["G1", "G2", "G3"]}, use_raw=False, **kw)


def _run_gene_attention(a, m, c, **kw):
    return gene_attention(a, m, cells=[0, 1, 2], **kw)


def _run_perturb(a, m, c, **kw):
    return in_silico_perturb(a, m, genes=["G1"], cells=[0, 1, 2], progress=False, **kw)


#: writer, key_added, the (attribute, key) it writes first that the test makes foreign
WRITERS = {
    "embed_cells obsm X_pca": (_run_embed, "X_pca", ("obsm", "X_pca")),
    "predict obs cell_type": (_run_predict, "cell_type", ("obs", "cell_type")),
    "predict obsm probabilities": (_run_predict, "pred", ("obsm", "pred_probabilities")),
    "umap obsm X_umap": (_run_umap, "X_umap", ("obsm", "X_umap")),
    "transfer_labels obs cell_type": (_run_transfer, "cell_type", ("obs", "cell_type")),
    "score_programs obs column": (_run_score, "batch", ("obs", "batch_P0")),
    "score_programs uns": (_run_score, "info", ("uns", "info")),
    "gene_attention uns": (_run_gene_attention, "info", ("uns", "info")),
    "in_silico_perturb uns": (_run_perturb, "info", ("uns", "info")),
}


def _make_foreign(a: ad.AnnData, attr: str, key: str) -> None:
    """Put a user entry at ``attr[key]`` (unless the fixture already has one)."""
    if attr == "obs" and key not in a.obs:
        a.obs[key] = "user value"
    elif attr == "obsm" and key not in a.obsm:
        a.obsm[key] = np.ones((a.n_obs, 2), dtype=np.float32)
    elif attr == "uns" and key not in a.uns:
        a.uns[key] = {"user": 1}


@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_refuses_foreign_key_then_overwrites_on_request(name, model, clf_model):
    run, key, (attr, taken) = WRITERS[name]
    a = rich_adata()
    _make_foreign(a, attr, taken)
    before = a.copy()
    with pytest.raises(DataError) as e:
        run(a, model, clf_model, key_added=key)
    msg = str(e.value)
    assert f"{attr}[{taken!r}]" in msg and "overwrite=True" in msg and "key_added" in msg
    assert_adata_equal(a, before)
    # overwrite=True replaces it, and cellkit records the entries it wrote
    run(a, model, clf_model, key_added=key, overwrite=True)
    assert taken in cellkit._anndata.written_keys(a)[attr]
    # the entry is cellkit's now: re-running the cell needs no overwrite=True
    run(a, model, clf_model, key_added=key)


@pytest.mark.parametrize("name", ["embed_cells", "predict", "umap", "transfer_labels", "score_programs"])
def test_rerunning_a_writer_on_its_own_key_works(name, model, clf_model):
    run = {
        "embed_cells": _run_embed,
        "predict": _run_predict,
        "umap": _run_umap,
        "transfer_labels": _run_transfer,
        "score_programs": _run_score,
    }[name]
    a = rich_adata()
    run(a, model, clf_model, key_added="mine")
    first = a.copy()
    run(a, model, clf_model, key_added="mine")  # same results, no error
    assert set(a.obs.columns) == set(first.obs.columns) and set(a.obsm) == set(first.obsm)
    assert set(a.uns) == set(first.uns)
    assert "cellkit" in a.uns and "cellkit" not in rich_adata().uns


def test_the_record_survives_h5ad_and_copy(tmp_path, model):
    a = make_adata(n_per_class=4)
    embed_cells(a, model, key_added="X_pca", progress=False)  # free key: cellkit's now
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    embed_cells(b, model, key_added="X_pca", progress=False)  # still cellkit's after a round trip
    c = b[:10].copy()
    embed_cells(c, model, key_added="X_pca", progress=False)
    # a foreign key next to it is still protected
    c.obsm["X_other"] = np.zeros((c.n_obs, 2))
    with pytest.raises(DataError, match=r"obsm\['X_other'\]"):
        embed_cells(c, model, key_added="X_other", progress=False)


def test_copy_true_leaves_the_caller_untouched_and_records_in_the_copy(model):
    a = rich_adata()
    before = a.copy()
    out = embed_cells(a, model, key_added="X_new", copy=True, progress=False)
    assert_adata_equal(a, before)
    assert "X_new" in out.obsm and out.uns["cellkit"]["written"]["obsm"] == ["X_new"]
    with pytest.raises(DataError, match="overwrite=True"):
        embed_cells(a, model, key_added="X_pca", copy=True, progress=False)


def test_a_foreign_uns_cellkit_entry_is_not_clobbered(model):
    a = make_adata(n_per_class=4)
    a.uns["cellkit"] = "a user's string"
    with pytest.raises(DataError, match=r"uns\['cellkit'\]"):
        embed_cells(a, model, progress=False)
    assert a.uns["cellkit"] == "a user's string"
    with pytest.raises(DataError, match="record"):
        gene_attention(make_adata(n_per_class=4), model, cells=[0, 1], key_added="cellkit")


# ============================================================================ 3. non-finite weights, inputs, outputs
def _poison(m: cellkit.CellModel, name: str, value: float) -> None:
    with torch.no_grad():
        dict(m.named_parameters())[name].view(-1)[0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_at_load(tmp_path, value):
    m = make_model()
    name = "encoder.layers.0.self_attn.out_proj.weight"
    assert name in dict(m.named_parameters())
    _poison(m, name, value)
    m.save(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"NaN or infinite") as e:
        cellkit.load_model(tmp_path / "m")
    assert name in str(e.value)


def test_finite_weights_still_load(tmp_path):
    make_model().save(tmp_path / "m")
    assert isinstance(cellkit.load_model(tmp_path / "m"), cellkit.CellModel)


def test_nan_input_values_make_embed_raise(model):
    a = make_adata(n_per_class=4)
    a.X = a.X.toarray()
    a.X[3, 2] = np.nan
    before = a.copy()
    with pytest.raises(DataError, match="NaN"):
        embed_cells(a, model, progress=False)
    assert_adata_equal(a, before)


def test_non_finite_embeddings_and_predictions_raise_instead_of_writing_nan():
    a = make_adata(n_per_class=4)
    before = a.copy()
    diverged = classifier_model()
    _poison(diverged, "encoder.layers.1.linear1.weight", float("nan"))
    with pytest.raises(DataError, match=r"came out NaN or infinite") as e:
        embed_cells(a, diverged, progress=False)
    assert f"of {a.n_obs} cells" in str(e.value) and "diverged" in str(e.value)
    with pytest.raises(DataError, match=r"class probabilities of .* came out NaN"):
        cellkit.predict(a, diverged, progress=False)
    with pytest.raises(DataError, match=r"came out NaN"):
        in_silico_perturb(a, diverged, genes=["G1"], progress=False)
    assert_adata_equal(a, before)


def test_on_empty_nan_is_still_the_documented_exception(model):
    a = make_adata(n_per_class=4)
    x = a.X.toarray()
    x[0] = 0  # a cell with no expressed vocabulary gene
    a.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match="no gene"):
        embed_cells(a, model, on_empty="nan", progress=False)
    emb = a.obsm["X_cellkit"]
    assert np.isnan(emb[0]).all() and np.isfinite(emb[1:]).all()


@pytest.mark.parametrize(
    "case", ["query all NaN", "reference all NaN", "query inf", "reference inf", "partly NaN"]
)
def test_transfer_labels_non_finite_input(case):
    query, reference = rich_adata(), rich_adata()
    target = query if case.startswith(("query", "partly")) else reference
    if "all NaN" in case:
        target.obsm["X_cellkit"][:] = np.nan
    elif "inf" in case:
        target.obsm["X_cellkit"][2, 1] = np.inf
    else:
        target.obsm["X_cellkit"][2, 1] = np.nan
    before_q, before_r = query.copy(), reference.copy()
    with pytest.raises(DataError, match=r"obsm\['X_cellkit'\]|embedding"):
        transfer_labels(query, reference, label_key="cell_type", key_added="t")
    assert_adata_equal(query, before_q)
    assert_adata_equal(reference, before_r)


def test_transfer_labels_treats_all_nan_rows_as_left_out():
    query, reference = rich_adata(), rich_adata()
    query.obsm["X_cellkit"][:3] = np.nan
    transfer_labels(query, reference, label_key="cell_type", key_added="t", n_neighbors=3)
    assert query.obs["t"].isna().to_numpy()[:3].all() and query.obs["t"].notna().to_numpy()[3:].all()


@pytest.mark.parametrize("which", ["embedding_metrics", "umap"])
def test_infinite_embeddings_refused_by_readers(which):
    a = rich_adata()
    a.obsm["X_cellkit"][0, 0] = np.inf
    before = a.copy()
    call = umap if which == "umap" else embedding_metrics
    kwargs = {"use_rep": "X_cellkit"} if which == "umap" else {"label_key": "cell_type"}
    with pytest.raises(DataError, match="non-finite"):
        call(a, **kwargs)
    assert_adata_equal(a, before)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("cls,gep=abc", "'abc'"),
        ("cls,gep=nan", "'nan'"),
        ("cls,gep=-1", "'-1'"),
        ("cls,,gep", "empty"),
        ("cls,cls", "twice"),
    ],
)
def test_cli_bad_objectives_are_a_usage_error(spec, named, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "--model", "demo", "--data", "pbmc", "--label-key", "x", "--objectives", spec])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--objectives" in err and named in err and "Traceback" not in err


def test_cli_objectives_parse():
    from cellkit.cli import _objectives

    assert _objectives("cls, gep=0.5") == {"cls": 1.0, "gep": 0.5}
    assert _objectives(None) is None


# ============================================================================ 0 cells
NO_CELLS = r"(?i)no cells selected|selection is empty"


def _none(a: ad.AnnData) -> np.ndarray:
    return np.zeros(a.n_obs, dtype=bool)


ZERO_CELL_CALLS: dict[str, Callable[..., Any]] = {
    "tokenize, empty AnnData": lambda a, m, c: cellkit.tokenize(a[:0].copy(), m, progress=False),
    "tokenize, cells=none": lambda a, m, c: cellkit.tokenize(a, m, cells=_none(a), progress=False),
    "tokenize, query matching nothing": lambda a, m, c: cellkit.tokenize(
        a, m, cells="cell_type == 'nothing'", progress=False
    ),
    "embed_cells, cells=none": lambda a, m, c: embed_cells(a, m, cells=_none(a), progress=False),
    "embed_cells, empty AnnData": lambda a, m, c: embed_cells(a[:0].copy(), m, progress=False),
    "predict": lambda a, m, c: cellkit.predict(a, c, cells=_none(a), progress=False),
    "finetune": lambda a, m, c: cellkit.finetune(
        a, m, label_key="cell_type", cells=_none(a), copy_model=True, progress=False
    ),
    "finetune, empty AnnData": lambda a, m, c: cellkit.finetune(
        a[:0].copy(), m, label_key="cell_type", copy_model=True, progress=False
    ),
    "pretrain": lambda a, m, c: cellkit.pretrain(a, make_model(), cells=_none(a), progress=False),
    "contextual_gene_embeddings": lambda a, m, c: contextual_gene_embeddings(
        a, m, cells=_none(a), progress=False
    ),
    "gene_attention": lambda a, m, c: gene_attention(a, m, cells=_none(a)),
    "in_silico_perturb": lambda a, m, c: in_silico_perturb(
        a, m, genes=["G1"], cells=_none(a), progress=False
    ),
}


@pytest.mark.parametrize("name", list(ZERO_CELL_CALLS))
def test_zero_cells_say_so(name, model, clf_model):
    a = make_adata(n_per_class=4)
    before = a.copy()
    with pytest.raises(DataError, match=NO_CELLS) as e:
        ZERO_CELL_CALLS[name](a, model, clf_model)
    assert "Nothing to concatenate" not in str(e.value)
    assert_adata_equal(a, before)


def test_zero_cell_h5ad_path_says_so(tmp_path, model):
    path = tmp_path / "empty.h5ad"
    make_adata(n_per_class=4)[:0].copy().write_h5ad(path)
    with pytest.raises(DataError, match=NO_CELLS):
        cellkit.tokenize(str(path), model, progress=False)
    with pytest.raises(DataError, match=NO_CELLS):
        cellkit.finetune(str(path), model, label_key="cell_type", copy_model=True, progress=False)


def test_perturbation_model_predict_checks_inputs_and_outputs(screen):
    fitted = fit_perturbation_model(
        screen,
        epochs=1,
        architecture=PerturbationArchitecture(d_model=8, n_heads=2, n_layers=1, d_ff=8),
        progress=False,
        device="cpu",
    )
    perturbation = fitted.train_conditions[0]
    dup = with_duplicates(screen.copy())
    before = dup.copy()
    with pytest.raises(DataError, match=r"obs_names_make_unique\(\)"):
        fitted.predict([perturbation], control_cells=dup, device="cpu")
    assert_adata_equal(dup, before)
    x = fitted.control_cells.copy()
    x[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        fitted.predict([perturbation], control_cells=x, device="cpu")
    assert np.isfinite(fitted.predict([perturbation], device="cpu").to_numpy()).all()
    _poison(fitted.model, "encoder.layers.0.linear1.weight", float("nan"))
    with pytest.raises(DataError, match=r"came out NaN or infinite.*diverged"):
        fitted.predict([perturbation], device="cpu")
    pred = pd.DataFrame({perturbation: np.full(screen.n_vars, np.nan)}, index=screen.var_names)
    with pytest.raises(DataError, match="predicted holds NaN"):
        evaluate_perturbation(screen, pred)


def test_zero_cell_tokens_say_so(tmp_path, model):
    empty = make_adata(n_per_class=4)[:0].copy()
    with pytest.raises(DataError, match=NO_CELLS):
        cellkit.tokenize(empty, model, output=tmp_path / "shards", obs_columns=["cell_type"], progress=False)
    assert not (tmp_path / "shards").exists()
    shards = cellkit.tokenize(
        make_adata(n_per_class=4), model, obs_columns=["cell_type"], progress=False
    ).subset([])
    assert len(shards) == 0
    for call in (
        lambda: cellkit.finetune(shards, model, label_key="cell_type", copy_model=True, progress=False),
        lambda: cellkit.pretrain(shards, make_model(), progress=False),
        lambda: gene_attention(shards, model),
    ):
        with pytest.raises(DataError, match=NO_CELLS):
            call()
    assert cellkit.analysis.cell_embeddings(model, shards, progress=False).shape == (0, 16)
