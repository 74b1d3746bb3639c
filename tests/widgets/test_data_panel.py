"""The Data panel: sources, cell selection, tokenizer options, tokenizing, bad input (no browser)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellkit._errors import ConfigError, DataError
from cellkit.widgets import DataPanel, StudioState
from cellkit.widgets._data import SCHEME_OPTIONS

MONO = "CD14+ Monocyte"


@pytest.fixture
def panel(state):
    return DataPanel(state, namespace={})


def _assert_error(panel, text):
    assert panel.last_error is not None, "expected an error"
    shown = f"{panel.message_text} {panel.error_text('cells')}"  # the banner or the line under the cells
    assert text in shown, shown
    assert "cellkit-error" in panel.message.value


# ---------------------------------------------------------------------------------- sources
def test_pick_a_kernel_variable(pbmc, demo):
    state = StudioState(model=demo)
    ns = {"pbmc": pbmc, "small": pbmc[:50].copy(), "n": 3, "_hidden": pbmc}
    panel = DataPanel(state, namespace=ns)
    assert panel.variables() == ["pbmc", "small"]
    assert [v for _, v in panel.variable.options] == ["pbmc", "small"]
    assert "No data yet" in panel.data_html.value
    panel.variable.value = "small"
    panel.use_button.click()
    assert panel.last_error is None and state.adata is ns["small"] and state.adata_name == "small"
    assert state.adata.shape == (50, 765) and not state.adata.isbacked and state.adata.raw.n_vars == 765
    assert "bulk_labels" in panel.data_html.value  # the summary lists the obs columns
    # new variables appear after a refresh
    ns["later"] = pbmc[:10].copy()
    panel.refresh_button.click()
    assert "later" in [v for _, v in panel.variable.options]
    assert panel.use_variable("later") is ns["later"] and state.adata_name == "later"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("n", "is not an AnnData (it is a int)"),
        ("missing", "no variable 'missing'"),
        ("", "No AnnData variable picked"),
    ],
)
def test_bad_variables_leave_the_state(state, name, expected):
    panel = DataPanel(state, namespace={"n": 3})
    before = state.adata
    assert panel.use_variable(name) is None
    _assert_error(panel, expected)
    assert state.adata is before and state.adata_name == "pbmc"


def test_open_h5ad_in_memory_and_backed(tmp_path, pbmc, demo):
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    state = StudioState(model=demo)
    panel = DataPanel(state, namespace={})
    panel.path.value = str(path)
    assert panel.backed.value is False  # small file: in memory by default
    panel.open_button.click()
    assert panel.last_error is None, panel.message_text
    assert state.adata.n_obs == 700 and not state.adata.isbacked and state.adata_name == str(path)
    adata = panel.open_h5ad(path, backed=True)
    try:
        assert adata.isbacked and state.adata is adata
        assert "backed" in panel.data_html.value and "backed" in panel.message_text
        # a backed file tokenizes too (the matrix stays on disk)
        panel.set_cells(query=f"bulk_labels == '{MONO}'")
        tokens = panel.tokenize()
        assert panel.last_error is None, panel.message_text
        assert len(tokens) == int((pbmc.obs["bulk_labels"] == MONO).sum())
    finally:
        adata.file.close()


def test_demo_pbmcs(demo):
    state = StudioState(model=demo)
    panel = DataPanel(state, namespace={})
    panel.demo_button.click()
    assert state.adata.n_obs == 700 and state.adata_name == "pbmc_demo"
    assert panel.last_error is None and panel.selected_cells() is None  # all 700 cells


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("empty", "Enter the path of an .h5ad file"),
        ("missing", "does not exist"),
        ("directory", "is a directory"),
        ("csv", "is not an .h5ad file"),
        ("garbage", "Could not read"),
    ],
)
def test_bad_files_leave_the_state(state, tmp_path, which, expected):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "fake.h5ad").write_bytes(b"not hdf5 at all" * 20)
    path = {
        "empty": "",
        "missing": tmp_path / "nope.h5ad",
        "directory": tmp_path,
        "csv": tmp_path / "data.csv",
        "garbage": tmp_path / "fake.h5ad",
    }[which]
    panel = DataPanel(state, namespace={})
    before = state.adata
    assert panel.open_h5ad(path) is None
    _assert_error(panel, expected)
    assert "Unexpected error" not in panel.message_text
    assert state.adata is before and state.adata_name == "pbmc"


# ---------------------------------------------------------------------------------- cells
def test_obs_filter_by_values_and_range(panel, pbmc):
    obs = pbmc.obs
    n = panel.set_cells(column="bulk_labels", values=[MONO, "CD19+ B"])
    want = obs.index[obs["bulk_labels"].isin([MONO, "CD19+ B"])]
    assert n == len(want) and list(panel.selected_cells()) == list(want)
    # numeric column: a range
    n = panel.set_cells(column="n_genes", between=(1000, 1100))
    assert n == int(obs["n_genes"].between(1000, 1100).sum())
    # through the widgets, as a user would
    panel.cell_mode.value = "filter"
    panel.filter_column.value = "louvain"
    assert "1" in panel.filter_values.options
    panel.filter_values.value = ("1",)
    assert len(panel.selected_cells()) == int((obs["louvain"] == "1").sum())
    panel.cell_mode.value = "all"
    assert panel.selected_cells() is None and panel.set_cells() == 700


def test_query_and_saving_a_selection(panel, state, pbmc):
    n = panel.set_cells(query=f"bulk_labels == '{MONO}' and n_genes > 1100")
    mask = (pbmc.obs["bulk_labels"] == MONO) & (pbmc.obs["n_genes"] > 1100)
    assert n == int(mask.sum()) > 0
    names = panel.save_selection("mono_big")
    assert panel.last_error is None
    assert list(state.selections["mono_big"]) == list(names) == list(pbmc.obs_names[mask])
    assert state.active_selection == "mono_big" and panel.cell_mode.value == "selection"


def test_named_selection_from_the_state(panel, state, pbmc):
    assert panel.selection.options == ()
    names = state.add_selection("lasso 1", np.arange(40, 80))  # e.g. a lasso in the embedding panel
    assert panel.cell_mode.value == "selection" and panel.selection.value == "lasso 1"
    assert list(panel.selected_cells()) == list(names) and len(names) == 40
    state.add_selection("other", np.arange(5), activate=False)
    assert [v for _, v in panel.selection.options] == ["lasso 1", "other"]
    assert panel.set_cells(selection="other") == 5 and panel.selection.value == "other"
    state.remove_selection("other")
    assert [v for _, v in panel.selection.options] == ["lasso 1"]
    # new data drops the selections
    state.set_adata(pbmc[:100].copy(), name="small")
    assert panel.selection.options == () and panel.cell_mode.value == "all"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"query": "bulk_labels =="}, "Cannot evaluate the cell query"),
        ({"query": "no_such_column > 3"}, "Cannot evaluate the cell query"),
        ({"query": "n_genes > 1e9"}, "selection is empty"),
        ({"column": "n_genes", "between": (5000, 6000)}, "the selection is empty"),
    ],
)
def test_bad_cell_choices(panel, state, kwargs, expected):
    assert panel.set_cells(**kwargs) is None
    _assert_error(panel, expected)
    # the count line says it too (or, for a query, the error line right under the query box)
    assert expected in (panel.cell_count.value + panel.error_text("cells")).replace("&#x27;", "'")
    assert panel.tokenize() is None and state.tokens is None  # the tokenizer refuses it too
    _assert_error(panel, expected)
    assert state.selections == {} and panel.save_selection("x") is None and state.selections == {}
    assert panel.set_cells() == 700 and panel.last_error is None  # still usable


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"column": "bulk_labels", "values": ["no such type"]}, "are not values of obs['bulk_labels']"),
        ({"column": "nope", "values": ["x"]}, "'nope' is not an obs column"),
        ({"selection": "missing"}, "No selection named 'missing'"),
        ({"query": "n_genes > 3", "selection": "a"}, "not several"),
    ],
)
def test_rejected_cell_choices_keep_the_previous_one(panel, state, kwargs, expected):
    n = panel.set_cells(query="n_genes > 1500")
    assert n == int((panel.state.adata.obs["n_genes"] > 1500).sum()) > 0
    assert panel.set_cells(**kwargs) is None
    _assert_error(panel, expected)
    assert panel.cell_mode.value == "query" and len(panel.selected_cells()) == n
    assert panel.set_cells() == 700 and panel.last_error is None  # still usable


# ---------------------------------------------------------------------------------- options
def test_option_widgets_for_the_demo_model(panel):
    from cellkit.datasets import demo_model

    assert panel.scheme.value == "scgpt"
    assert list(panel.option_widgets) == [s.name for s in SCHEME_OPTIONS["scgpt"]]
    opts = panel.options()
    assert opts["normalize_total"] is None  # DEMO_TOKENIZE_OPTIONS: .raw is already normalised
    assert opts["max_length"] is None and opts["n_bins"] is None and opts["include_zero"] is False
    assert opts["mode"] == "deterministic" and opts["seed"] == 0
    assert opts["case_fold"] is None and opts["strip_versions"] is None  # the scheme decides (mode)
    assert panel.option_widgets["case_fold"].label == "scheme default"
    panel.option_widgets["case_fold"].value = False
    assert panel.options()["case_fold"] is False
    panel.option_widgets["case_fold"].label = "scheme default"
    assert "51" in panel.option_widgets["n_bins"].placeholder  # the model's n_bins
    # genes= masks come from the matrix read: .raw.var has no boolean column, .var has highly_variable
    assert [label for label, _ in panel.option_widgets["genes"].options] == ["all genes"]
    assert panel.option_widgets["genes"].label == "all genes"  # never a blank dropdown
    assert panel.matrix.options[0][0] == "model default (.raw)"
    panel.matrix.value = "X"
    assert [label for label, _ in panel.option_widgets["genes"].options] == ["all genes", "highly_variable"]
    panel.matrix.value = "auto"
    panel.option_widgets["max_length"].value = "64"
    panel.option_widgets["normalize_total"].value = "1e4"
    assert panel.options()["max_length"] == 64 and panel.options()["normalize_total"] == 10_000.0
    # a model change keeps the family's widgets, with that model's defaults
    panel.state.set_model(demo_model(), source="demo")
    assert panel.options()["max_length"] is None and panel.options()["normalize_total"] is None
    # other schemes offer their own options
    panel.scheme.value = "geneformer"
    assert list(panel.option_widgets) == [s.name for s in SCHEME_OPTIONS["geneformer"]]
    assert panel.options()["target_sum"] == 10_000 and panel.options()["special_token"] is None
    panel.scheme.value = "perturbgene"
    panel.option_widgets["phenotype_columns"].value = ("bulk_labels",)
    assert panel.options()["phenotype_columns"] == ("bulk_labels",)


@pytest.mark.parametrize(("text", "expected"), [("abc", "max_length must be a number"), ("2.5", "whole number")])
def test_bad_option_values(panel, state, text, expected):
    panel.option_widgets["max_length"].value = text
    with pytest.raises(ConfigError, match=expected):
        panel.options()
    assert panel.tokenize() is None and state.tokens is None
    _assert_error(panel, expected)


# ---------------------------------------------------------------------------------- tokenize
def test_tokenize_a_selection(panel, state, pbmc):
    state.add_selection("first150", np.arange(150))
    panel.tokenize_button.click()  # the button tokenizes in the background, with the job row
    panel.wait(60)
    assert panel.last_error is None, panel.message_text
    tokens = state.tokens
    assert len(tokens) == 150 and list(tokens.obs_names) == list(pbmc.obs_names[:150])
    assert tokens.coverage.n_matched == tokens.coverage.n_genes == 765 and tokens.scheme == "scgpt"
    hist = panel.length_hist
    assert "cellkit-length-hist" in hist._dom_classes and hist.data[0].type == "histogram"
    assert len(hist.data[0].x) == 150 and list(hist.data[0].x) == [int(v) for v in tokens.lengths]
    assert tokens.max_length is None and hist.layout.shapes == ()  # no limit, no line
    assert panel._hist_box.layout.display == ""
    assert panel.result_html.value != ""  # the result summary is shown
    assert state.busy == "" and panel.progress.outcome == "done"  # the job row says it finished
    assert panel.progress.bar.value == 1.0 and not panel.tokenize_button.disabled
    # options reach the tokenizer
    panel.option_widgets["max_length"].value = "32"
    short = panel.tokenize()
    assert short is state.tokens and int(short.lengths.max()) <= 32 and len(short) == 150
    assert short.max_length == 32 and [sh.x0 for sh in hist.layout.shapes] == [32]  # the limit is drawn
    # new data clears the result
    state.set_adata(pbmc[:20].copy(), name="tiny")
    assert state.tokens is None and panel.result_html.value == ""
    assert len(panel.length_hist.data[0].x) == 0 and panel.length_hist.layout.shapes == ()
    assert panel._hist_box.layout.display == "none"


def test_tokenize_without_model_or_data(pbmc, demo):
    panel = DataPanel(StudioState(adata=pbmc), namespace={})
    assert panel.tokenize() is None
    _assert_error(panel, "No model loaded")
    assert panel.state.tokens is None
    alone = DataPanel(namespace={})  # no state, no data
    assert alone.variables() == [] and alone.selected_cells is not None
    assert alone.tokenize() is None
    _assert_error(alone, "No model loaded")
    alone.state.set_model(demo, source="demo")
    assert alone.tokenize() is None
    _assert_error(alone, "No data loaded")


def test_tokenize_data_without_known_genes(state, pbmc):
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(1.0, size=(30, 20)).astype(np.float32))
    unknown = ad.AnnData(x)
    unknown.var_names = [f"MADEUP{i}" for i in range(20)]
    unknown.obs_names = [f"c{i}" for i in range(30)]
    unknown.raw = unknown.copy()
    panel = DataPanel(state, namespace={"unknown": unknown})
    state.add_selection("a", [0, 1, 2])
    assert panel.tokenize() is not None  # first a good result on the PBMCs
    good = state.tokens
    panel.use_variable("unknown")
    assert panel.tokenize() is None
    _assert_error(panel, "None of the 20 genes")
    assert "vocabulary" in panel.message_text and isinstance(panel.last_error, DataError)
    assert state.tokens is None and good is not None  # the new data already dropped the old tokens
    assert panel.result_html.value == ""


def test_matrix_choice_reaches_the_tokenizer(panel, state):
    assert [v for _, v in panel.matrix.options] == ["auto", "X", "raw"]
    state.add_selection("few", np.arange(20))
    panel.matrix.value = "X"  # the PBMCs' .X is scaled (negative values): the tokenizer refuses it
    assert panel.tokenize() is None and state.tokens is None
    _assert_error(panel, "negative values")
    panel.matrix.value = "raw"
    assert len(panel.tokenize()) == 20 and panel.last_error is None


# ---------------------------------------------------------------------------------- issue 17: the chooser is the state's
def test_the_cell_chooser_writes_the_studio_state(panel, state, pbmc):
    from cellkit.widgets._state import DATA_FILTER

    n = panel.set_cells(query=f"bulk_labels == '{MONO}'")
    assert state.active_selection == DATA_FILTER and len(state.selected_cells()) == n
    panel.save_selection("mono")
    assert state.active_selection == "mono" and DATA_FILTER not in state.selections
    # "All cells" releases the saved selection (which stays listed)
    assert panel.set_cells() == 700
    assert state.active_selection == "" and state.selected_cells() is None and "mono" in state.selections
    panel.cell_mode.value = "selection"
    assert state.active_selection == "mono"
    panel.cell_mode.value = "all"  # the toggle, as a user clicks it
    assert state.active_selection == ""
    # the state's choice comes back to the chooser
    state.active_selection = "mono"
    assert panel.cell_mode.value == "selection" and panel.selection.value == "mono"
    state.use_all_cells()
    assert panel.cell_mode.value == "all" and "<b>700</b>" in panel.cell_count.value
    # a bad query leaves the state's choice as it was
    state.active_selection = "mono"
    assert panel.set_cells(query="no_such_column > 1") is None
    assert state.active_selection == "mono"


def test_tokenizing_all_cells_after_a_saved_selection(panel, state):
    panel.set_cells(column="bulk_labels", values=[MONO])
    panel.save_selection("mono")
    panel.set_cells()
    tokens = panel.tokenize()
    assert tokens is not None and len(tokens) == 700
    assert state.active_selection == "" and state.n_selected() == 700


# --- issue 17: errors beside the control
def test_a_bad_query_shows_its_message_beside_the_query_box(pbmc):
    from cellkit.widgets import DataPanel, StudioState

    panel = DataPanel(StudioState(adata=pbmc))
    panel.set_cells(query="bulk_labels == CD14")
    text = panel.error_text("cells")
    assert "quote it: bulk_labels == 'CD14'" in text
    assert panel._cells_error in panel.children
    assert panel.children.index(panel._cells_error) == panel.children.index(panel._query_box) + 2
    panel.set_cells(query="bulk_labels == 'CD14+ Monocyte'")
    assert panel.error_text("cells") == "" and "cellkit-error" not in panel.message.value


# ---------------------------------------------------------------------------------- issue 19: gene identity
def test_check_genes_shows_the_coverage_report(panel, state, pbmc):
    report = panel.coverage_button.click() or panel.coverage_report
    assert panel.last_error is None, panel.message_text
    assert report.n_genes == report.n_seen == 765 and report.unseen_share == 0
    assert "cellkit-unseen-share" in panel.coverage_html.value and "0.0%" in panel.coverage_html.value
    # the PBMCs with two genes renamed to something no rule knows: their expression is named
    renamed = pbmc.copy()
    raw = renamed.raw.to_adata()
    raw.var_names = ["NOT_A_GENE1", "NOT_A_GENE2", *raw.var_names[2:]]
    renamed.raw = raw
    state.set_adata(renamed, name="renamed")
    assert panel.coverage_html.value == ""  # new data clears the old report
    state.add_selection("first100", np.arange(100))
    report = panel.check_genes()
    x = raw.X[:100].toarray()
    assert report.n_cells == 100 and report.n_dropped == 2
    assert report.unseen_share == pytest.approx(x[:, :2].sum() / x.sum(), rel=1e-6)
    assert {g for g, _ in report.top_missing} == {"NOT_A_GENE1", "NOT_A_GENE2"}
    assert "NOT_A_GENE1" in panel.coverage_html.value
    assert SCHEME_OPTIONS["scgpt"][-1].name == "duplicates" and "gene_tables" in panel.option_widgets


def test_tokenize_shows_the_coverage_report_and_warns_when_much_is_unseen(panel, state, pbmc):
    """Tokenize shows what the model will not see in the tab (a warning in the kernel's log is lost)."""
    renamed = pbmc.copy()
    raw = renamed.raw.to_adata()
    raw.var_names = [f"NOT_A_GENE{i}" if i % 4 == 0 else g for i, g in enumerate(raw.var_names)]
    renamed.raw = raw
    state.set_adata(renamed, name="renamed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tokenizer's own warning is not raised: the tab says it
        tokens = panel.tokenize()
    assert tokens is not None and state.tokens is tokens and panel.last_error is None
    report = panel.coverage_report
    x = raw.X.toarray()
    assert report.n_cells == 700 and report.n_dropped == len(range(0, 765, 4))
    assert report.unseen_share == pytest.approx(x[:, ::4].sum() / x.sum(), rel=1e-6) and report.unseen_share > 0.1
    assert "cellkit-unseen-share" in panel.coverage_html.value
    assert "cellkit-warning" in panel.message.value and f"{report.unseen_share:.1%}" in panel.message_text
