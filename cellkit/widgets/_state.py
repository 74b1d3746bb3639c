"""The studio's shared state: one object every panel reads and writes.

A panel never talks to another panel; it sets a trait here (a newly loaded model, a tokenized
selection, a lasso selection, a fine-tuned model) and every panel that cares observes it. The
state is plain Python (``traitlets``), so tests drive it without a browser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import traitlets

__all__ = ["DATA_FILTER", "StudioState"]

#: name of the selection the Data panel's obs filter / query writes (it becomes the active one)
DATA_FILTER = "data filter"


class StudioState(traitlets.HasTraits):
    """What the studio's panels share.

    Observe the traits below with ``state.observe(fn, names="model")``.

    Attributes
    ----------
    model
        The current :class:`cellkit.CellModel` (or ``None``).
    model_source
        Where it came from: a directory path, ``"demo"`` or ``"memory"``.
    adata
        The current AnnData (in memory or backed).
    adata_name
        How the user refers to it (a kernel variable name or a file path).
    tokens
        The last :class:`cellkit.TokenizedCells` made from ``adata`` with ``model`` (or ``None``).
    selections
        ``{name: obs names}`` — named cell selections (lasso, obs filters); reassigned, never mutated.
    active_selection
        Name of the selection every action on "the cells" uses (``""``: all cells). The Data
        panel's cell chooser and the studio's cells bar set it; :meth:`use_all_cells` releases it.
    finetune_result
        The last :class:`cellkit.FinetuneResult` (or ``None``).
    embedding_key
        ``obsm`` key of the cell embedding shown by the embedding explorer (``""``: none yet).
    busy
        Name of a long task running in the background (``""``: idle).
    obs_version
        Bumped by :meth:`obs_changed` whenever a panel writes ``adata.obs`` columns (predictions,
        program scores, a selection column), so panels listing obs columns refresh.
    """

    model = traitlets.Any(None, allow_none=True)
    model_source = traitlets.Unicode("")
    adata = traitlets.Any(None, allow_none=True)
    adata_name = traitlets.Unicode("")
    tokens = traitlets.Any(None, allow_none=True)
    selections = traitlets.Dict()
    active_selection = traitlets.Unicode("")
    finetune_result = traitlets.Any(None, allow_none=True)
    embedding_key = traitlets.Unicode("")
    busy = traitlets.Unicode("")
    obs_version = traitlets.Int(0)

    def __init__(self, *, adata: Any = None, model: Any = None, adata_name: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if model is not None:
            self.set_model(model, source="memory")
        if adata is not None:
            self.set_adata(adata, name=adata_name or "adata")

    # -- model and data
    def set_model(self, model: Any, *, source: str = "memory") -> None:
        """Make ``model`` the current model; tokens made with another model are dropped."""
        self.tokens = None
        self.model_source = source
        self.model = model

    def has_demo_model(self) -> bool:
        """Whether the current model is the shipped demo model (loaded as "demo" or made by its script)."""
        if self.model is None:
            return False
        metadata = getattr(self.model.config, "metadata", None) or {}
        return self.model_source == "demo" or metadata.get("trained_by") == "cellkit.datasets.make_demo_model"

    def set_adata(self, adata: Any, *, name: str = "adata") -> None:
        """Make ``adata`` the current data; tokens, selections and embeddings of the old data are dropped."""
        self.tokens = None
        self.selections = {}
        self.active_selection = ""
        self.embedding_key = ""
        self.adata_name = name
        self.adata = adata

    def obs_changed(self) -> None:
        """Tell the panels that ``adata.obs`` gained or changed columns."""
        self.obs_version += 1

    # -- selections
    def add_selection(self, name: str, cells: Any, *, activate: bool = True) -> np.ndarray:
        """Store a named selection of cells and (by default) make it the active one.

        Parameters
        ----------
        name
            Selection name (replaces one of the same name).
        cells
            Obs names, integer positions into ``adata``, a boolean mask over ``adata``, a query
            string or another selection's name (see :meth:`resolve_cells`).

        Returns
        -------
        ``(n,)`` obs names of the selected cells, in ``adata`` order.
        """
        from cellkit import DataError

        name = str(name).strip()
        if not name:
            raise DataError("A selection needs a name.")
        names = self.resolve_cells(cells)
        if len(names) == 0:
            raise DataError(f"Selection {name!r} is empty; select at least one cell.")
        self.selections = {**self.selections, name: names}
        if activate:
            self.active_selection = name
        return names

    def remove_selection(self, name: str) -> None:
        """Forget a selection (no error if it does not exist)."""
        self.selections = {k: v for k, v in self.selections.items() if k != name}
        if self.active_selection == name:
            self.active_selection = ""

    def use_all_cells(self) -> None:
        """Release the active selection: every action uses all cells again (selections are kept).

        The selection the Data panel's filter wrote (:data:`DATA_FILTER`) lives only while it
        is the active one: it is dropped with it.
        """
        self.active_selection = ""

    @traitlets.observe("active_selection")
    def _drop_stale_filter(self, change: Any) -> None:
        # the Data panel's filter selection lives only while it is the active one
        if change["new"] != DATA_FILTER and DATA_FILTER in self.selections:
            self.selections = {k: v for k, v in self.selections.items() if k != DATA_FILTER}

    def resolve_cells(self, cells: Any) -> np.ndarray:
        """Obs names (``adata`` order, each once) of a selection.

        ``cells`` is anything :func:`cellkit.data.select_cells` takes — names, positions, a boolean
        mask, a query string — or the name of a stored selection.
        """
        from cellkit import DataError
        from cellkit.data import select_cells

        if self.adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        pos = select_cells(self.adata.obs, cells, order="sorted", selections=self.selections)
        return np.asarray(self.adata.obs_names[pos]).astype(str)

    def cells_note(self) -> str:
        """HTML: which cells an action will use (all, or the active selection and its size).

        The one sentence every panel that acts on "the selected cells" shows.
        """
        import html

        from cellkit import CellkitError

        if self.adata is None:
            return "<i>No data loaded: pick an AnnData in the Data panel.</i>"
        try:
            names = self.selected_cells()
        except CellkitError as exc:  # a stale selection name
            return f"<i>Cells: {html.escape(str(exc))}</i>"
        if names is None:
            return f"Cells: all {self.adata.n_obs:,} cells"
        return (
            f"Cells: selection <b>{html.escape(self.active_selection)}</b> — "
            f"<b>{len(names):,}</b> of {self.adata.n_obs:,} cells"
        )

    def n_selected(self) -> int:
        """How many cells the active selection holds (``adata.n_obs`` for all cells; 0 without data)."""
        if self.adata is None:
            return 0
        names = self.selected_cells()
        return int(self.adata.n_obs) if names is None else len(names)

    def selected_cells(self, name: str | None = None) -> np.ndarray | None:
        """Obs names of a selection (default: the active one); ``None`` means all cells."""
        name = self.active_selection if name is None else name
        if not name:
            return None
        return self.resolve_cells(name)
