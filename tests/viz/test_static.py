"""cellkit.viz static figures: matplotlib Figures from the plotly figures' inputs, written as PDF/SVG/PNG."""

from __future__ import annotations

import subprocess
import sys
import threading

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

import cellkit.viz as cv
from cellkit._errors import ConfigError, DataError
from cellkit.viz._palettes import default_palette

MAGIC = {".pdf": b"%PDF-", ".svg": b"<?xml", ".png": b"\x89PNG\r\n\x1a\n"}


@pytest.fixture(autouse=True)
def _no_pyplot_state():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before == []


@pytest.fixture
def adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2.0, size=(24, 4)).astype(np.float32))
    a.var_names = ["CD3E", "MS4A1", "NKG7", "LYZ"]
    a.obs_names = [f"cell{i}" for i in range(24)]
    a.obs["cell_type"] = pd.Categorical(["T", "B", "NK"] * 8)
    a.obsm["X_cellkit_umap"] = rng.normal(size=(24, 2))
    return a


def _history() -> tuple[pd.DataFrame, pd.DataFrame]:
    steps = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [2.0, 1.5, 1.2, 1.0], "lr": [1e-3, 1e-3, 5e-4, 1e-4]})
    epochs = pd.DataFrame(
        {"epoch": [1, 2], "step": [2, 4], "val/loss": [1.6, 1.1], "train/accuracy": [0.5, 0.7], "val/accuracy": [0.4, 0.6]}
    )
    return steps, epochs


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _figures(adata: ad.AnnData) -> dict[str, Figure]:
    steps, epochs = _history()
    return {
        "embedding": cv.static_embedding(adata, color="cell_type"),
        "attention": cv.static_attention_heatmap(
            np.arange(12, dtype=float).reshape(3, 4), rows=["a", "b", "c"], cols=["w", "x", "y", "z"]
        ),
        "confusion": cv.static_confusion_matrix(np.array([[5, 1], [2, 8]]), labels=["T", "B"]),
        "training": cv.static_training_curves(steps, epochs),
    }


@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_every_figure_writes_pdf_and_svg(adata, tmp_path, suffix):
    for name, fig in _figures(adata).items():
        assert isinstance(fig, Figure)
        out = cv.save_figure(fig, tmp_path / "figs" / f"{name}{suffix}")
        data = out.read_bytes()
        assert data.startswith(MAGIC[suffix]), name
        assert len(data) > 2_000, (name, len(data))
        if suffix == ".svg":
            assert b"<svg" in data[:2_000]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}{suffix}" for n in ("embedding", "attention", "confusion", "training")
    )  # no temporary file left behind


def test_save_figure_png_and_bad_inputs(adata, tmp_path):
    fig = cv.static_confusion_matrix(np.eye(2), labels=["a", "b"])
    assert cv.save_figure(fig, tmp_path / "cm.png", dpi=50).read_bytes().startswith(MAGIC[".png"])
    with pytest.raises(ConfigError, match=r"\.pdf, \.svg, \.png"):
        cv.save_figure(fig, tmp_path / "cm.jpg")
    with pytest.raises(ConfigError, match="save_html"):
        cv.save_figure(cv.confusion_matrix(np.eye(2), labels=["a", "b"]), tmp_path / "cm.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]


def test_save_figure_pdf_is_reproducible(tmp_path):
    def draw() -> Figure:
        return cv.static_confusion_matrix(np.array([[3, 1], [0, 4]]), labels=["a", "b"])

    one = cv.save_figure(draw(), tmp_path / "one.pdf").read_bytes()
    two = cv.save_figure(draw(), tmp_path / "two.pdf").read_bytes()
    assert one == two  # the same figure gives the same file: no creation date inside


def test_embedding_categories_colours_and_labels(adata):
    fig = cv.static_embedding(adata, color="cell_type", title="PBMC")
    (ax,) = fig.axes
    assert ax.get_title() == "PBMC"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("UMAP1", "UMAP2")
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "cell_type"
    assert [t.get_text() for t in legend.get_texts()] == ["B", "NK", "T"]
    # the same colours as the plotly figure: scanpy's palette in category order
    plotly_colors = [tr.marker.color for tr in cv.embedding(adata, color="cell_type").data]
    assert plotly_colors == default_palette(3)
    drawn = [to_hex(c.get_facecolors()[0]) for c in ax.collections]
    assert drawn == plotly_colors
    assert sum(len(c.get_offsets()) for c in ax.collections) == adata.n_obs


def test_embedding_gene_colour_bar_and_subsample_note(adata):
    fig = cv.static_embedding(adata, color="NKG7", max_points=10, seed=1)
    ax, cbar = fig.axes
    assert ax.get_title() == "NKG7" and cbar.get_ylabel() == "NKG7"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 10
    assert _texts(fig) == ["showing a random 10 of 24 cells (seed 1)"]
    values = ax.collections[-1].get_array()
    assert np.all(np.diff(values) >= 0)  # high values drawn last, on top


def test_embedding_arrays_selection_and_ax(adata):
    outer = Figure()
    ax = outer.add_subplot()
    fig = cv.static_embedding(np.asarray(adata.obsm["X_cellkit_umap"]), color=np.arange(24.0), selected=[0, 1], ax=ax)
    assert fig is outer
    alphas = ax.collections[-1].get_alpha()
    assert sorted(set(np.round(alphas, 2))) == [0.12, 1.0]


def test_embedding_errors_are_the_plotly_figures_errors(adata):
    with pytest.raises(DataError, match="Did you mean"):
        cv.static_embedding(adata, color="nkg7")
    with pytest.raises(DataError, match="obsm"):
        cv.static_embedding(adata, basis="X_missing")
    with pytest.raises(ConfigError, match="continuous"):
        cv.static_embedding(adata, color="NKG7", palette=["red"])
    with pytest.raises(ConfigError, match="colour scale"):
        cv.static_embedding(adata, color="NKG7", palette="NotAScale")


def test_confusion_matrix_shows_counts_and_row_fractions():
    fig = cv.static_confusion_matrix(
        pd.DataFrame([[6, 2], [1, 3]], index=["T", "B"], columns=["T", "B"]), title="held-out cells"
    )
    ax, cbar = fig.axes
    assert ax.get_title() == "held-out cells"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["T", "B"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T", "B"]
    assert _texts(fig) == ["6\n0.75", "2\n0.25", "1\n0.25", "3\n0.75"]
    assert cbar.get_ylabel() == "fraction (true)"
    counts = cv.static_confusion_matrix(np.array([[1200, 3], [4, 5]]), labels=["a", "b"], normalize=None)
    assert _texts(counts) == ["1,200", "3", "4", "5"]
    assert counts.axes[1].get_ylabel() == "count"
    with pytest.raises(ConfigError, match="normalize"):
        cv.static_confusion_matrix(np.eye(2), labels=["a", "b"], normalize="rows")


def test_attention_heatmap_labels_and_top_genes():
    m = np.zeros((2, 4, 4))
    m[:, 1, 2] = 5.0
    m[:, 3, 0] = 4.0
    fig = cv.static_attention_heatmap(m, rows=list("ABCD"), cols=list("WXYZ"), max_genes=2, title="layer 11")
    ax, cbar = fig.axes
    assert ax.get_title() == "layer 11" and cbar.get_ylabel() == "attention"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key gene", "query gene")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["B", "D"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W", "Y"]
    assert _texts(fig) == ["top 2 of 4 query genes × top 2 of 4 key genes by total attention"]
    diff = cv.static_attention_heatmap(np.array([[-1.0, 3.0]]), rows=["A"], cols=["X", "Y"], zmid=0.0)
    assert diff.axes[0].images[0].get_clim() == (-3.0, 3.0)


def test_training_curves_lines_are_the_plotly_traces():
    steps, epochs = _history()
    fig = cv.static_training_curves(steps, epochs, title="fine-tune", log_loss=True)
    top, bottom, lr_ax = fig.axes
    assert fig.get_suptitle() == "fine-tune"
    assert top.get_yscale() == "log" and lr_ax.get_ylabel() == "learning rate"
    drawn = [line.get_label() for ax in (top, lr_ax, bottom) for line in ax.get_lines()]
    plotly = [tr.name for tr in cv.training_curves(steps, epochs).data]
    assert drawn == plotly == ["loss", "val/loss", "lr", "train/accuracy", "val/accuracy"]
    np.testing.assert_allclose(top.get_lines()[1].get_xydata(), [[2, 1.6], [4, 1.1]])
    empty = cv.static_training_curves(None)
    assert [line.get_label() for line in empty.axes[0].get_lines()] == ["loss"]


def test_figures_build_in_threads(adata):
    out: list[Figure] = []
    threads = [
        threading.Thread(target=lambda: out.append(cv.static_embedding(adata, color="cell_type"))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and all(isinstance(f, Figure) for f in out)


def test_import_viz_loads_matplotlib_only_on_first_static_use():
    code = (
        "import sys, cellkit.viz as cv\n"
        "print('matplotlib' in sys.modules)\n"
        "cv.static_confusion_matrix\n"
        "print('matplotlib.pyplot' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]
