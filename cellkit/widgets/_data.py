"""The Data panel: pick an AnnData, choose cells, set the tokenizer's options, tokenize.

Sources: an AnnData variable of the notebook (the kernel's namespace), an ``.h5ad`` file (in memory
or backed) or the shipped PBMCs (:func:`cellkit.datasets.pbmc_demo`). Cells: all, an ``obs``
filter, a query string (:func:`cellkit.data.select_cells`) or a named selection of the studio (e.g. a lasso in the embedding
panel). The choice is the studio's: it sets ``state.active_selection`` (all cells releases it), so
the fine-tune and every other panel act on the same cells. "Tokenize" calls :func:`cellkit.tokenize` with the options of the model's scheme and
stores the result in ``state.tokens``; the coverage, summary and a token-length histogram show
below. "Check genes" shows :func:`cellkit.genes.coverage_report` first: which genes the model will
see, by rule, and the share of the expression it will not see.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np

from ._base import Panel, guarded, labelled
from ._progress import JobProgress
from ._state import DATA_FILTER, StudioState

__all__ = ["SCHEME_OPTIONS", "DataPanel", "OptionSpec"]

#: files larger than this open backed (``backed="r"``) by default
BACKED_THRESHOLD = 1 << 30
#: columns with more distinct values than this are filtered with a query instead of a value list
MAX_FILTER_VALUES = 1000
#: Tokenize shows the coverage report of at most this many of the chosen cells (the first ones)
COVERAGE_CELLS = 20_000
#: above this share of unseen expression the Tokenize message is a warning (tokenize's own default)
UNSEEN_WARNING = 0.1
SCHEMES = ("scgpt", "geneformer", "teddy", "perturbgene")


# ---------------------------------------------------------------------------------- option specs
@dataclass(frozen=True)
class OptionSpec:
    """One tokenizer option shown as a widget.

    Attributes
    ----------
    name
        The option of :func:`cellkit.tokenize` (a key of the scheme's ``OPTIONS``); the panel shows
        it in grey after ``label`` and names it in the tooltip.
    label
        Plain words for the option, e.g. ``"Max genes per cell"`` for ``max_length``.
    kind
        ``"int"``, ``"float"``, ``"bool"``, ``"text"``, ``"opt_int"`` / ``"opt_float"`` (a text box;
        blank = ``None``), ``"choice"`` (``choices``), ``"obs_column"`` (an obs column or ``None``),
        ``"obs_columns"`` (several obs columns → tuple) or ``"var_mask"`` (a boolean var column or
        ``None``).
    help
        What the option does, in plain words (tooltip; placeholder of a number box, whose text
        ends with ``(blank: ...)``).
    choices
        ``(label, value)`` pairs for ``"choice"``.
    """

    name: str
    label: str
    kind: str
    help: str = ""
    choices: tuple[tuple[str, Any], ...] = ()


_MODE = (("deterministic", "deterministic"), ("compat (bit-for-bit with the original)", "compat"))
_RETRY = (("scheme default", None), ("yes", True), ("no", False))
#: what a dropdown holds for an option value of None (ipywidgets shows a Dropdown whose value is
#: None as blank, so the label of the None choice would never be seen)
_NONE = "\x1fnone"
#: gene-name retries (cellkit.data.genes.resolve_genes); scGPT's compat mode matches names exactly
_GENE_RETRIES = (
    OptionSpec(
        "case_fold",
        "Match names ignoring case",
        "choice",
        "also match gene names after upper-casing them (off in compat mode)",
        _RETRY,
    ),
    OptionSpec(
        "strip_versions",
        "Ignore id versions",
        "choice",
        "also match a versioned id (ENSG00000141510.17) without its version (off in compat mode)",
        _RETRY,
    ),
)

#: translations through the shipped gene tables (cellkit.genes); scgpt and geneformer only
_GENE_TABLES = (
    OptionSpec(
        "gene_tables",
        "Translate symbols / Ensembl ids",
        "choice",
        "also match symbols to Ensembl ids and back, and outdated symbols, with the shipped GENCODE tables "
        "(off in compat mode)",
        _RETRY,
    ),
    OptionSpec(
        "orthologs",
        "Mouse genes via human orthologs",
        "choice",
        "mouse data: match each gene's one-to-one human ortholog (off in compat mode)",
        _RETRY,
    ),
    OptionSpec(
        "species",
        "Species of the data",
        "choice",
        "which species the gene names are from (auto: ENSMUSG ids or mouse symbols mean mouse)",
        (("auto", "auto"), ("human", "human"), ("mouse", "mouse")),
    ),
)
_SCGPT_DUPLICATES = OptionSpec(
    "duplicates",
    "Genes sharing a token",
    "choice",
    "when several columns resolve to one token: keep each (scGPT), add their values, keep the first, or refuse",
    (("keep each (scGPT)", None), ("add values", "sum"), ("first", "first"), ("refuse", "refuse")),
)

#: scheme → the options the panel offers (the rest keep the scheme's defaults)
SCHEME_OPTIONS: dict[str, tuple[OptionSpec, ...]] = {
    "scgpt": (
        OptionSpec(
            "max_length",
            "Max genes per cell",
            "opt_int",
            "at most this many genes (tokens) per cell; a cell with more is sampled down (blank: no limit)",
        ),
        OptionSpec(
            "n_bins",
            "Expression bins",
            "opt_int",
            "expression values are grouped into this many levels per cell (blank: the model's)",
        ),
        OptionSpec(
            "include_zero",
            "Keep zero-expression genes",
            "bool",
            "also make tokens of genes with zero expression in the cell (otherwise only expressed genes)",
        ),
        OptionSpec(
            "normalize_total",
            "Normalise to total counts",
            "opt_float",
            "scale each cell to this total count, e.g. 1e4 (blank: no normalisation)",
        ),
        OptionSpec(
            "log1p", "Log-transform (log1p)", "bool", "take log(1 + x) of the expression after normalising"
        ),
        OptionSpec(
            "n_hvg",
            "Top variable genes",
            "opt_int",
            "keep only this many most variable genes (blank: all genes)",
        ),
        OptionSpec(
            "hvg_flavor",
            "Variable-gene method",
            "choice",
            "how the most variable genes are found (scanpy highly_variable_genes flavor)",
            (("seurat_v3", "seurat_v3"), ("seurat", "seurat"), ("cell_ranger", "cell_ranger")),
        ),
        OptionSpec(
            "genes",
            "Only genes marked in",
            "var_mask",
            "restrict to a boolean var column (e.g. highly_variable)",
        ),
        OptionSpec(
            "mode",
            "Binning mode",
            "choice",
            "how ties between equal values are binned: deterministic, or bit-for-bit as the original scGPT",
            _MODE,
        ),
        OptionSpec("seed", "Random seed", "int", "seed of the tie-breaking / sampling"),
        *_GENE_RETRIES,
        *_GENE_TABLES,
        _SCGPT_DUPLICATES,
    ),
    "geneformer": (
        OptionSpec(
            "max_length", "Max genes per cell", "opt_int", "max tokens per cell (blank: the model's)"
        ),
        OptionSpec(
            "special_token",
            "Add start/end tokens",
            "choice",
            "<cls>/<eos> around each cell",
            (("model default", None), ("yes", True), ("no", False)),
        ),
        OptionSpec("target_sum", "Normalise to total counts", "float", "counts per cell before ranking"),
        OptionSpec(
            "collapse_gene_ids", "Merge duplicate gene ids", "bool", "sum genes that map to the same id"
        ),
        OptionSpec(
            "n_counts_column",
            "Total-counts column",
            "text",
            "obs column with total counts (computed when absent)",
        ),
        OptionSpec(
            "filter_pass_column",
            "Pass-filter column",
            "text",
            "obs column; cells with a value other than 1 are skipped",
        ),
        OptionSpec(
            "keep_uncropped_length",
            "Record uncropped length",
            "bool",
            "record each cell's length before cropping",
        ),
        OptionSpec("mode", "Gene-id handling", "choice", "gene-id handling", _MODE),
        *_GENE_TABLES,
    ),
    "teddy": (
        OptionSpec(
            "max_length",
            "Max tokens per cell",
            "opt_int",
            "total length incl. <cls> (blank: the model's, else 2048)",
        ),
        OptionSpec("add_cls", "Add a cell token", "bool", "prepend <cls>"),
        OptionSpec("bins", "Expression bins", "opt_int", "quantile bins (blank: rank encoding)"),
        OptionSpec("continuous_rank", "Rank as a number", "bool", "value = rank scaled to [-1, 1]"),
        OptionSpec("random_genes", "Random subset of genes", "bool", "random subset of the expressed genes"),
        OptionSpec(
            "include_zero_genes",
            "Pad with unexpressed genes",
            "bool",
            "fill short cells with unexpressed genes",
        ),
        OptionSpec("gene_seed", "Random seed (genes)", "int", "seed of the random genes"),
        OptionSpec("label_column", "Label column", "obs_column", "obs column carried as the label"),
        OptionSpec(
            "bio_annotations",
            "Add annotation tokens",
            "bool",
            "add disease/tissue/cell/sex annotation tokens",
        ),
        *_GENE_RETRIES,
    ),
    "perturbgene": (
        OptionSpec(
            "max_length",
            "Max tokens per cell",
            "opt_int",
            "total length incl. [CLS]/[EOS] (blank: the model's)",
        ),
        OptionSpec(
            "phenotype_columns", "Phenotype columns", "obs_columns", "obs columns emitted as phenotype tokens"
        ),
        OptionSpec(
            "gene_order",
            "Gene order",
            "choice",
            "order of the gene tokens",
            (("column", "column"), ("gene list", "gene_list")),
        ),
        *_GENE_RETRIES,
    ),
}


def _scheme_defaults(scheme: str) -> dict[str, Any]:
    from cellkit.data import scheme_options

    return scheme_options(scheme)


def _option_tooltip(spec: OptionSpec) -> str:
    """What the option does, then its name in :func:`cellkit.tokenize` (for those who script it)."""
    text = spec.help[:1].upper() + spec.help[1:]
    return f"{text}. API option: {spec.name}= of cellkit.tokenize"


def _option_row(spec: OptionSpec, widget: widgets.Widget) -> widgets.HBox:
    """A form row: the plain label, the API name small and grey after it, then the widget."""
    label = widgets.HTML(
        f"{_esc(spec.label)} <span class='cellkit-api-name' style='color:#888;font-size:11px'>"
        f"({_esc(spec.name)})</span>",
        layout=widgets.Layout(width="300px"),
    )
    label.tooltip = _option_tooltip(spec)
    label.add_class("cellkit-option-label")
    return widgets.HBox([label, widget])


def _kernel_namespace() -> dict[str, Any]:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return {}
    shell = get_ipython()
    return dict(shell.user_ns) if shell is not None else {}


def _is_categorical(series: Any) -> bool:
    import pandas as pd

    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def _is_text(series: Any) -> bool:
    import pandas as pd

    return not pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _esc(value: Any) -> str:
    return html.escape(str(value))


class DataPanel(Panel):
    """Pick data and cells, tokenize them for the current model.

    Parameters
    ----------
    state
        The shared studio state (a fresh one when the panel is used alone).
    namespace
        Where to look for AnnData variables (default: the notebook's namespace,
        ``IPython.get_ipython().user_ns``; tests pass a dict).

    Attributes
    ----------
    variable, path, backed
        Source widgets: AnnData variable dropdown, ``.h5ad`` path box, "backed" checkbox.
    cell_mode, filter_column, filter_values, filter_min, filter_max, query, selection
        Cell-selection widgets; ``cell_count`` says how many cells the choice selects.
    scheme, matrix, gene_column, option_widgets
        Tokenizer settings: scheme, expression matrix, gene identifiers, and one widget per scheme option.
    tokenize_button, progress, result_html, length_hist
        "Tokenize", its progress output, the summary and the token-length histogram (``FigureWidget``).
    coverage_button, coverage_html, coverage_report
        "Check genes": :func:`cellkit.genes.coverage_report` for the chosen cells, matrix and options
        before tokenizing (genes per matching rule, the share of the expression on genes the model
        will not see, the most-expressed of them), its view, and the last report.

    Examples
    --------
    >>> panel = DataPanel(StudioState(model=cellkit.datasets.demo_model()))  # doctest: +SKIP
    >>> panel.load_demo_data(); panel.set_cells(query="bulk_labels == 'CD14+ Monocyte'")  # doctest: +SKIP
    >>> tokens = panel.tokenize()  # doctest: +SKIP
    """

    title = "Data"

    def __init__(
        self, state: StudioState | None = None, *, namespace: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-data-panel")
        self._namespace = namespace
        self._option_specs: dict[str, OptionSpec] = {}
        self.option_widgets: dict[str, widgets.Widget] = {}
        self._quiet = False  # suppress count updates while widgets are rebuilt
        self._pushing = False  # the chooser is writing the state (do not echo it back)

        # -- source
        self.variable = widgets.Dropdown(options=[], layout=widgets.Layout(width="300px"))
        self.use_button = widgets.Button(description="Use variable", tooltip="use the AnnData variable")
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", tooltip="list AnnData variables"
        )
        self.path = widgets.Text(placeholder="path/to/data.h5ad", layout=widgets.Layout(width="300px"))
        self.backed = widgets.Checkbox(value=False, description="backed", indent=False)
        self.backed.layout.width = "90px"
        self.open_button = widgets.Button(description="Open", icon="folder-open")
        self.demo_button = widgets.Button(description="Demo PBMCs", tooltip="cellkit.datasets.pbmc_demo()")
        self.data_html = widgets.HTML()
        self.data_html.add_class("cellkit-data-info")

        # -- cells
        self.cell_mode = widgets.ToggleButtons(
            options=[
                ("All cells", "all"),
                ("Obs filter", "filter"),
                ("Query", "query"),
                ("Selection", "selection"),
            ],
            value="all",
        )
        self.cell_mode.style.button_width = "90px"
        self.filter_column = widgets.Dropdown(options=[], layout=widgets.Layout(width="220px"))
        self.filter_values = widgets.SelectMultiple(options=[], rows=6, layout=widgets.Layout(width="300px"))
        self.filter_min = widgets.FloatText(description="min", layout=widgets.Layout(width="170px"))
        self.filter_max = widgets.FloatText(description="max", layout=widgets.Layout(width="170px"))
        self.query = widgets.Text(
            placeholder="obs query, e.g. bulk_labels == 'CD14+ Monocyte' and n_genes > 500",
            continuous_update=False,
            layout=widgets.Layout(width="480px"),
        )
        self.selection = widgets.Dropdown(options=[], layout=widgets.Layout(width="300px"))
        self.cell_count = widgets.HTML()
        self.cell_count.add_class("cellkit-cell-count")
        self.save_name = widgets.Text(placeholder="selection name", layout=widgets.Layout(width="180px"))
        self.save_button = widgets.Button(description="Save selection", tooltip="store as a named selection")
        self._column_row = labelled("obs column", self.filter_column)
        self._values_row = labelled("values", self.filter_values)
        self._range_row = widgets.HBox([self.filter_min, self.filter_max])
        self._filter_box = widgets.VBox([self._column_row])
        self._query_box = widgets.VBox([labelled("query", self.query)])
        self._selection_box = widgets.VBox([labelled("selection", self.selection)])
        # errors of the cell choice (a query that does not parse, ...) show right under the chooser
        self._cells_error = self.error_line("cells", "Cells")
        self.query.add_class("cellkit-data-query")

        # -- tokenizer
        self.scheme = widgets.Dropdown(
            options=list(SCHEMES), value="scgpt", layout=widgets.Layout(width="160px")
        )
        self.matrix = widgets.Dropdown(options=[("model default", "auto")], value="auto")
        self.gene_column = widgets.Dropdown(
            options=[("var_names (the row names)", _NONE)],
            value=_NONE,
            tooltip="which var column holds the gene names or ids the model's vocabulary uses",
        )
        self.options_box = widgets.VBox()
        self.tokenize_button = widgets.Button(description="Tokenize", button_style="primary", icon="play")
        #: progress bar, estimate and Cancel of "Tokenize" (the shared job row)
        self.progress = JobProgress(css_prefix="cellkit-tokenize-job")
        self.progress.add_class("cellkit-tokenize-progress")
        self.jobs = self.progress  # the name the other panels give their job row
        self.result_html = widgets.HTML()
        self.result_html.add_class("cellkit-tokenize-result")
        #: "Check genes": cellkit.genes.coverage_report before tokenizing
        self.coverage_button = widgets.Button(
            description="Check genes",
            icon="search",
            tooltip="which genes the model will see, by matching rule, and the share of the expression it "
            "will not see (cellkit.genes.coverage_report)",
        )
        self.coverage_html = widgets.HTML()
        self.coverage_html.add_class("cellkit-coverage-report-box")
        #: the last :class:`cellkit.genes.CoverageReport` shown
        self.coverage_report: Any = None
        self.length_hist = self._make_hist()
        self._hist_box = widgets.Box([self.length_hist], layout=widgets.Layout(display="none"))

        # -- wiring
        self.use_button.on_click(lambda _b: self.use_variable())
        self.refresh_button.on_click(lambda _b: self.refresh_variables())
        self.open_button.on_click(lambda _b: self.open_h5ad())
        self.demo_button.on_click(lambda _b: self.load_demo_data())
        self.save_button.on_click(lambda _b: self.save_selection())
        self.tokenize_button.on_click(lambda _b: self.tokenize(background=True))
        self.coverage_button.on_click(lambda _b: self.check_genes())
        self.path.observe(self._on_path, names="value")
        self.cell_mode.observe(self._on_cell_widgets, names="value")
        self.filter_column.observe(self._on_filter_column, names="value")
        for w in (self.filter_values, self.filter_min, self.filter_max, self.query, self.selection):
            w.observe(self._on_cell_widgets, names="value")
        self.scheme.observe(lambda _c: self._build_options(), names="value")
        self.matrix.observe(lambda _c: self._build_options(), names="value")  # boolean var columns differ
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_selections, names="selections")
        self.state.observe(self._on_active_selection, names="active_selection")
        self.state.observe(self._on_tokens, names="tokens")
        self.state.observe(self._clear_report, names=["adata", "model"])
        self.state.observe(self._on_obs_changed, names="obs_version")

        def section(text: str) -> widgets.HTML:
            return widgets.HTML(f"<div style='font-weight:600;margin-top:6px'>{_esc(text)}</div>")

        self.children = [
            self.message,
            section("1 · Data"),
            widgets.HBox([labelled("AnnData variable", self.variable), self.use_button, self.refresh_button]),
            widgets.HBox(
                [labelled(".h5ad file", self.path), self.backed, self.open_button, self.demo_button]
            ),
            self.data_html,
            section("2 · Cells"),
            self.cell_mode,
            self._filter_box,
            self._query_box,
            self._selection_box,
            self._cells_error,
            widgets.HBox([self.cell_count, self.save_name, self.save_button]),
            section("3 · Tokenizer"),
            widgets.HBox([labelled("scheme", self.scheme), labelled("matrix", self.matrix, "60px")]),
            labelled("gene ids", self.gene_column),
            self.options_box,
            widgets.HBox([self.coverage_button, self.tokenize_button]),
            self.coverage_html,
            self.progress,
            self.result_html,
            self._hist_box,
        ]
        self.refresh_variables()
        self._on_adata()
        self._on_model()
        self._on_selections()
        self._on_active_selection()
        self._on_tokens()

    # ================================================================== source
    def _ns(self) -> Mapping[str, Any]:
        return self._namespace if self._namespace is not None else _kernel_namespace()

    def variables(self) -> list[str]:
        """Names of the AnnData objects in the namespace (sorted; private names skipped)."""
        from anndata import AnnData

        return sorted(k for k, v in self._ns().items() if not k.startswith("_") and isinstance(v, AnnData))

    @guarded
    def refresh_variables(self) -> list[str]:
        """Re-list the AnnData variables in the namespace; returns their names."""
        ns = self._ns()
        names = self.variables()
        current = self.variable.value
        self.variable.options = [(f"{n} ({ns[n].n_obs:,} × {ns[n].n_vars:,})", n) for n in names]
        if current in names:
            self.variable.value = current
        elif self.state.adata_name in names:
            self.variable.value = self.state.adata_name
        return names

    @guarded
    def use_variable(self, name: str | None = None) -> Any:
        """Make the namespace's AnnData ``name`` (default: the dropdown's) the studio's data."""
        from anndata import AnnData

        import cellkit

        name = (self.variable.value if name is None else name) or ""
        if not name:
            raise cellkit.DataError(
                "No AnnData variable picked: create one in the notebook and click “Refresh”, open an .h5ad "
                "file or click “Demo PBMCs”."
            )
        ns = self._ns()
        if name not in ns:
            raise cellkit.DataError(
                f"There is no variable {name!r} in the notebook; click “Refresh” to re-list."
            )
        obj = ns[name]
        if not isinstance(obj, AnnData):
            raise cellkit.DataError(f"{name!r} is not an AnnData (it is a {type(obj).__name__}).")
        self.state.set_adata(obj, name=name)
        self.refresh_variables()
        self.show_message(f"Using {name}: {obj.n_obs:,} cells × {obj.n_vars:,} genes.", "ok")
        return obj

    @guarded
    def open_h5ad(self, path: str | Path | None = None, *, backed: bool | None = None) -> Any:
        """Read an ``.h5ad`` file and make it the studio's data.

        Parameters
        ----------
        path
            The file (default: the path box).
        backed
            Open it backed (``backed="r"``: the matrix stays on disk). Default: the checkbox, which
            is ticked automatically for files over 1 GB.
        """
        import anndata

        import cellkit

        if path is not None:
            self.path.value = str(path)  # also sets the "backed" default for its size
        text = str(self.path.value).strip()
        if not text:
            raise cellkit.DataError("Enter the path of an .h5ad file first (or click “Demo PBMCs”).")
        where = Path(text).expanduser()
        if not where.exists():
            raise cellkit.DataError(f"{where} does not exist; check the path.")
        if where.is_dir():
            raise cellkit.DataError(f"{where} is a directory; pick an .h5ad file.")
        if where.suffix.lower() != ".h5ad":
            raise cellkit.DataError(
                f"{where.name} is not an .h5ad file; convert it to AnnData first (e.g. anndata.read_csv(...)"
                ".write_h5ad(...)) or load it in the notebook and pick the variable."
            )
        backed = self.backed.value if backed is None else bool(backed)
        try:
            adata = anndata.read_h5ad(where, backed="r" if backed else None)
        except Exception as exc:  # h5py / anndata raise many types for a bad file
            raise cellkit.DataError(
                f"Could not read {where} as an .h5ad file ({type(exc).__name__}: {exc}). Is it an AnnData file, "
                "and complete?"
            ) from exc
        self.state.set_adata(adata, name=str(where))
        mode = "backed (matrix on disk)" if backed else "in memory"
        self.show_message(
            f"Opened {where.name} {mode}: {adata.n_obs:,} cells × {adata.n_vars:,} genes.", "ok"
        )
        return adata

    @guarded
    def load_demo_data(self) -> Any:
        """Use the shipped PBMCs (:func:`cellkit.datasets.pbmc_demo`: 700 cells, ``.raw`` = log1p CP10k)."""
        import cellkit.datasets

        adata = cellkit.datasets.pbmc_demo()
        self.state.set_adata(adata, name="pbmc_demo")
        self.show_message(f"Using the demo PBMCs: {adata.n_obs:,} cells × {adata.n_vars:,} genes.", "ok")
        return adata

    def _on_path(self, change: dict[str, Any]) -> None:
        where = Path(str(change["new"]).strip()).expanduser()
        try:
            if where.is_file():
                self.backed.value = where.stat().st_size > BACKED_THRESHOLD
        except OSError:
            pass

    def _data_info_html(self) -> str:
        adata = self.state.adata
        if adata is None:
            return "<i>No data yet: pick a variable, open an .h5ad file or click “Demo PBMCs”.</i>"
        backed = bool(getattr(adata, "isbacked", False))
        cols = list(adata.obs.columns)
        shown = ", ".join(cols[:30]) + (f", … ({len(cols)} in all)" if len(cols) > 30 else "")
        raw = f"yes ({adata.raw.n_vars:,} genes)" if adata.raw is not None else "no"
        rows = [
            ("data", self.state.adata_name or "adata"),
            ("shape", f"{adata.n_obs:,} cells × {adata.n_vars:,} genes"),
            ("storage", f"backed ({adata.filename})" if backed else "in memory"),
            ("obs columns", shown or "none"),
            (".raw", raw),
            ("layers", ", ".join(adata.layers.keys()) or "none"),
        ]
        body = "".join(
            f"<tr><th style='text-align:left;padding:1px 10px 1px 0'>{_esc(k)}</th><td>{_esc(v)}</td></tr>"
            for k, v in rows
        )
        return f"<table class='cellkit-table'>{body}</table>"

    # ================================================================== cells
    @guarded
    def set_cells(
        self,
        *,
        column: str | None = None,
        values: Any = None,
        between: tuple[float, float] | None = None,
        query: str | None = None,
        selection: str | None = None,
    ) -> int | None:
        """Choose the cells to tokenize and every panel uses (no argument: all cells).

        The choice becomes the studio's active selection (``state.active_selection``): ``""`` for
        all cells, the named selection, or :data:`~cellkit.widgets._state.DATA_FILTER` holding the
        filter's / query's cells.

        Parameters
        ----------
        column, values
            An obs filter: cells whose ``obs[column]`` is one of ``values`` (categorical / text columns).
        column, between
            An obs filter on a numeric column: ``min <= obs[column] <= max``.
        query
            A query string (:func:`cellkit.data.select_cells`), e.g. ``"n_genes > 500"``.
        selection
            The name of a selection in ``state.selections``.

        Returns
        -------
        The number of cells selected (``None`` on error; the message says why).
        """
        import cellkit

        given = [x is not None for x in (column, query, selection)]
        if sum(given) > 1:
            raise cellkit.DataError("Pass one of column=..., query=... or selection=..., not several.")
        if query is not None:
            self.query.value = str(query)
            self.cell_mode.value = "query"
        elif selection is not None:
            if selection not in self.state.selections:
                raise cellkit.DataError(
                    f"No selection named {selection!r}; known: {sorted(self.state.selections) or 'none'}."
                )
            self.selection.value = selection
            self.cell_mode.value = "selection"
        elif column is not None:
            adata = self._require_adata()
            if column not in adata.obs.columns:
                raise cellkit.DataError(
                    f"{column!r} is not an obs column; available: {list(adata.obs.columns)}."
                )
            self._quiet = True
            try:
                self.filter_column.value = column
                if between is not None:
                    lo, hi = between
                    self.filter_min.value, self.filter_max.value = float(lo), float(hi)
                elif values is not None:
                    vals = [values] if isinstance(values, str) else [str(v) for v in values]
                    known = set(self.filter_values.options)
                    unknown = [v for v in vals if v not in known]
                    if unknown:
                        raise cellkit.DataError(
                            f"{unknown[:5]} are not values of obs[{column!r}]; values: {sorted(known)[:20]}."
                        )
                    self.filter_values.value = tuple(vals)
            finally:
                self._quiet = False
            self.cell_mode.value = "filter"
        else:
            self.cell_mode.value = "all"
        self._push_cells()
        self._update_count()
        cells = self.selected_cells()
        return self.state.adata.n_obs if cells is None else len(cells)

    def selected_cells(self) -> np.ndarray | None:
        """Obs names of the chosen cells (``adata`` order), or ``None`` for all cells.

        Raises
        ------
        cellkit.DataError
            No data, a query that does not parse, an unknown selection, or an empty choice.
        """
        import cellkit

        adata = self._require_adata()
        mode = self.cell_mode.value
        obs = adata.obs
        if mode == "all":
            return None
        if mode == "filter":
            column = self.filter_column.value
            if not column:
                raise cellkit.DataError("Pick an obs column to filter on.")
            series = obs[column]
            if _is_categorical(series):
                values = list(self.filter_values.value)
                if not values:
                    raise cellkit.DataError(f"Pick at least one value of {column!r}.")
                mask = series.astype(str).isin(values).to_numpy()
                what = f"{column} in {values[:5]}"
            else:
                lo, hi = float(self.filter_min.value), float(self.filter_max.value)
                if lo > hi:
                    raise cellkit.DataError(f"The range of {column!r} is empty: min {lo:g} > max {hi:g}.")
                mask = ((series >= lo) & (series <= hi)).fillna(value=False).to_numpy(dtype=bool)
                what = f"{lo:g} ≤ {column} ≤ {hi:g}"
            if not mask.any():
                raise cellkit.DataError(f"No cell has {what}; the selection is empty.")
            return np.asarray(obs.index[mask]).astype(str)
        if mode == "query":
            text = self.query.value.strip()
            if not text:
                raise cellkit.DataError(
                    "Enter an obs query, e.g. bulk_labels == 'CD14+ Monocyte'.", param="cells"
                )
            rows = cellkit.select_cells(obs, text, order="sorted")
            if not len(rows):
                raise cellkit.DataError(
                    f"No cell matches the query {text!r}; the selection is empty.", param="cells"
                )
            return np.asarray(obs.index[rows]).astype(str)
        name = self.selection.value
        if not name:
            raise cellkit.DataError(
                "No named selection yet: lasso cells in the embedding panel or save a filter as a selection."
            )
        names = self.state.resolve_cells(name)
        if len(names) == 0:
            raise cellkit.DataError(f"Selection {name!r} is empty.")
        return names

    @guarded
    def save_selection(self, name: str | None = None) -> np.ndarray | None:
        """Store the chosen cells as a named selection of the studio (and make it the active one).

        Any choice can be saved, "All cells" included (a named snapshot of every cell).
        """
        import cellkit

        name = (self.save_name.value if name is None else name).strip()
        cells = self.selected_cells()
        if not name:
            raise cellkit.DataError("Give the selection a name (the box next to “Save selection”).")
        if name == DATA_FILTER:
            raise cellkit.DataError(f"{name!r} is the name of the live filter; choose another name.")
        if cells is None:  # a named snapshot of every cell, e.g. to come back to later
            cells = np.asarray(self.state.adata.obs_names).astype(str)
        names = self.state.add_selection(name, cells)
        self.show_message(f"Saved selection {name!r}: {len(names):,} cells.", "ok")
        return names

    def _require_adata(self) -> Any:
        import cellkit

        if self.state.adata is None:
            raise cellkit.DataError(
                "No data loaded: pick an AnnData variable, open an .h5ad file or click “Demo PBMCs”."
            )
        return self.state.adata

    def _update_count(self) -> None:
        mode = self.cell_mode.value
        self._filter_box.layout.display = "" if mode == "filter" else "none"
        self._query_box.layout.display = "" if mode == "query" else "none"
        self._selection_box.layout.display = "" if mode == "selection" else "none"
        adata = self.state.adata
        if adata is None:
            self.cell_count.value = ""
            return
        self._cells_error.value = ""
        try:
            cells = self.selected_cells()
        except Exception as exc:  # beside the control that caused it, else on the count line
            placed = self.place_error(exc)
            self.cell_count.value = (
                "No cells selected" if placed else f"<span style='color:#8b0000'>{_esc(exc)}</span>"
            )
            return
        n = adata.n_obs if cells is None else len(cells)
        self.cell_count.value = f"<b>{n:,}</b> of {adata.n_obs:,} cells selected"

    def _on_cell_widgets(self, _change: Any = None) -> None:
        if not self._quiet:
            self._push_cells()
            self._update_count()

    def _push_cells(self) -> None:
        """The chooser decides which cells every panel uses: write the choice to the studio state.

        "All cells" releases the active selection; "Selection" activates the chosen one; a valid
        filter or query becomes the active selection :data:`DATA_FILTER`. An invalid or
        unfinished filter changes nothing (the count line says why).
        """
        state, mode = self.state, self.cell_mode.value
        if state.adata is None or self._pushing:
            return
        self._pushing = True
        try:
            if mode == "all":
                state.use_all_cells()
            elif mode == "selection":
                if self.selection.value in state.selections:
                    state.active_selection = self.selection.value
            else:
                try:
                    cells = self.selected_cells()
                except Exception:  # shown by the count line
                    return
                state.add_selection(DATA_FILTER, cells)
        finally:
            self._pushing = False

    def _on_filter_column(self, _change: Any = None) -> None:
        adata, column = self.state.adata, self.filter_column.value
        quiet, self._quiet = self._quiet, True
        try:
            self.filter_values.value = ()
            if adata is None or not column:
                self.filter_values.options = []
                self._filter_box.children = (self._column_row,)
            elif _is_categorical(adata.obs[column]):
                values = sorted(map(str, adata.obs[column].dropna().unique()))
                self.filter_values.options = values[:MAX_FILTER_VALUES]
                self._filter_box.children = (self._column_row, self._values_row)
            else:
                finite = adata.obs[column].dropna()
                self.filter_min.value = float(finite.min()) if len(finite) else 0.0
                self.filter_max.value = float(finite.max()) if len(finite) else 0.0
                self._filter_box.children = (self._column_row, self._range_row)
        finally:
            self._quiet = quiet
        self._on_cell_widgets()

    def _on_selections(self, _change: Any = None) -> None:
        names = sorted(self.state.selections)
        current = self.selection.value
        quiet, self._quiet = self._quiet, True
        try:
            self.selection.options = [(f"{n} ({len(self.state.selections[n]):,} cells)", n) for n in names]
            if current in names:
                self.selection.value = current
        finally:
            self._quiet = quiet
        self._update_count()

    def _on_active_selection(self, _change: Any = None) -> None:
        """The state's choice (a lasso saved elsewhere, the cells bar's "All cells") → the chooser."""
        name = self.state.active_selection
        if not self._pushing:
            self._quiet = True
            try:
                if not name:
                    self.cell_mode.value = "all"
                elif name in self.state.selections and not (
                    name == DATA_FILTER and self.cell_mode.value in ("filter", "query")
                ):
                    self.selection.value = name
                    self.cell_mode.value = "selection"
            finally:
                self._quiet = False
        self._update_count()

    # ================================================================== tokenizer options
    def _build_options(self) -> None:
        """(Re)create one widget per option of the chosen scheme, defaults from the scheme and model."""
        old = {name: w.value for name, w in self.option_widgets.items()}
        old_scheme = getattr(self, "_built_scheme", None)
        scheme = self.scheme.value
        specs = SCHEME_OPTIONS.get(scheme, ())
        defaults = self._defaults(scheme)
        self._option_specs = {s.name: s for s in specs}
        self.option_widgets = {}
        rows = []
        for spec in specs:
            w = self._make_option_widget(spec, defaults.get(spec.name))
            if old_scheme == scheme and spec.name in old:
                with contextlib.suppress(Exception):  # e.g. a column of the old data that is gone
                    w.value = old[spec.name]
            self.option_widgets[spec.name] = w
            rows.append(_option_row(spec, w))
        self._built_scheme = scheme
        self.options_box.children = rows

    def _defaults(self, scheme: str) -> dict[str, Any]:
        """Scheme defaults, then the model's input conventions, then the demo's options."""
        import cellkit.datasets

        defaults = _scheme_defaults(scheme)
        model = self.state.model
        if model is not None:
            conventions = model.config.input.preprocessing_options()
            defaults.update({k: v for k, v in conventions.items() if k in defaults})
            if self.state.has_demo_model():
                defaults.update(
                    {k: v for k, v in cellkit.datasets.DEMO_TOKENIZE_OPTIONS.items() if k in defaults}
                )
        return defaults

    def _make_option_widget(self, spec: OptionSpec, default: Any) -> widgets.Widget:
        adata = self.state.adata
        kind = spec.kind
        wide = widgets.Layout(width="260px")
        if kind == "bool":
            w = widgets.Checkbox(value=bool(default), indent=False)
        elif kind == "int":
            w = widgets.IntText(value=int(default or 0), layout=wide)
        elif kind == "float":
            w = widgets.FloatText(value=float(default or 0.0), layout=wide)
        elif kind == "text":
            w = widgets.Text(value="" if default is None else str(default), layout=wide)
        elif kind in ("opt_int", "opt_float"):
            # the box says what blank means; the tooltip says what the option does
            placeholder = (
                "blank: " + spec.help.split("blank: ")[-1].rstrip(")") if "blank: " in spec.help else ""
            )
            model = self.state.model
            if spec.name == "n_bins" and model is not None and model.config.input.n_bins:
                placeholder = f"blank: the model's ({model.config.input.n_bins})"
            w = widgets.Text(
                value="" if default is None else f"{default:g}", placeholder=placeholder, layout=wide
            )
        elif kind == "choice":
            choices = [(label, _NONE if v is None else v) for label, v in spec.choices]
            values = [v for _, v in choices]
            default = _NONE if default is None else default
            w = widgets.Dropdown(options=choices, value=default if default in values else values[0])
        elif kind == "obs_column":
            cols = list(adata.obs.columns) if adata is not None else []
            w = widgets.Dropdown(options=[("none", _NONE), *[(c, c) for c in cols]], value=_NONE)
        elif kind == "obs_columns":
            cols = list(adata.obs.columns) if adata is not None else []
            w = widgets.SelectMultiple(options=cols, value=(), rows=min(6, max(2, len(cols))), layout=wide)
        elif kind == "var_mask":
            w = widgets.Dropdown(
                options=[("all genes", _NONE), *[(c, c) for c in self._bool_var_columns()]], value=_NONE
            )
        else:  # pragma: no cover - a spec kind without a widget is a bug
            raise ValueError(f"unknown option kind {kind!r}")
        w.tooltip = _option_tooltip(spec)
        return w

    def _bool_var_columns(self) -> list[str]:
        adata = self.state.adata
        if adata is None:
            return []
        choice = self.matrix.value
        model = self.state.model
        use_raw = choice == "raw" or (
            choice == "auto" and model is not None and bool(model.config.input.use_raw)
        )
        var = adata.raw.var if use_raw and adata.raw is not None else adata.var
        return [c for c in var.columns if var[c].dtype == bool]

    def options(self) -> dict[str, Any]:
        """The scheme options the widgets hold, as :func:`cellkit.tokenize` keywords.

        Raises
        ------
        cellkit.ConfigError
            A number box that does not hold a number.
        """
        import cellkit

        out: dict[str, Any] = {}
        for name, w in self.option_widgets.items():
            spec = self._option_specs[name]
            value = None if w.value == _NONE else w.value
            if spec.kind in ("opt_int", "opt_float"):
                text = str(value).strip()
                if not text or text.lower() == "none":
                    value = None
                else:
                    try:
                        number = float(text)
                    except ValueError:
                        raise cellkit.ConfigError(
                            f"{name} must be a number (or blank for {spec.help.split('blank: ')[-1].rstrip(')')}), "
                            f"not {text!r}."
                        ) from None
                    if spec.kind == "opt_int":
                        if number != int(number):
                            raise cellkit.ConfigError(f"{name} must be a whole number, not {text!r}.")
                        value = int(number)
                    else:
                        value = number
            elif spec.kind == "obs_columns":
                value = tuple(value)
            elif spec.kind == "text":
                value = str(value)
            out[name] = value
        return out

    def _matrix_kwargs(self) -> dict[str, Any]:
        """``use_raw`` / ``layer`` / ``gene_column`` for :func:`cellkit.tokenize` from the widgets."""
        kwargs: dict[str, Any] = {}
        choice = self.matrix.value
        if choice == "X":
            kwargs["use_raw"] = False
        elif choice == "raw":
            kwargs["use_raw"] = True
        elif isinstance(choice, str) and choice.startswith("layer:"):
            kwargs["use_raw"] = False
            kwargs["layer"] = choice.removeprefix("layer:")
        if self.gene_column.value not in (None, _NONE):
            kwargs["gene_column"] = self.gene_column.value
        return kwargs

    def _refresh_matrix_choices(self) -> None:
        adata, model = self.state.adata, self.state.model
        default = "model default"
        if model is not None:
            default += " (.raw)" if model.config.input.use_raw else " (.X)"
        opts: list[tuple[str, Any]] = [(default, "auto"), (".X", "X")]
        cols: list[str] = []
        if adata is not None:
            frames = [adata.var]
            if adata.raw is not None:
                opts.append((".raw", "raw"))
                frames.append(adata.raw.var)
            opts += [(f"layer {k}", f"layer:{k}") for k in adata.layers]
            cols = list(dict.fromkeys(c for var in frames for c in var.columns if _is_text(var[c])))
        current_m, current_g = self.matrix.value, self.gene_column.value
        self.matrix.options = opts
        self.matrix.value = current_m if current_m in [v for _, v in opts] else "auto"
        self.gene_column.options = [("var_names (the row names)", _NONE), *[(c, c) for c in cols]]
        self.gene_column.value = current_g if current_g in cols else _NONE

    # ================================================================== tokenize
    @guarded
    def tokenize(self, background: bool = False) -> Any:
        """Tokenize the chosen cells for the current model and store them in ``state.tokens``.

        A progress bar with an estimate follows the tokenizer; Cancel stops it at its next block of
        cells (``state.tokens`` is then unchanged).

        Parameters
        ----------
        background
            Tokenize in a background thread (the button does; :meth:`wait` joins it).

        Returns
        -------
        The :class:`cellkit.TokenizedCells` (``None`` in the background, on error or when
        cancelled; ``state.tokens`` is then unchanged).
        """
        import cellkit

        model = self.state.model
        if model is None:
            raise cellkit.DataError("No model loaded: load one in the Model panel (or its demo model) first.")
        adata = self._require_adata()
        cells = self.selected_cells()
        options = self.options()
        kwargs = self._matrix_kwargs()
        if self.scheme.value != model.config.family:
            kwargs["scheme"] = self.scheme.value
        n = adata.n_obs if cells is None else len(cells)
        self.show_message(f"Tokenizing {n:,} cells …", "info")

        # the coverage report comes first (on at most COVERAGE_CELLS of the chosen cells): what the model
        # will not see is shown here, not as a warning lost in the kernel's log
        names = adata.obs_names if cells is None else cells
        sample = None if len(names) <= COVERAGE_CELLS else np.asarray(names[:COVERAGE_CELLS])
        report_kwargs = {**kwargs, "scheme": self.scheme.value, **options}

        reports: list[Any] = []

        def work(progress: Any) -> Any:
            reports.append(
                cellkit.genes.coverage_report(
                    adata, model, cells=cells if sample is None else sample, **report_kwargs
                )
            )
            return cellkit.tokenize(
                adata, model, cells=cells, progress=progress, unseen_warning=None, **kwargs, **options
            )

        def done(tokens: Any) -> None:
            report = reports[-1]
            self.state.tokens = tokens
            self.coverage_report = report
            self.coverage_html.value = report._repr_html_()
            text = f"Tokenized {len(tokens):,} cells ({tokens.n_tokens:,} tokens) → state.tokens."
            if report.unseen_share > UNSEEN_WARNING:
                self.show_message(
                    f"{text} {report.unseen_share:.1%} of the expression is on genes the model will not "
                    "see (below): check the gene column, species and matching options.",
                    "warning",
                )
            else:
                self.show_message(text, "ok")

        return self.progress.run(
            self, work, name="Tokenize", buttons=(self.tokenize_button,), on_done=done, background=background
        )

    @guarded
    def check_genes(self) -> Any:
        """Show :func:`cellkit.genes.coverage_report` for the chosen cells, matrix and options.

        Before anything is tokenized: how many genes each matching rule found, how many the model
        drops, and the share of the expression (summed over the chosen cells) on genes it will
        not see, with the most-expressed of them.

        Returns
        -------
        The :class:`cellkit.genes.CoverageReport` (``None`` on error; the message says why).
        """
        import cellkit

        model = self.state.model
        if model is None:
            raise cellkit.DataError("No model loaded: load one in the Model panel (or its demo model) first.")
        adata = self._require_adata()
        kwargs = self._matrix_kwargs()
        kwargs["scheme"] = self.scheme.value
        report = cellkit.genes.coverage_report(
            adata, model, cells=self.selected_cells(), **kwargs, **self.options()
        )
        self.coverage_report = report
        self.coverage_html.value = report._repr_html_()
        return report

    def _make_hist(self) -> Any:
        import plotly.graph_objects as go

        import cellkit.viz

        fig = go.FigureWidget(cellkit.viz.token_length_histogram([]).update_layout(width=560))
        fig.add_class("cellkit-length-hist")
        return fig

    def _draw_lengths(self, lengths: Any, max_length: int | None) -> None:
        import cellkit.viz

        fig = cellkit.viz.token_length_histogram(lengths, max_length=max_length).update_layout(width=560)
        cellkit.viz.draw_into(self.length_hist, fig)

    def _show_tokens(self, tokens: Any) -> None:
        if tokens is None:
            self.result_html.value = ""
            self._draw_lengths([], None)
            self._hist_box.layout.display = "none"
            return
        parts = [
            f"<pre style='white-space:pre-wrap;font-size:12px;margin:4px 0'>{_esc(tokens.summary())}</pre>"
        ]
        cov = tokens.coverage
        if cov is not None:
            color = "#1b5e20" if cov.fraction >= 0.5 else "#6d4c00"
            parts.append(
                f"<div class='cellkit-coverage' style='color:{color}'>Coverage: {cov.n_matched:,} of "
                f"{cov.n_genes:,} genes in the vocabulary ({cov.fraction:.1%})"
                + (
                    f"; not found, e.g. {_esc(', '.join(cov.unmatched_examples[:5]))}"
                    if cov.unmatched_examples
                    else ""
                )
                + "</div>"
            )
        self.result_html.value = "".join(parts)
        self._draw_lengths(tokens.lengths, getattr(tokens, "max_length", None))
        self._hist_box.layout.display = ""

    # ================================================================== state observers
    def _on_obs_changed(self, _change: Any = None) -> None:
        """New obs columns (predictions, scores): list them, keep the current choice."""
        adata = self.state.adata
        if adata is None:
            return
        cols = list(adata.obs.columns)
        if cols == list(self.filter_column.options):
            return
        current = self.filter_column.value
        self._quiet = True
        try:
            self.filter_column.options = cols
            self.filter_column.value = current if current in cols else (cols[0] if cols else None)
        finally:
            self._quiet = False
        self.data_html.value = self._data_info_html()

    def _on_adata(self, _change: Any = None) -> None:
        adata = self.state.adata
        self.data_html.value = self._data_info_html()
        self._quiet = True
        try:
            cols = list(adata.obs.columns) if adata is not None else []
            self.filter_column.options = cols
            self.filter_column.value = cols[0] if cols else None
            self.query.value = ""
            self.cell_mode.value = "all"
        finally:
            self._quiet = False
        self._on_filter_column()
        self._refresh_matrix_choices()
        self._build_options()
        self._update_count()

    def _on_model(self, _change: Any = None) -> None:
        model = self.state.model
        family = model.config.family if model is not None else None
        self._refresh_matrix_choices()
        scheme = family if family in SCHEMES else "scgpt"
        self._built_scheme = None  # new model: its conventions become the defaults
        if self.scheme.value != scheme:
            self.scheme.value = scheme  # rebuilds the options through the observer
        else:
            self._build_options()

    def _clear_report(self, _change: Any = None) -> None:
        self.coverage_report = None
        self.coverage_html.value = ""

    def _on_tokens(self, _change: Any = None) -> None:
        self._show_tokens(self.state.tokens)
