"""finetune / predict / pretrain on a small synthetic AnnData: results, scverse manners, bad inputs."""

from __future__ import annotations

import dataclasses
import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellkit
from cellkit import CellModel, ConfigError, DataError, GeneVocab
from cellkit.presets import scgpt_config
from cellkit.tasks import finetune, predict, pretrain, stratified_split

pytestmark = pytest.mark.timeout(300)
N_GENES = 40
FAST = {"epochs": 4, "lr": 3e-3, "batch_size": 16, "progress": False, "schedule": "constant"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def make_adata(n_per_class: int = 40, n_classes: int = 3, seed: int = 0) -> ad.AnnData:
    """Counts where each class switches on its own block of genes."""
    r = np.random.default_rng(seed)
    n = n_per_class * n_classes
    labels = np.repeat([f"type{c}" for c in range(n_classes)], n_per_class)
    rate = np.full((n, N_GENES), 0.3)
    block = N_GENES // n_classes
    for c in range(n_classes):
        rate[labels == f"type{c}", c * block : (c + 1) * block] = 6.0
    x = r.poisson(rate).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "batch": np.where(np.arange(n) % 2, "b1", "b2")},
        index=[f"cell{i}" for i in range(n)],
    )
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))
    return a


def make_model(genes=None, seed: int = 0) -> CellModel:
    genes = list(genes if genes is not None else [f"G{i}" for i in range(N_GENES)])
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(seed)
    return CellModel(
        scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, n_bins=11), vocab
    )


def snapshot(a: ad.AnnData):
    return a.X.copy(), a.obs.copy(), dict(a.obsm), dict(a.uns)


def assert_unchanged(a: ad.AnnData, snap) -> None:
    x, obs, obsm, uns = snap
    assert (x != a.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, obs)
    assert set(a.obsm) == set(obsm)
    assert set(a.uns) == set(uns)


def test_finetune_learns_and_reports():
    adata = make_adata()
    snap = snapshot(adata)
    model = make_model()
    result = finetune(adata, model, label_key="cell_type", epochs=8, lr=3e-3, batch_size=16, progress=False)
    assert_unchanged(adata, snap)
    assert result.model is model
    assert result.status == "completed"
    assert result.classes == ["type0", "type1", "type2"]
    assert model.config.heads["classifier"]["labels"] == result.classes
    assert result.metrics["accuracy"] > 0.7
    assert 0 <= result.metrics["macro_f1"] <= 1
    assert {"val/loss", "val/accuracy"} <= set(result.metrics)
    assert list(result.report.columns) == ["precision", "recall", "f1", "support"]
    assert result.confusion.to_numpy().sum() == (result.split == "test").sum() == 12
    assert result.split.value_counts().to_dict() == {"train": 96, "val": 12, "test": 12}
    # the split is stratified
    for part in ("val", "test"):
        names = result.split.index[result.split == part]
        assert adata.obs.loc[names, "cell_type"].value_counts().tolist() == [4, 4, 4]
    assert len(result.history.epochs) == 8


def test_predict_writes_only_key_added():
    adata = make_adata()
    model = make_model()
    result = finetune(adata, model, label_key="cell_type", **FAST)
    before = set(adata.obs.columns), set(adata.obsm), set(adata.uns)
    out = predict(
        adata, result.model, key_added="pred", cells=adata.obs["batch"] == "b1", progress=False, copy=True
    )
    assert (set(adata.obs.columns), set(adata.obsm), set(adata.uns)) == before  # copy=True: untouched
    assert "pred" in out.obs
    assert list(out.obs["pred"].cat.categories) == result.classes
    sel = (out.obs["batch"] == "b1").to_numpy()
    assert out.obs["pred"][sel].notna().all()
    assert out.obs["pred"][~sel].isna().all()
    probs = out.obsm["pred_probabilities"]
    assert probs.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(probs[sel].sum(1), 1, atol=1e-5)
    assert np.isnan(probs[~sel]).all()
    np.testing.assert_allclose(out.obs["pred_confidence"][sel], probs[sel].max(1), rtol=1e-6)
    assert out.uns["pred"]["classes"] == result.classes
    assert predict(adata, result.model, progress=False) is None  # in place by default
    assert "cellkit_prediction" in adata.obs
    # predictions do not depend on the batch size
    other = predict(adata, result.model, batch_size=7, progress=False, copy=True)
    np.testing.assert_allclose(
        other.obsm["cellkit_prediction_probabilities"],
        adata.obsm["cellkit_prediction_probabilities"],
        atol=1e-6,
    )


def test_predict_into_a_file_equals_predict_in_memory(tmp_path):
    """output= (what `cellkit predict` runs): the same labels and probabilities, written to a directory."""
    import pytest

    from cellkit import ConfigError

    adata = make_adata()
    result = finetune(adata, make_model(), label_key="cell_type", **FAST)
    want = predict(adata, result.model, key_added="pred", progress=False, copy=True)
    assert predict(adata, result.model, key_added="pred", output=tmp_path / "p", progress=False) is None
    assert "pred" not in adata.obs  # the AnnData is untouched
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "pred_probabilities.npy"), want.obsm["pred_probabilities"])
    assert list(np.load(tmp_path / "p" / "pred.npy")) == list(want.obs["pred"].astype(str))
    with pytest.raises(ConfigError, match="precision"):
        predict(adata, result.model, precision="int8", progress=False)
    with pytest.raises(ConfigError, match="copy"):
        predict(adata, result.model, output=tmp_path / "q", copy=True, progress=False)


def test_integration_objectives_and_batch_labels():
    adata = make_adata()
    model = make_model()
    result = finetune(
        adata,
        model,
        label_key="cell_type",
        batch_key="batch",
        objectives={"cls": 1.0, "gep": 1.0, "mvc": 1.0, "ecs": {"threshold": 0.6}, "dab": 0.5},
        **{**FAST, "epochs": 1},
    )
    steps = result.history.steps
    assert {"loss/cls", "loss/gep", "loss/mvc", "loss/ecs", "loss/dab"} <= set(steps.columns)
    assert "adversarial" in model.heads
    assert np.isfinite(steps["loss"]).all()


def test_stop_event_then_resume(tmp_path):
    adata = make_adata()
    model = make_model()
    stop = threading.Event()

    def press_stop(event):
        if event.kind == "step_end" and event.step == 3:
            stop.set()

    first = finetune(
        adata,
        model,
        label_key="cell_type",
        callbacks=[press_stop],
        stop_event=stop,
        checkpoint_dir=str(tmp_path),
        **FAST,
    )
    assert first.status == "stopped"
    assert first.metrics.get("accuracy") is None  # no held-out evaluation of an unfinished run
    second = finetune(adata, model, label_key="cell_type", checkpoint_dir=str(tmp_path), resume=True, **FAST)
    assert second.status == "completed"
    assert second.history.step_records[0]["step"] == 1
    assert len(second.history.epochs) == FAST["epochs"]
    ref = finetune(make_adata(), make_model(), label_key="cell_type", **FAST)
    assert second.history == ref.history


def test_class_weight_and_freezing():
    adata = make_adata()
    model = make_model()
    emb = model.encoder.embeddings.gene.weight.detach().clone()
    result = finetune(
        adata,
        model,
        label_key="cell_type",
        class_weight="balanced",
        freeze_embeddings=True,
        freeze_layers=1,
        **{**FAST, "epochs": 1},
    )
    assert torch.equal(model.encoder.embeddings.gene.weight, emb)
    obj = result.trainer.objectives[0]
    assert obj.class_weights == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="freeze_layers"):
        finetune(adata, model, label_key="cell_type", freeze_layers=5, **FAST)


def test_pretrain_scgpt_style_reduces_loss():
    adata = make_adata()
    model = make_model()
    result = pretrain(adata, model, val_size=0.1, **{**FAST, "epochs": 6})
    epochs = result.history.epochs
    assert {"train/loss/gep", "train/loss/mvc", "val/loss"} <= set(epochs.columns)
    assert epochs["train/loss"].iloc[-1] < epochs["train/loss"].iloc[0]
    with pytest.raises(ConfigError, match="self-supervised"):
        pretrain(adata, model, objectives=["cls"], **FAST)


def test_stratified_split_is_seeded():
    labels = np.repeat(["a", "b", "c"], 10)
    s1 = stratified_split(labels, val_size=0.2, test_size=0.2, seed=1)
    assert (s1 == stratified_split(labels, val_size=0.2, test_size=0.2, seed=1)).all()
    assert (s1 != stratified_split(labels, val_size=0.2, test_size=0.2, seed=2)).any()
    assert pd.Series(s1).value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}


# ------------------------------------------------------------------ bad inputs: clear errors, data untouched
def _bad(adata, match, exc=DataError, model=None, **kw):
    snap = snapshot(adata)
    model = model or make_model()
    heads = set(model.heads)
    opts = {**FAST, **kw}
    with pytest.raises(exc, match=match):
        finetune(adata, model, **opts)
    assert_unchanged(adata, snap)
    assert set(model.heads) == heads  # the model was not touched either


def test_bad_label_column():
    _bad(make_adata(), r"label_key='celltype' is not an obs column.*cell_type", label_key="celltype")


def test_one_class_only():
    a = make_adata()
    _bad(a, "single class", label_key="cell_type", cells="cell_type == 'type0'")


def test_class_with_one_cell():
    a = make_adata()
    a.obs["cell_type"] = a.obs["cell_type"].cat.add_categories("rare")
    a.obs.iloc[0, a.obs.columns.get_loc("cell_type")] = "rare"
    _bad(a, r"needs at least 3 cells.*class 'rare' has 1 cell", label_key="cell_type")


def test_nan_labels():
    a = make_adata()
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[[3, 5], a.obs.columns.get_loc("cell_type")] = np.nan
    _bad(a, "2 of 120 selected cells have no 'cell_type' value", label_key="cell_type")


def test_batch_key_missing():
    _bad(make_adata(), "batch_key='donor' is not an obs column", label_key="cell_type", batch_key="donor")
    _bad(make_adata(), "needs batch_key", exc=ConfigError, label_key="cell_type", objectives=["cls", "dab"])


def test_tokens_from_another_vocabulary():
    a = make_adata()
    other = make_model(genes=[f"X{i}" for i in range(5)] + [f"G{i}" for i in range(N_GENES)])
    tokens = cellkit.tokenize(a, other, obs_columns=["cell_type"], progress=False)
    model = make_model()
    with pytest.raises(DataError, match="not made with this model's vocabulary"):
        finetune(tokens, model, label_key="cell_type", **FAST)
    assert "classifier" not in model.heads
    own = cellkit.tokenize(a, model, obs_columns=["cell_type"], progress=False)
    assert finetune(own, model, label_key="cell_type", **{**FAST, "epochs": 1}).status == "completed"


def test_learning_rate_must_be_positive():
    for lr in (0.0, -1e-4):
        _bad(make_adata(), "learning rate", exc=ConfigError, label_key="cell_type", lr=lr)


def test_empty_selection():
    _bad(make_adata(), "empty", label_key="cell_type", cells="cell_type == 'nothing'")
    _bad(make_adata(), "empty", label_key="cell_type", cells=np.zeros(120, bool))


def test_unknown_options():
    _bad(make_adata(), "Unknown option", exc=ConfigError, label_key="cell_type", learning_rate=1e-3)
    _bad(
        make_adata(), "Unknown objective", exc=ConfigError, label_key="cell_type", objectives=["cls", "nope"]
    )


def test_predict_needs_a_classifier():
    with pytest.raises(ConfigError, match="no classifier head"):
        predict(make_adata(), make_model(), progress=False)


def test_model_input_conventions_are_tokenizer_defaults():
    """A model whose config.input says use_raw / normalize_total is tokenized that way by default."""
    adata = make_adata()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.full(adata.shape, -1.0, dtype=np.float32))  # scaled: not tokenizable
    model = make_model()
    with pytest.raises(DataError, match="use_raw=True"):
        cellkit.tokenize(adata, model, progress=False)
    model.config.input = dataclasses.replace(model.config.input, use_raw=True, normalize_total=False)
    tokens = cellkit.tokenize(adata, model, progress=False)
    assert tokens.options["normalize_total"] is None
    explicit = cellkit.tokenize(adata, model, use_raw=True, normalize_total=None, progress=False)
    np.testing.assert_array_equal(tokens.gene_ids, explicit.gene_ids)
    np.testing.assert_array_equal(tokens.values, explicit.values)
    other = cellkit.tokenize(adata, model, normalize_total=1e4, progress=False)  # the caller wins
    assert other.options["normalize_total"] == 1e4


def test_reported_validation_metrics_are_the_kept_epochs():
    # the weights of the best epoch are restored, so the val/... numbers must be that epoch's, not the last's
    adata = make_adata()
    result = finetune(
        adata,
        make_model(),
        label_key="cell_type",
        epochs=5,
        lr=3e-2,  # too high on purpose: the validation loss goes back up after its best epoch
        batch_size=16,
        progress=False,
        monitor="val/loss",
    )
    epochs = result.history.epochs
    best = epochs.loc[epochs["val/loss"].idxmin()]
    assert best.name != epochs.index[-1], "the test needs a run whose last epoch is not its best"
    assert result.metrics["val/loss"] == pytest.approx(best["val/loss"], abs=0)
    assert result.metrics["val/accuracy"] == pytest.approx(best["val/accuracy"], abs=0)


# ------------------------------------------------------------------ check_finetune_options
@pytest.mark.parametrize(
    ("opts", "exc", "match"),
    [
        ({"lr": 0.0}, ConfigError, "learning rate"),
        ({"epochs": 0}, ConfigError, "epochs"),
        ({"objectives": {}}, ConfigError, "No objective"),
        ({"objectives": ["cls", "dab"]}, ConfigError, "needs batch_key"),
        ({"objectives": ["mlm"]}, ConfigError, "'mlm' head"),
        ({"batch_key": "cell_type"}, ConfigError, "must differ"),
        ({"val_size": 0.6, "test_size": 0.5}, ConfigError, "val_size \\+ test_size"),
        ({"test_size": 1.5}, ConfigError, "test_size must be a fraction"),
        ({"class_weight": "inverse"}, ConfigError, "class_weight"),
        ({"freeze_layers": 3}, ConfigError, "between 0 and 2"),
        ({"tokenize_options": {"max_lenght": 8}}, ConfigError, "max_len"),
        ({"learning_rate": 1e-3}, ConfigError, "Unknown option"),
        ({"label_key": ""}, DataError, "label_key"),
        ({"label_key": "celltype"}, DataError, "not an obs column"),
        ({"batch_key": "donor"}, DataError, "batch_key='donor'"),
    ],
)
def test_check_finetune_options_refuses_what_finetune_refuses(opts, exc, match):
    a, model = make_adata(), make_model()
    kw = {"label_key": "cell_type", **opts}
    with pytest.raises(exc, match=match) as checked:
        cellkit.tasks.check_finetune_options(a, model, **kw)
    with pytest.raises(exc) as trained:  # the same check, in the same words, before any work
        finetune(a, model, **{**FAST, **kw})
    assert str(trained.value) == str(checked.value)
    assert "classifier" not in model.heads


def test_check_finetune_options_returns_the_trainer_config_and_touches_nothing(tmp_path):
    a, model = make_adata(), make_model()
    snap = snapshot(a)
    config = cellkit.tasks.check_finetune_options(
        a,
        model,
        label_key="cell_type",
        epochs=3,
        lr=1e-3,
        freeze_layers=1,
        checkpoint_dir=str(tmp_path / "ck"),
    )
    assert (config.epochs, config.lr, config.schedule) == (3, 1e-3, "step")
    assert "encoder.layers.0" in config.freeze
    assert_unchanged(a, snap)
    assert "classifier" not in model.heads


def test_pretrain_checks_val_size_before_tokenizing():
    with pytest.raises(ConfigError, match="val_size"):
        pretrain(make_adata(), make_model(), val_size=1.5, **FAST)


def test_objective_support_says_why_in_finetunes_words():
    model = make_model()  # scGPT-style: expression + mvc heads, no zero probabilities, no MLM head
    support = cellkit.tasks.objective_support(model)
    assert set(support) == set(cellkit.train.OBJECTIVES)
    assert support["cls"] is None and support["dab"] is None
    usable = [name for name, why in support.items() if why is None]
    for name in ("mlm", "zero_nll"):
        if support[name] is None:
            continue
        with pytest.raises(ConfigError) as err:
            cellkit.tasks.check_finetune_options(
                make_adata(), model, label_key="cell_type", objectives=[name]
            )
        assert str(err.value) == support[name]
    for name in usable:
        cellkit.tasks.check_finetune_options(
            make_adata(), model, label_key="cell_type", objectives=[name], batch_key="batch"
        )


# --- issue 17: errors name the option that caused them; label columns a UI may offer
def test_errors_carry_the_option_that_caused_them():
    from cellkit.tasks import stratified_split

    with pytest.raises(cellkit.DataError) as info:
        stratified_split(["a"] * 5 + ["b"] * 2 + ["c"], val_size=0.1, test_size=0.1, seed=0)
    err = info.value
    assert err.param == "label_key"
    assert "class 'b' has 2 cells" in str(err) and "class 'c' has 1 cell" in str(err)
    assert "np.int64" not in str(err) and "{" not in str(err)
    assert "val_size" in str(err) and "val_size" not in err.problem  # API advice vs. the plain problem
    with pytest.raises(cellkit.ConfigError) as info:
        stratified_split(["a"] * 9, val_size=1.5, test_size=0.1, seed=0)
    assert info.value.param == "val_size"
    with pytest.raises(cellkit.DataError) as info:  # 1 test cell cannot hold both classes
        stratified_split(["a"] * 50 + ["b"] * 50, val_size=0.1, test_size=0.01, seed=0)
    assert info.value.param == "test_size" and "test part is too small" in info.value.problem
    with pytest.raises(cellkit.DataError) as info:
        cellkit.select_cells(pd.DataFrame({"bulk_labels": ["CD14", "B"]}), "bulk_labels == CD14")
    assert info.value.param == "cells" and "quote it: bulk_labels == 'CD14'" in str(info.value)


def test_check_finetune_options_refuses_classes_too_small_to_split():
    from cellkit.datasets import demo_model, pbmc_demo

    adata = pbmc_demo()
    with pytest.raises(cellkit.DataError) as info:
        cellkit.tasks.check_finetune_options(adata, demo_model(), label_key="n_genes")
    assert info.value.param == "label_key"
    cellkit.tasks.check_finetune_options(adata, demo_model(), label_key="n_genes", val_size=0, test_size=0)


def test_label_columns_offers_classes_and_says_why_not_others():
    from cellkit.tasks import label_columns

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", "NK"] * 10),
            "n_genes": np.arange(30),
            "cluster": np.arange(30) % 3,
            "one": ["x"] * 30,
            "many": [f"c{i % 15}" for i in range(30)],
            "tiny": ["a"] * 29 + ["b"],
            "gaps": ["a", "b", None] * 10,
        },
        index=[f"c{i}" for i in range(30)],
    )
    adata = ad.AnnData(np.zeros((30, 2), dtype=np.float32), obs=obs)
    got = label_columns(adata, max_classes=10)
    assert got["cell_type"] is None and got["cluster"] is None
    assert "distinct values" in got["n_genes"]
    assert "single value" in got["one"]
    assert "15 classes" in got["many"]
    assert "too small" in got["tiny"] and "'b' has 1 cell" in got["tiny"]
    assert "no value" in got["gaps"]
    assert label_columns(adata, min_class_size=1)["tiny"] is None
    assert label_columns(adata, cells=[f"c{i}" for i in range(29)])["tiny"] is not None  # one value left
