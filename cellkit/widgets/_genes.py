"""Gene explorer: gene embeddings, similar genes, a similarity network, gene programs and their scores.

A thin view over :mod:`cellkit.analysis` (``gene_embeddings``, ``contextual_gene_embeddings``,
``similar_genes``, ``gene_similarity``, ``gene_programs``, ``score_programs``) and
:mod:`cellkit.viz` (``gene_network``, ``program_heatmap``). The context-free token embeddings
are computed as soon as a model is loaded (milliseconds); contextual embeddings cost a pass over
the cells, so they run behind a button (in a background thread).
"""

from __future__ import annotations

import difflib
import html
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

import cellkit
from cellkit import ConfigError, DataError, UnknownGeneError

from ._base import Panel, guarded, html_table, labelled
from ._progress import JobProgress
from ._state import StudioState

__all__ = ["GenePanel"]

KINDS = {"token": "token embeddings (context-free)", "contextual": "contextual (averaged over cells)"}
#: contextual embeddings use at most this many cells by default (a random subsample, seed 0)
DEFAULT_MAX_CELLS = 5_000
#: genes listed per program in the programs table
_SHOW_GENES = 15


class GenePanel(Panel):
    """Gene embeddings: similar genes, a similarity network, gene programs and their scores.

    Parameters
    ----------
    state
        The shared :class:`~cellkit.widgets.StudioState` (a fresh one when used alone).

    Attributes
    ----------
    embeddings
        The current gene embeddings (``DataFrame`` genes × dims) or ``None``.
    kind
        ``"token"`` or ``"contextual"``: where :attr:`embeddings` came from.
    table
        The last similar-genes table (columns ``query``, ``rank``, ``gene``, ``similarity``).
    programs
        ``{program: [genes]}`` from :meth:`find_programs` (``{}`` before).
    bar_figure, network_figure, heatmap_figure
        ``FigureWidget`` s (CSS classes ``cellkit-similar-genes``, ``cellkit-gene-network``,
        ``cellkit-program-heatmap``).

    Examples
    --------
    >>> panel = GenePanel(StudioState(adata=adata, model=model))  # doctest: +SKIP
    >>> panel.search("CD3E", k=10); panel.find_programs(resolution=10)  # doctest: +SKIP
    >>> panel.score_programs(groupby="bulk_labels")  # doctest: +SKIP
    """

    title = "Genes"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-gene-panel")
        self.embeddings: pd.DataFrame | None = None
        self.kind = ""
        self.table: pd.DataFrame | None = None
        self.query = ""
        self.programs: dict[str, list[str]] = {}
        self._syncing = False

        # -- embeddings
        self.kind_dropdown = widgets.Dropdown(
            options=[(label, key) for key, label in KINDS.items()],
            value="token",
            layout=widgets.Layout(width="260px"),
        )
        self.kind_dropdown.observe(self._on_kind_widget, names="value")
        self.max_cells_box = widgets.BoundedIntText(
            value=DEFAULT_MAX_CELLS, min=1, max=10**9, step=1000, layout=widgets.Layout(width="110px")
        )
        self.compute_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Compute gene embeddings",
            icon="play",
            button_style="primary",
            tooltip="contextual: a pass of the model over the cells (the active selection, if any)",
        )
        self.compute_button.on_click(
            lambda _b: self.compute_embeddings(self.kind_dropdown.value, background=True)
        )
        self.status = widgets.HTML(value="")
        self.status.add_class("cellkit-gene-status")
        #: progress bar, estimate and Cancel of the contextual gene embeddings
        self.jobs = JobProgress(css_prefix="cellkit-gene-job")

        # -- search
        self.gene_box = widgets.Combobox(
            options=[], placeholder="gene", ensure_option=False, layout=widgets.Layout(width="180px")
        )
        self.k_box = widgets.BoundedIntText(value=20, min=1, max=500, layout=widgets.Layout(width="80px"))
        self.center_box = widgets.Checkbox(
            value=False,
            description="centre (subtract the mean gene vector)",
            indent=False,
            layout=widgets.Layout(width="max-content"),
        )
        self.search_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Find similar genes", icon="search"
        )
        self.search_button.on_click(lambda _b: self.search(self.gene_box.value, k=self.k_box.value))
        self.table_html = widgets.HTML(value="")
        self.table_html.add_class("cellkit-similar-table")
        self.bar_figure = go.FigureWidget(cellkit.viz.similar_genes_bar(None))
        self.bar_figure.add_class("cellkit-similar-genes")

        # -- network
        self.threshold_slider = widgets.FloatSlider(
            value=0.5,
            min=-1.0,
            max=1.0,
            step=0.01,
            continuous_update=False,
            readout_format=".2f",
            layout=widgets.Layout(width="320px"),
        )
        self.threshold_slider.observe(self._on_threshold, names="value")
        self.network_figure = go.FigureWidget(
            layout={"template": "plotly_white", "height": 420, "title": {"text": "gene similarity network"}}
        )
        self.network_figure.add_class("cellkit-gene-network")

        # -- programs
        self.resolution_box = widgets.BoundedFloatText(
            value=10.0, min=0.01, max=1000.0, step=1.0, layout=widgets.Layout(width="90px")
        )
        self.min_size_box = widgets.BoundedIntText(
            value=5, min=1, max=10_000, layout=widgets.Layout(width="80px")
        )
        self.programs_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Find programs", icon="sitemap"
        )
        self.programs_button.on_click(lambda _b: self.find_programs(resolution=self.resolution_box.value))
        self.programs_html = widgets.HTML(value="")
        self.programs_html.add_class("cellkit-programs")
        self.groupby_dropdown = widgets.Dropdown(options=[], layout=widgets.Layout(width="200px"))
        self.key_box = widgets.Text(value="program", layout=widgets.Layout(width="140px"))
        self.score_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Score programs",
            icon="table",
            tooltip="writes obs[<key>_<program>] per program and uns[<key>] (cellkit.analysis.score_programs)",
        )
        self.score_button.on_click(
            lambda _b: self.score_programs(groupby=self.groupby_dropdown.value, key_added=self.key_box.value)
        )
        self.heatmap_figure = go.FigureWidget(
            layout={"template": "plotly_white", "height": 420, "title": {"text": "program scores per group"}}
        )
        self.heatmap_figure.add_class("cellkit-program-heatmap")
        # the figure gives every program label room (cellkit.viz.program_heatmap sizes it, ~1000 px
        # for 50 programs); wider than the panel it scrolls sideways inside this box
        self.heatmap_box = widgets.Box(
            [self.heatmap_figure], layout=widgets.Layout(max_width="100%", overflow="auto")
        )
        self.heatmap_box.add_class("cellkit-program-heatmap-box")

        # -- export
        self.path_box = widgets.Text(value="similar_genes.csv", layout=widgets.Layout(width="320px"))
        self.export_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Save table (CSV)", icon="download"
        )
        self.export_button.on_click(lambda _b: self.export(self.path_box.value))

        def section(text: str) -> widgets.HTML:
            return widgets.HTML(f"<b style='font-size:13px'>{html.escape(text)}</b>")

        self.children = [
            self.message,
            section("Gene embeddings"),
            widgets.HBox(
                [
                    labelled("Source", self.kind_dropdown, "60px"),
                    labelled("max cells", self.max_cells_box, "70px"),
                    self.compute_button,
                ]
            ),
            self.jobs,
            self.status,
            section("Similar genes"),
            widgets.HBox(
                [
                    labelled("Gene", self.gene_box, "50px"),
                    labelled("top k", self.k_box, "50px"),
                    self.center_box,
                    self.search_button,
                ]
            ),
            widgets.HBox(
                [
                    widgets.Box(
                        [self.table_html],
                        layout=widgets.Layout(width="330px", max_height="420px", overflow="auto"),
                    ),
                    self.bar_figure,
                ]
            ),
            labelled("Edge threshold", self.threshold_slider, "110px"),
            self.network_figure,
            section("Gene programs"),
            widgets.HBox(
                [
                    labelled("Resolution", self.resolution_box, "80px"),
                    labelled("min genes", self.min_size_box, "75px"),
                    self.programs_button,
                ]
            ),
            widgets.Box([self.programs_html], layout=widgets.Layout(max_height="260px", overflow="auto")),
            widgets.HBox(
                [
                    labelled("Group by", self.groupby_dropdown, "70px"),
                    labelled("obs key prefix", self.key_box, "100px"),
                    self.score_button,
                ]
            ),
            self.heatmap_box,
            section("Export"),
            widgets.HBox([labelled("CSV path", self.path_box, "70px"), self.export_button]),
        ]
        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_busy, names="busy")
        self.state.observe(lambda _c: self._refresh_groupby(), names="obs_version")
        self._on_adata(None)
        self._on_model(None)

    # ------------------------------------------------------------------ public actions

    @guarded
    def compute_embeddings(self, kind: str = "token", *, background: bool = False) -> pd.DataFrame | None:
        """Compute the gene embeddings the panel searches.

        Parameters
        ----------
        kind
            ``"token"``: the model's context-free gene-token embeddings (instant);
            ``"contextual"``: each gene's output state averaged over the cells (the active
            selection, if any; at most "max cells", a random subsample) — one pass of the model.
        background
            Run in a background thread (the button does; :meth:`wait` joins it). While it runs
            :attr:`jobs` shows the progress and the compute button is disabled; its Cancel stops
            the pass.

        Returns
        -------
        The embeddings (``None`` on error, when cancelled or when running in the background).
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}.")
        model = self._need_model()
        if kind == "token":
            emb = cellkit.analysis.gene_embeddings(model)
            self._set_embeddings(emb, "token", "")
            return emb
        adata = self._need_data()
        cells, where = self._contextual_cells(adata)

        def work(progress: cellkit.Progress) -> pd.DataFrame:
            self.show_message(f"Contextual gene embeddings over {where} …", "info")
            return cellkit.analysis.contextual_gene_embeddings(adata, model, cells=cells, progress=progress)

        def done(emb: pd.DataFrame) -> None:
            self._set_embeddings(emb, "contextual", where)

        return self.jobs.run(
            self,
            work,
            name="Contextual gene embeddings",
            buttons=[self.compute_button],
            on_done=done,
            background=background,
        )

    @guarded
    def search(self, gene: str, k: int = 20, *, center: bool | None = None) -> pd.DataFrame:
        """The ``k`` genes most similar to ``gene``: a table, a bar chart and a network.

        Parameters
        ----------
        gene
            A gene of the embeddings (the model's vocabulary for token embeddings).
        k
            How many similar genes.
        center
            Subtract the mean gene vector first (default: the checkbox; on for contextual
            embeddings, whose genes share one dominant direction).

        Returns
        -------
        ``DataFrame`` with columns ``query``, ``rank``, ``gene``, ``similarity``.
        """
        emb = self._need_embeddings()
        gene = self._check_gene(str(gene or "").strip(), emb)
        k = int(k)
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        k = min(k, len(emb) - 1)
        center = self.center_box.value if center is None else bool(center)
        found = cellkit.analysis.similar_genes(emb, gene, k=k, center=center)
        table = pd.DataFrame(
            {
                "query": gene,
                "rank": np.arange(1, len(found) + 1),
                "gene": found["gene"].astype(str).to_numpy(),
                "similarity": found["similarity"].to_numpy(np.float64),
            }
        )
        self.table, self.query = table, gene
        self._syncing = True
        try:
            self.gene_box.value = gene
            self.k_box.value = max(self.k_box.min, min(k, self.k_box.max))
            self.center_box.value = center
        finally:
            self._syncing = False
        self.table_html.value = html_table(
            table[["rank", "gene", "similarity"]].set_index("rank"), max_rows=500
        )
        cellkit.viz.draw_into(self.bar_figure, cellkit.viz.similar_genes_bar(table, gene=gene))
        self._auto_threshold()
        self._draw_network()
        top = ", ".join(
            f"{g} {s:.2f}" for g, s in zip(table["gene"][:5], table["similarity"][:5], strict=True)
        )
        text = f"Top {len(table)} genes similar to {gene} ({self.kind} embeddings{', centred' if center else ''}): {top}"
        prog = self._program_of().get(gene)
        if prog:
            text += f". {gene} is in program {prog} ({len(self.programs[prog])} genes)"
        self.show_message(text + ".", "ok")
        return table

    @guarded
    def draw_network(self, threshold: float | None = None) -> go.FigureWidget:
        """Redraw the network of the searched gene and its neighbours at ``threshold`` (cosine)."""
        if threshold is not None:
            threshold = float(threshold)
            if not -1.0 <= threshold <= 1.0:
                raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {threshold}.")
            self._syncing = True
            try:
                self.threshold_slider.value = threshold
            finally:
                self._syncing = False
        self._draw_network()
        return self.network_figure

    @guarded
    def find_programs(
        self, resolution: float | None = None, *, min_size: int | None = None
    ) -> dict[str, list[str]]:
        """Gene programs: Leiden clusters of the genes' kNN graph (``cellkit.analysis.gene_programs``).

        Higher ``resolution`` gives more, smaller programs; ``min_size`` drops smaller ones.
        """
        emb = self._need_embeddings()
        resolution = float(self.resolution_box.value if resolution is None else resolution)
        min_size = int(self.min_size_box.value if min_size is None else min_size)
        if resolution <= 0:
            raise ConfigError(f"resolution must be positive, got {resolution}.")
        if min_size < 1:
            raise ConfigError(f"min_size must be at least 1, got {min_size}.")
        programs = cellkit.analysis.gene_programs(emb, resolution=resolution, min_size=min_size)
        self.programs = programs
        self._syncing = True
        try:
            self.resolution_box.value = resolution
            self.min_size_box.value = min_size
        finally:
            self._syncing = False
        if not programs:
            self.programs_html.value = ""
            self.show_message(
                f"No program with at least {min_size} genes at resolution {resolution:g}: lower the "
                "resolution (fewer, larger programs) or min genes.",
                "warning",
            )
            return programs
        frame = pd.DataFrame(
            {
                "program": list(programs),
                "genes": [len(g) for g in programs.values()],
                "members": [
                    ", ".join(g[:_SHOW_GENES]) + (" …" if len(g) > _SHOW_GENES else "")
                    for g in programs.values()
                ],
            }
        ).set_index("program")
        self.programs_html.value = html_table(frame, max_rows=1000)
        if self.query:
            self._draw_network()
        n_genes = sum(len(g) for g in programs.values())
        self.show_message(
            f"{len(programs)} programs ({n_genes} of {len(emb)} genes) at resolution {resolution:g}, "
            f"at least {min_size} genes each. Score them per cell with “Score programs”.",
            "ok",
        )
        return programs

    @guarded
    def score_programs(self, groupby: str | None = None, key_added: str | None = None) -> list[str]:
        """Score every program per cell and show mean scores per ``groupby`` group as a heatmap.

        Writes ``adata.obs[f"{key_added}_{program}"]`` (min-max scaled scores) and
        ``adata.uns[key_added]`` (``cellkit.analysis.score_programs``).

        Returns
        -------
        The obs columns written.
        """
        adata = self._need_data()
        if not self.programs:
            raise DataError("No gene programs yet: press “Find programs” first.")
        key = str(self.key_box.value if key_added is None else key_added).strip()
        if not key:
            raise ConfigError("The obs key prefix is empty; type one, e.g. 'program'.")
        groupby = self.groupby_dropdown.value if groupby is None else groupby
        if not groupby or groupby not in adata.obs.columns:
            cols = _group_columns(adata.obs)
            close = difflib.get_close_matches(str(groupby), cols, n=3)
            raise DataError(
                f"Group by {groupby!r} is not an obs column"
                + (f" (did you mean {close}?)" if close else "")
                + f"; categorical obs columns: {cols[:20]}."
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cellkit.analysis.score_programs(adata, self.programs, key_added=key)
        self.state.obs_changed()
        columns = [f"{key}_{name}" for name in self.programs]
        fig = cellkit.viz.program_heatmap(adata, columns, groupby)
        cellkit.viz.draw_into(self.heatmap_figure, fig)
        self._syncing = True
        try:
            self.key_box.value = key
            self.groupby_dropdown.value = groupby if groupby in self.groupby_dropdown.options else None
        finally:
            self._syncing = False
        shown = columns if len(columns) <= 4 else [*columns[:2], "…", columns[-1]]
        text = (
            f"Wrote {len(columns)} obs columns ({', '.join(shown)}) and adata.uns[{key!r}]; the heatmap shows "
            f"mean scores per {groupby} (each program scaled to 0–1)."
        )
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if notes:
            text += " Note: " + " ".join(notes[:3])
        self.show_message(text, "warning" if notes else "ok")
        return columns

    @guarded
    def export(self, path: str | os.PathLike[str]) -> Path:
        """Save the similar-genes table as CSV, atomically (a temporary file, then ``os.replace``)."""
        if self.table is None:
            raise DataError("Nothing to save yet: search a gene first.")
        text = str(path or "").strip()
        if not text:
            raise ConfigError("Type a file path for the CSV.")
        target = Path(text).expanduser()
        if target.is_dir():
            raise ConfigError(f"{target} is a folder; give a file name, e.g. {target / 'similar_genes.csv'}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                self.table.to_csv(fh, index=False)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.show_message(f"Saved {len(self.table)} rows to {target.resolve()}.", "ok")
        return target

    # ------------------------------------------------------------------ observers

    def _on_model(self, _change: Any) -> None:
        self.embeddings, self.kind, self.table, self.query, self.programs = None, "", None, "", {}
        self._clear_results()
        self.gene_box.options = []
        if self.state.model is None:
            self.status.value = _status("No model loaded: load one in the Model panel.")
            return
        try:  # token embeddings are instant: have them ready for a search
            self._set_embeddings(cellkit.analysis.gene_embeddings(self.state.model), "token", "", quiet=True)
        except Exception as exc:
            self.show_error(exc)

    def _on_adata(self, _change: Any) -> None:
        self._refresh_groupby()
        if self.kind == "contextual" and _change is not None:
            # contextual embeddings belong to the old cells
            self._on_model(None)

    def _on_busy(self, change: Any) -> None:
        # a background job (e.g. predict) just ended: it may have added obs columns to group by
        if change["old"] and not change["new"]:
            self._refresh_groupby()

    def _refresh_groupby(self) -> None:
        adata = self.state.adata
        cols = _group_columns(adata.obs) if adata is not None else []
        if tuple(cols) == tuple(self.groupby_dropdown.options):
            return
        current = self.groupby_dropdown.value
        self._syncing = True
        try:
            self.groupby_dropdown.options = cols
            self.groupby_dropdown.value = current if current in cols else (cols[0] if cols else None)
        finally:
            self._syncing = False

    def _on_kind_widget(self, change: Any) -> None:
        if self._syncing:
            return
        self.center_box.value = change["new"] == "contextual"
        if change["new"] == "token" and self.state.model is not None and self.kind != "token":
            self.compute_embeddings("token")

    def _on_threshold(self, _change: Any) -> None:
        if not self._syncing and self.query:
            self.draw_network()

    # ------------------------------------------------------------------ internals

    def _need_model(self) -> Any:
        if self.state.model is None:
            raise DataError("No model loaded: load one in the Model panel first.")
        return self.state.model

    def _need_data(self) -> Any:
        if self.state.adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        return self.state.adata

    def _need_embeddings(self) -> pd.DataFrame:
        if self.embeddings is None:
            self._need_model()
            self._set_embeddings(cellkit.analysis.gene_embeddings(self.state.model), "token", "", quiet=True)
        return self.embeddings

    def _contextual_cells(self, adata: Any) -> tuple[np.ndarray | None, str]:
        names = self.state.selected_cells()
        if names is None:
            pos = np.arange(adata.n_obs)
            where = "all cells"
        else:
            pos = np.sort(adata.obs_names.get_indexer(names))
            where = f"selection “{self.state.active_selection}”"
        if len(pos) == 0:
            raise DataError("The selection is empty; select at least one cell.")
        limit = int(self.max_cells_box.value)
        if len(pos) > limit:
            pos = np.sort(np.random.default_rng(0).choice(pos, size=limit, replace=False))
            where = f"a random {limit:,} cells of {where}"
        else:
            where = f"{len(pos):,} cells ({where})"
        return (None if len(pos) == adata.n_obs else pos), where

    def _check_gene(self, gene: str, emb: pd.DataFrame) -> str:
        if not gene:
            raise DataError("Type a gene name first.")
        if gene in emb.index:
            return gene
        genes = [str(g) for g in emb.index]
        low = gene.lower()
        close = [g for g in genes if g.lower() == low]
        close += sorted(
            (g for g in genes if g.lower().startswith(low) and g not in close), key=lambda g: (len(g), g)
        )
        close = list(dict.fromkeys([*close, *difflib.get_close_matches(gene, genes, n=5)]))
        hint = f" Did you mean {', '.join(close[:8])}?" if close else ""
        raise UnknownGeneError(
            f"Gene {gene!r} is not in the {self.kind or 'token'} gene embeddings ({len(genes):,} genes).{hint}"
        )

    def _set_embeddings(self, emb: pd.DataFrame, kind: str, where: str, *, quiet: bool = False) -> None:
        self.embeddings, self.kind, self.programs = emb, kind, {}
        self.table = None
        self._clear_results()
        self._syncing = True
        try:
            self.kind_dropdown.value = kind
            self.center_box.value = kind == "contextual"
        finally:
            self._syncing = False
        self.gene_box.options = [str(g) for g in emb.index]
        desc = f"{KINDS[kind]}: {emb.shape[0]:,} genes × {emb.shape[1]} dims"
        if where:
            desc += f", from {where}"
        self.status.value = _status(desc)
        query = self.query
        self.query = ""
        if not quiet:
            self.show_message(f"Gene embeddings ready — {desc}.", "ok")
        if query and query in emb.index:  # keep the searched gene in view
            self.search(query, k=int(self.k_box.value))
            if not quiet and self.last_error is None:
                self.show_message(f"Gene embeddings ready — {desc}. {self.message_text}", "ok")

    def _clear_results(self) -> None:
        self.table_html.value = ""
        self.programs_html.value = ""
        with self.bar_figure.batch_update():
            self.bar_figure.data[0].x, self.bar_figure.data[0].y = [], []
            self.bar_figure.layout.title.text = "similar genes"
        with self.network_figure.batch_update():
            self.network_figure.data = ()
            self.network_figure.layout.annotations = ()

    def _program_of(self) -> dict[str, str]:
        return {g: name for name, genes in self.programs.items() for g in genes}

    def _neighbourhood(self) -> list[str]:
        return [self.query, *[g for g in self.table["gene"] if g != self.query]]

    def _auto_threshold(self) -> None:
        """Set the slider so that about a third of the gene pairs are drawn as edges."""
        sim = cellkit.analysis.gene_similarity(
            self.embeddings, self._neighbourhood(), center=bool(self.center_box.value)
        ).to_numpy()
        off = sim[np.triu_indices(len(sim), k=1)]
        if len(off):
            self._syncing = True
            try:
                self.threshold_slider.value = float(np.clip(np.round(np.quantile(off, 2 / 3), 2), -1, 1))
            finally:
                self._syncing = False

    def _draw_network(self) -> None:
        if not self.query or self.table is None:
            raise DataError("Search a gene first; the network shows it and its most similar genes.")
        sim = cellkit.analysis.gene_similarity(
            self.embeddings, self._neighbourhood(), center=bool(self.center_box.value)
        )
        programs = self._program_of()
        fig = cellkit.viz.gene_network(
            sim,
            threshold=float(self.threshold_slider.value),
            highlight=self.query,
            programs={g: p for g, p in programs.items() if g in sim.index} if programs else None,
            title=f"{self.query} and its {len(sim) - 1} most similar genes (cosine ≥ {self.threshold_slider.value:.2f})",
        )
        fig.update_layout(height=420)
        cellkit.viz.draw_into(self.network_figure, fig)


def _group_columns(obs: pd.DataFrame) -> list[str]:
    """obs columns to group cells by: categorical / boolean / string columns."""
    out = []
    for c in obs.columns:
        dtype = obs[c].dtype
        if (
            isinstance(dtype, pd.CategoricalDtype)
            or pd.api.types.is_bool_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype)
            or pd.api.types.is_string_dtype(dtype)
        ):
            out.append(str(c))
    return out


def _status(text: str) -> str:
    return f"<span style='color:#555;font-size:12px'>{html.escape(text)}</span>"
