"""EmbeddingPanel with jupyter-scatter (large data): backend choice, recolour, lasso → selection, fallback.

No browser: the ``jscatter`` widget's traits are what its front end reads (``points``: x, y and
the colour value per point; ``color``: the colour map; ``selection``: the selected point rows)
and writes (``selection`` after a lasso).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from cellkit import ConfigError
from cellkit.widgets import EmbeddingPanel, StudioState, _scatter
from cellkit.widgets import _embedding as embedding_module

pytest.importorskip("jscatter")

N = 200_000


def _synthetic(n: int = N, seed: int = 0) -> ad.AnnData:
    """``n`` cells in 8 blobs on ``X_umap``, ``obs['cluster']`` (8), two genes that follow the layout."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, size=(8, 2))
    cluster = rng.integers(0, 8, size=n)
    xy = (centres[cluster] + rng.normal(size=(n, 2))).astype(np.float32)
    x = np.stack([np.maximum(xy[:, 0], 0), np.maximum(xy[:, 1], 0)], axis=1).astype(np.float32)
    obs = pd.DataFrame(
        {"cluster": pd.Categorical([f"c{c}" for c in cluster])}, index=[f"cell{i}" for i in range(n)]
    )
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["GENE_A", "GENE_B"]))
    adata.obsm["X_umap"] = xy
    return adata


@pytest.fixture(scope="module")
def big():
    return _synthetic()


@pytest.fixture
def panel(big):
    return EmbeddingPanel(StudioState(adata=big, adata_name="big"))


def test_choose_backend(monkeypatch):
    assert _scatter.choose_backend(_scatter.JSCATTER_MIN_CELLS - 1) == "plotly"
    assert _scatter.choose_backend(_scatter.JSCATTER_MIN_CELLS) == "jscatter"
    assert _scatter.choose_backend(10, "jscatter") == "jscatter"
    assert _scatter.choose_backend(10**7, "plotly") == "plotly"
    assert _scatter.choose_backend(500, min_cells=100) == "jscatter"
    with pytest.raises(ConfigError, match="backend must be one of"):
        _scatter.choose_backend(10, "webgl")
    monkeypatch.setattr(_scatter, "jscatter_available", lambda: False)
    assert _scatter.choose_backend(10**7) == "plotly"
    with pytest.raises(ConfigError, match="pip install 'cellkit\\[scatter\\]'"):
        _scatter.choose_backend(10, "jscatter")


def test_large_data_draws_every_cell_with_jscatter(panel, big):
    assert panel.backend == "jscatter" and panel.last_error is None, panel.message_text
    assert panel.plot_box.children == (panel.gl.box,)
    assert "cellkit-embedding-gl" in panel.gl.box._dom_classes
    assert len(panel.figure.data) == 0  # the plotly figure is empty and not shown
    assert panel.max_points_box.disabled and panel.hover_select.disabled
    assert "drawn with jupyter-scatter (every cell)" in panel.note.value
    widget = panel.gl.widget
    assert widget.points.shape == (N, 4)
    np.testing.assert_array_equal(panel.gl.positions, np.arange(N))  # every cell, no subsample
    meta = panel.gl.meta
    assert (meta["basis"], meta["color"], meta["kind"], meta["n_shown"]) == (
        "X_umap",
        "cluster",
        "categorical",
        N,
    )
    assert "200,000 cells" in panel.message_text
    # each point's colour is its category's colour (the plotly view's palette)
    codes = widget.points[:, 2].astype(int)
    categories = meta["categories"]
    from cellkit.viz._palettes import default_palette

    palette = dict(zip(sorted(big.obs["cluster"].cat.categories), default_palette(8), strict=True))
    for i in (0, 1, 12345, N - 1):
        name = categories[codes[i]]
        assert name == big.obs["cluster"].iloc[i]
        np.testing.assert_allclose(widget.color[codes[i]], to_rgba(palette[name]), atol=1e-6)


def test_recolour_updates_the_widgets_colour_data(panel, big):
    widget = panel.gl.widget
    scatter = panel.gl.scatter
    panel.color_by("GENE_A")
    assert panel.last_error is None, panel.message_text
    assert panel.color_key == "GENE_A" and panel.gl.meta["kind"] == "continuous"
    assert "a colour scale" in panel.message_text
    gene_a = big[:, "GENE_A"].X.ravel()
    lo, hi = float(gene_a.min()), float(gene_a.max())
    np.testing.assert_allclose(widget.points[:, 2], (gene_a - lo) / (hi - lo), atol=1e-5)
    panel.color_by("GENE_B")
    gene_b = big[:, "GENE_B"].X.ravel()
    np.testing.assert_allclose(
        widget.points[:, 2], (gene_b - gene_b.min()) / (gene_b.max() - gene_b.min()), atol=1e-5
    )
    assert panel.gl.scatter is scatter  # same plot: only colours were sent, the view stays
    # the colour dropdown drives the same path
    panel.color_dropdown.value = "cluster"
    assert panel.color_key == "cluster" and panel.gl.meta["kind"] == "categorical"
    np.testing.assert_array_equal(widget.points[:, 2].astype(int), big.obs["cluster"].cat.codes.to_numpy())
    panel.color_by(None)
    assert panel.gl.meta["kind"] == "none" and widget.color_by is None
    panel.color_by("no_such_thing")
    assert panel.last_error is not None and panel.color_key == ""  # error shown, view unchanged


def test_lasso_in_the_browser_becomes_the_saved_selection(panel, big):
    rows = np.flatnonzero(big.obsm["X_umap"][:, 0] < -3).astype(np.uint32)
    panel.gl.widget.selection = rows  # what the front end sets after a lasso
    np.testing.assert_array_equal(panel.pending, rows)
    assert f"{len(rows):,} cells selected" in panel.selection_label.value
    names = panel.save_selection("left", write_obs=True)
    assert panel.last_error is None, panel.message_text
    np.testing.assert_array_equal(names, big.obs_names[rows])
    np.testing.assert_array_equal(panel.state.selections["left"], big.obs_names[rows])
    assert panel.state.active_selection == "left"
    assert int(big.obs["left"].sum()) == len(rows)
    assert panel.selection_name.value == "left_2"
    # the browser clearing its selection (a click on the background) clears the pending one
    panel.gl.widget.selection = np.zeros(0, dtype=np.uint32)
    assert len(panel.pending) == 0 and "No cells selected" in panel.selection_label.value


def test_select_and_clear_from_python_show_in_the_widget(panel, big):
    pos = panel.select_points("cluster == 'c2'")
    expected = np.flatnonzero(big.obs["cluster"] == "c2")
    np.testing.assert_array_equal(pos, expected)
    np.testing.assert_array_equal(panel.gl.widget.selection, expected)
    panel.gl.widget.selection = expected.astype(np.uint32)  # the browser echoing it back: no change
    np.testing.assert_array_equal(panel.pending, expected)
    panel.save_selection("c2")
    assert panel.state.active_selection == "c2"
    panel.clear_selection()
    assert len(panel.pending) == 0 and len(panel.gl.widget.selection) == 0
    assert panel.state.active_selection == "" and "c2" in panel.state.selections


def test_cells_without_coordinates_are_not_drawn_but_stay_selectable():
    adata = _synthetic(120_000, seed=1)
    adata.obsm["X_umap"][:10] = np.nan
    panel = EmbeddingPanel(StudioState(adata=adata))
    assert panel.backend == "jscatter"
    np.testing.assert_array_equal(panel.gl.positions, np.arange(10, 120_000))
    assert panel.gl.widget.points.shape == (119_990, 4)
    assert "10 cells without coordinates not shown" in panel.note.value
    panel.select_points([5, 20, 30])
    np.testing.assert_array_equal(panel.gl.widget.selection, [10, 20])  # rows of cells 20 and 30
    panel.gl.widget.selection = np.asarray([10, 20], dtype=np.uint32)  # echo keeps cell 5
    np.testing.assert_array_equal(panel.pending, [5, 20, 30])
    panel.gl.widget.selection = np.asarray([0, 1], dtype=np.uint32)  # a new lasso: rows → cells
    np.testing.assert_array_equal(panel.pending, [10, 11])


def test_new_basis_rebuilds_and_small_data_goes_back_to_plotly(panel, big):
    big.obsm["X_other"] = big.obsm["X_umap"][:, ::-1].copy()
    first = panel.gl.scatter
    panel.set_basis("X_other")
    assert panel.gl.scatter is not first and panel.gl.meta["basis"] == "X_other"
    np.testing.assert_allclose(panel.gl.widget.points[:3, :2].shape, (3, 2))
    del big.obsm["X_other"]
    small = _synthetic(2_000, seed=2)
    panel.state.adata = small
    assert panel.backend == "plotly" and panel.plot_box.children == (panel.figure,)
    assert sum(len(t.x) for t in panel.figure.data) == 2_000
    assert not panel.max_points_box.disabled and not panel.hover_select.disabled
    panel.select_points(np.arange(7))
    assert panel.save_selection("seven").tolist() == small.obs_names[:7].tolist()


def test_backend_forced_and_fallback_without_jscatter(monkeypatch, big):
    small = _synthetic(3_000, seed=3)
    forced = EmbeddingPanel(StudioState(adata=small), backend="jscatter")
    assert forced.backend == "jscatter" and forced.gl.widget.points.shape == (3_000, 4)
    assert EmbeddingPanel(StudioState(adata=big), backend="plotly", max_points=2_000).backend == "plotly"
    with pytest.raises(ConfigError):
        EmbeddingPanel(StudioState(adata=small), backend="canvas")
    monkeypatch.setattr(_scatter, "jscatter_available", lambda: False)
    monkeypatch.setattr(embedding_module, "jscatter_available", lambda: False)
    panel = EmbeddingPanel(StudioState(adata=big), max_points=5_000)
    assert panel.backend == "plotly" and panel.gl is None
    assert sum(len(t.x) for t in panel.figure.data) == 5_000
    assert "showing a random 5,000 of 200,000 cells" in panel.note.value
    assert "pip install &#x27;cellkit[scatter]&#x27;" in panel.note.value
