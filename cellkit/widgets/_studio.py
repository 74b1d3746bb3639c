"""The studio: every panel in tabs around one shared :class:`StudioState`."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ._state import StudioState

__all__ = ["Studio"]

#: tab order: (attribute name, panel class name in cellkit.widgets)
PANELS: tuple[tuple[str, str], ...] = (
    ("model_panel", "ModelPanel"),
    ("data_panel", "DataPanel"),
    ("finetune_panel", "FinetunePanel"),
    ("embedding_panel", "EmbeddingPanel"),
    ("gene_panel", "GenePanel"),
    ("attention_panel", "AttentionPanel"),
    ("insilico_panel", "InSilicoPanel"),
    ("response_panel", "PerturbationResponsePanel"),
)


class Studio(widgets.VBox):
    """Point-and-click front end of cellkit: load, tokenize, fine-tune, explore.

    Parameters
    ----------
    adata
        An AnnData to start with (optional; the Data tab can pick one later).
    model
        A loaded :class:`cellkit.CellModel`, a checkpoint directory, or ``"demo"`` for the shipped
        demo model (optional; the Model tab can load one later).
    adata_name
        How to refer to ``adata`` in messages (default ``"adata"``).
    state
        Share an existing :class:`StudioState` (e.g. with panels shown elsewhere).

    Attributes
    ----------
    state
        The shared state: ``studio.state.model``, ``.adata``, ``.tokens``, ``.selections``,
        ``.active_selection``, ``.finetune_result``.
    header, cells_bar, all_cells_button
        The title line (model, data, tokens, running job) and, below it on every tab, the cells
        bar: which cells every action uses (``state.cells_note()``) and an "All cells" button
        (:meth:`use_all_cells`). The Data tab chooses the cells; "Clear selection" in the
        Embeddings tab also releases the active selection.
    model_panel, data_panel, finetune_panel, embedding_panel, gene_panel, attention_panel, insilico_panel, response_panel
        The panels (each also usable alone): ``insilico_panel`` perturbs genes in the model's cells
        (tab "In silico"), ``response_panel`` trains and queries a perturbation-response model
        (tab "Response").

    Examples
    --------
    >>> studio = cellkit.Studio(adata=cellkit.datasets.pbmc_demo(), model="demo")  # doctest: +SKIP
    >>> studio  # doctest: +SKIP
    """

    def __init__(
        self,
        adata: Any = None,
        model: Any = None,
        *,
        adata_name: str = "adata",
        state: StudioState | None = None,
        **kwargs: Any,
    ) -> None:
        from cellkit import ConfigError

        super().__init__(**kwargs)
        self.add_class("cellkit-studio")
        self.state = state if state is not None else StudioState()
        if isinstance(model, str):
            import cellkit

            if model == "demo":
                self.state.set_model(cellkit.datasets.demo_model(), source="demo")
            else:
                self.state.set_model(cellkit.load_model(model), source=model)
        elif model is not None:
            if not hasattr(model, "vocab") or not hasattr(model, "config"):
                raise ConfigError(
                    f"model must be a cellkit.CellModel, a checkpoint directory or 'demo', not {type(model).__name__}."
                )
            self.state.set_model(model, source="memory")
        if adata is not None:
            self.state.set_adata(adata, name=adata_name)

        from cellkit import widgets as _w

        self.panels: dict[str, Any] = {}
        for attr, cls_name in PANELS:
            panel = getattr(_w, cls_name)(self.state)
            setattr(self, attr, panel)
            self.panels[panel.title] = panel
        self.tabs = widgets.Tab(children=list(self.panels.values()))
        for i, title in enumerate(self.panels):
            self.tabs.set_title(i, title)
        self.tabs.add_class("cellkit-tabs")
        self.header = widgets.HTML()
        self.header.add_class("cellkit-studio-title")
        # the cells bar: which cells every action uses, on every tab, and "All cells" in one click
        self.cells_html = widgets.HTML()
        self.cells_html.add_class("cellkit-cells-bar-text")
        self.all_cells_button = widgets.Button(
            description="All cells",
            icon="globe",
            tooltip="release the active selection: every tab uses all cells",
            layout=widgets.Layout(width="auto"),
        )
        self.all_cells_button.add_class("cellkit-all-cells")
        self.all_cells_button.on_click(lambda _b: self.use_all_cells())
        self.cells_bar = widgets.HBox(
            [self.cells_html, self.all_cells_button], layout=widgets.Layout(align_items="center")
        )
        self.cells_bar.add_class("cellkit-cells-bar")
        head = widgets.VBox([self.header, self.cells_bar])
        head.add_class("cellkit-studio-header")
        self.children = [head, self.tabs]
        self.state.observe(self._refresh_header, names=["model", "adata", "tokens", "busy"])
        self.state.observe(self._refresh_cells, names=["adata", "active_selection", "selections"])
        self._refresh_header()
        self._refresh_cells()

    def use_all_cells(self) -> None:
        """Release the active selection (``state.use_all_cells()``): every tab uses all cells again."""
        self.state.use_all_cells()

    def _refresh_cells(self, _change: Any = None) -> None:
        s = self.state
        note = s.cells_note()
        if s.adata is not None and s.active_selection:
            note += " · choose cells in the Data tab"
        self.cells_html.value = f"<div style='font-size:13px'>{note}</div>"
        self.all_cells_button.disabled = s.adata is None or not s.active_selection

    def _refresh_header(self, _change: Any = None) -> None:
        s = self.state
        model = "no model"
        if s.model is not None:
            family = s.model.config.family or "cellkit"
            model = f"{family} model ({s.model_source or 'memory'}), {len(s.model.vocab):,} genes"
        data = "no data"
        if s.adata is not None:
            data = f"{s.adata_name}: {s.adata.n_obs:,} cells × {s.adata.n_vars:,} genes"
        parts = [model, data]
        if s.tokens is not None:
            parts.append(f"{len(s.tokens):,} cells tokenized")
        if s.busy:
            parts.append(f"running: {s.busy}")
        self.header.value = (
            "<div style='font-size:13px;padding:2px 0'><b>cellkit studio</b> — "
            + " · ".join(html.escape(p) for p in parts)
            + "</div>"
        )

    def select_tab(self, title: str) -> None:
        """Switch to the tab called ``title`` (e.g. ``"Fine-tune"``)."""
        from cellkit import ConfigError

        titles = list(self.panels)
        if title not in titles:
            raise ConfigError(f"No tab {title!r}; tabs: {titles}.")
        self.tabs.selected_index = titles.index(title)
