"""Plain words and polish in the studio (issue 17, items 5 and 8), checked on the widgets' state.

Each tokenizer option and training objective has a plain label that keeps its API name visible and
a tooltip saying what it does; no dropdown shows a blank; buttons are as wide as their labels;
Stop / Cancel look disabled while idle; wide tables and the program heatmap scroll inside their
panel.
"""

from __future__ import annotations

import ipywidgets as widgets
import pytest


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()) or ():
        yield from _walk(child)


@pytest.fixture
def studio(pbmc, demo):
    import cellkit

    return cellkit.Studio(adata=pbmc, model=demo, adata_name="pbmc")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("max_length", "Max genes per cell"),
        ("n_bins", "Expression bins"),
        ("include_zero", "Keep zero-expression genes"),
        ("normalize_total", "Normalise to total counts"),
        ("log1p", "log1p"),
        ("n_hvg", "Top variable genes"),
    ],
)
def test_scgpt_options_have_plain_labels_and_keep_the_api_name(state, name, words):
    from cellkit.widgets._data import DataPanel

    panel = DataPanel(state, namespace={})
    rows = {row.children[1]: row.children[0] for row in panel.options_box.children}
    widget = panel.option_widgets[name]
    label = rows[widget]
    assert words in label.value and f"({name})" in label.value  # plain words, API name in grey
    assert f"API option: {name}=" in widget.tooltip and f"API option: {name}=" in label.tooltip
    spec = panel._option_specs[name]
    assert spec.label == words or words in spec.label
    assert spec.help[:20].lower() in widget.tooltip.lower()  # and what the option does


def test_every_scheme_option_has_a_label_and_a_tooltip():
    from cellkit.widgets._data import SCHEME_OPTIONS

    for specs in SCHEME_OPTIONS.values():
        for spec in specs:
            assert spec.label and spec.label != spec.name, spec
            assert spec.help, spec


def test_gene_ids_dropdown_is_never_blank(state):
    from cellkit.widgets._data import DataPanel

    panel = DataPanel(state, namespace={})
    assert panel.gene_column.label.startswith("var_names")
    assert panel.gene_column.index == 0
    assert "gene_column" not in panel._matrix_kwargs()  # the row names: no gene_column= passed
    adata = state.adata.copy()
    adata.var["symbol"] = adata.var_names.astype(str)
    state.adata = adata  # new data with a text var column: offered, the row names still first
    assert panel.gene_column.label.startswith("var_names") and panel.gene_column.index == 0
    panel.gene_column.value = "symbol"
    assert panel._matrix_kwargs()["gene_column"] == "symbol"


def test_no_dropdown_of_the_studio_is_blank_with_data(studio):
    blank = [
        (title, w.options)
        for title, panel in studio.panels.items()
        for w in _walk(panel)
        if isinstance(w, widgets.Dropdown) and w.options and w.index is None
    ]
    assert blank == []


def test_objectives_are_described_once_in_cellkit_train():
    from cellkit.train import OBJECTIVES

    for name, cls in OBJECTIVES.items():
        assert cls.title and cls.description, name


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("cls", "Cell-type classifier (cls)"),
        ("gep", "Masked expression (gep)"),
        ("mvc", "Cell-embedding expression (mvc)"),
        ("ecs", "Elastic cell similarity (ecs)"),
        ("dab", "Batch correction, adversarial (dab)"),
        ("cce", "Contrastive cells (cce)"),
        ("zero_nll", "Zero-probability (zero_nll)"),
    ],
)
def test_objective_checkboxes_have_plain_names(state, name, words):
    from cellkit.train import OBJECTIVES
    from cellkit.widgets import FinetunePanel

    panel = FinetunePanel(state)
    box = panel.objective_boxes[name]
    assert box.description == words
    assert OBJECTIVES[name].description[1:] in box.tooltip  # the panel reads cellkit.train's table
    assert f"API name: {name!r}" in box.tooltip


def test_buttons_are_as_wide_as_their_labels(studio):
    too_narrow = [
        (title, w.description, w.layout.width)
        for title, panel in studio.panels.items()
        for w in _walk(panel)
        if isinstance(w, widgets.Button)
        # the default width (about 148 px) fits ~14 characters and an icon; longer labels size themselves
        and (len(w.description) > 14 or w.layout.width not in (None, ""))
        and w.layout.width not in ("auto", "max-content")
        and not _fits(w)
    ]
    assert too_narrow == []


def _fits(button) -> bool:
    """A button of a fixed pixel width wide enough for its label (~8 px a character) and an icon."""
    width = str(button.layout.width or "")
    return width.endswith("px") and float(width[:-2]) >= 8 * len(button.description) + 40


def test_checkbox_labels_are_not_cut(studio):
    too_narrow = [
        (title, w.description, w.layout.width)
        for title, panel in studio.panels.items()
        for w in _walk(panel)
        if isinstance(w, widgets.Checkbox)
        and str(w.layout.width or "").endswith("px")
        and float(w.layout.width[:-2]) < 7 * len(w.description) + 25
    ]
    assert too_narrow == []


def test_stop_and_cancel_look_disabled_while_idle(state):
    from cellkit.widgets import FinetunePanel
    from cellkit.widgets._progress import JobProgress

    panel = FinetunePanel(state)
    stop = panel.stop_button
    assert stop.disabled and stop.button_style == ""
    stop.disabled = False
    assert stop.button_style == "warning"
    stop.disabled = True
    assert stop.button_style == ""
    job = JobProgress()
    cancel = job.cancel_button
    cancel.disabled = True
    assert cancel.button_style == ""
    cancel.disabled = False
    assert cancel.button_style == "warning"
    assert job.status.layout.width == "auto"  # the status line is not cut at the default 300 px


def test_tables_scroll_inside_their_panel():
    import pandas as pd

    from cellkit.widgets._base import html_table

    wide = pd.DataFrame({f"column {i}": [1.0, 2.0] for i in range(30)})
    html = html_table(wide)
    assert html.startswith("<div class='cellkit-table-scroll'") and "overflow-x:auto" in html
    assert "max-width:100%" in html and html.endswith("</table></div>")


def test_program_heatmap_is_held_to_the_panel_width(state):
    from cellkit.widgets import GenePanel

    panel = GenePanel(state)
    assert panel.heatmap_figure in panel.heatmap_box.children
    assert panel.heatmap_box in panel.children
    assert panel.heatmap_box.layout.max_width == "100%" and panel.heatmap_box.layout.overflow == "auto"
