"""TileDB-SOMA experiments (the format CELLxGENE Census is served in) as a tokenize source.

:class:`SomaSource` names the cells and the expression matrix of a SOMA experiment — a URI or an
open ``tiledbsoma.Experiment`` (e.g. ``cellxgene_census.open_soma()["census_data"]["homo_sapiens"]``),
a measurement (``"RNA"``), an ``X`` layer (``"raw"``) and SOMA value filters on ``obs`` / ``var``
(the Census query syntax, ``"tissue_general == 'blood' and is_primary_data == True"``). The filters
go to tiledbsoma's own query (``Experiment.axis_query``); cellkit never evaluates them.

Reading is tiledbsoma's: the selected ``obs`` rows (only the columns asked for) and ``var`` are read
once, then ``X`` is read in blocks of ``chunk_size`` cells, one tiledbsoma read each
(``SparseNDArray.read((cells, genes)).tables()``, the next block read ahead in a background
thread), so memory is bounded by the block size, not by the number of cells. (tiledbsoma's
``blockwise(...).scipy()`` iterator gives the same blocks but re-sorts and re-indexes every entry
in extra Arrow steps (20,000 cells, 14.7 M entries, 2-core Xeon under load: 8.6 s, against 2.5 s for the
table reads alone and about 2 s more to build the CSR blocks).)

Cell order and names
--------------------
Cells come out in **ascending** ``soma_joinid`` order (the order of the rows of an AnnData that
``tiledbsoma.io.from_anndata`` wrote, and the order of ``query.to_anndata()``), whatever order the
query returns them in. A cell's name is its ``obs_names`` column: ``"obs_id"`` when the experiment
has one (what ``from_anndata`` writes the AnnData's ``obs_names`` to), else its ``soma_joinid`` as a
string (Census). The same cells as an AnnData in that order, with those names, give exactly the same
tokens (cellkit tests this for every scheme).

Genes
-----
The ``var`` table is read whole (every column, ascending ``soma_joinid``, after ``var_filter``);
its index (what tokenize matches to the vocabulary unless ``gene_column=`` picks another column) is
``gene_column``: default ``"var_id"`` (``from_anndata``'s ``var_names``) if present, else
``"feature_name"`` (Census gene symbols). Census's Ensembl ids are ``"feature_id"`` (the
``geneformer`` scheme uses them by default when present).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_obs_names
from .._errors import DataError
from .._utils import require
from .sources import MatrixSource

__all__ = ["SomaSource", "is_soma_input"]

#: ``X`` layer tried first when ``layer=None`` (CELLxGENE Census's counts)
DEFAULT_LAYER = "raw"
#: ``var`` columns tried, in order, for the gene names when ``gene_column=None``
GENE_COLUMNS = ("var_id", "feature_name")
#: ``obs`` column tried for the cell names when ``obs_names=None``
OBS_NAMES_COLUMN = "obs_id"
_FILTER_HINT = (
    "SOMA value filters compare obs/var columns, e.g. \"tissue_general == 'blood' and is_primary_data == "
    "True\" or \"cell_type in ['B cell', 'T cell']\" (strings in quotes, and/or, in [...])"
)


def _tiledbsoma() -> Any:
    return require("tiledbsoma", extra="soma", purpose="reading TileDB-SOMA / CELLxGENE Census experiments")


def is_soma_input(data: Any) -> bool:
    """Whether ``data`` is a :class:`SomaSource`, a ``tiledbsoma`` object or the URI of a SOMA experiment.

    A URI counts when it is a local directory holding a TileDB group (``__tiledb_group.tdb``) or a
    remote URI (``s3://``, ``tiledb://``, ``gs://``, ...) that is not an ``.h5ad`` file. Never
    imports tiledbsoma for other inputs.
    """
    if isinstance(data, SomaSource):
        return True
    if type(data).__module__.split(".")[0] in ("tiledbsoma", "somacore"):
        return True
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        if "://" in text and not text.startswith("file://"):
            return not text.endswith(".h5ad")
        path = text[len("file://") :] if text.startswith("file://") else text
        return os.path.isdir(path) and os.path.exists(os.path.join(path, "__tiledb_group.tdb"))
    return False


@dataclass(frozen=True, eq=False)
class SomaSource:
    """Cells of a TileDB-SOMA experiment (e.g. CELLxGENE Census) to pass to :func:`cellkit.tokenize`.

    Parameters
    ----------
    experiment
        The experiment's URI (a local directory, ``s3://…``, ``tiledb://…``), or an open
        ``tiledbsoma.Experiment`` (e.g. ``census["census_data"]["homo_sapiens"]`` from
        ``cellxgene_census.open_soma()``). An open experiment is read, never closed; a URI is
        opened for the call and closed after it.
    measurement
        The measurement holding the matrix (``exp.ms[measurement]``), ``"RNA"`` in Census and in
        ``tiledbsoma.io.from_anndata``'s default.
    layer
        The ``X`` layer: Census's counts are ``"raw"``; ``from_anndata`` writes ``.X`` as
        ``"data"``. Default: ``"raw"`` when it exists, else the measurement's only layer.
    obs_filter, var_filter
        SOMA value filters (the Census query syntax, e.g.
        ``"tissue_general == 'blood' and is_primary_data == True"``), passed to tiledbsoma's
        ``axis_query`` as they are (never evaluated by cellkit). ``None``: all cells / genes.
    obs_joinids
        Restrict to these cells (``soma_joinid`` values; combined with ``obs_filter``): one
        partition of a large query (see :meth:`partitions`).
    gene_column
        ``var`` column whose values name the genes (the tokenize input's ``var_names``):
        default ``"var_id"`` if present, else ``"feature_name"`` (Census symbols). Census
        Ensembl ids are ``"feature_id"``.
    obs_names
        ``obs`` column whose values name the cells: default ``"obs_id"`` if present (an AnnData
        written by ``from_anndata``), else ``soma_joinid`` as a string (Census). Cell names key
        the per-cell random draws of the ``scgpt`` / ``teddy`` schemes and are written to shards.

    Examples
    --------
    >>> src = cellkit.data.SomaSource(
    ...     census["census_data"]["homo_sapiens"],
    ...     obs_filter="tissue_general == 'blood' and is_primary_data == True",
    ... )
    >>> shards = cellkit.tokenize(src, model, output="blood_shards", obs_columns=["cell_type"])
    """

    experiment: Any
    measurement: str = "RNA"
    layer: str | None = None
    obs_filter: str | None = None
    var_filter: str | None = None
    obs_joinids: Any = field(default=None, repr=False)
    gene_column: str | None = None
    obs_names: str | None = None

    def __post_init__(self) -> None:
        for name in ("measurement", "layer", "obs_filter", "var_filter", "gene_column", "obs_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"SomaSource {name}= must be a string, got {type(value).__name__}.")
        if not isinstance(self.experiment, (str, os.PathLike)) and not is_soma_input(self.experiment):
            raise DataError(
                f"SomaSource needs a SOMA experiment URI or an open tiledbsoma.Experiment, got "
                f"{type(self.experiment).__name__}."
            )
        if self.obs_joinids is not None:
            ids = np.unique(np.asarray(self.obs_joinids, dtype=np.int64))
            object.__setattr__(self, "obs_joinids", ids)

    # ------------------------------------------------------------------ public helpers
    def cell_index(self) -> np.ndarray:
        """The selected cells' ``soma_joinid`` values, ascending: the query's cell index.

        Returns
        -------
        ``(n_cells,)`` int64.
        """
        with _Opened(self) as exp:
            query = self._query(exp)
            try:
                return np.sort(query.obs_joinids().to_numpy().astype(np.int64))
            except Exception as exc:  # tiledbsoma raises several types for a bad filter
                raise self._filter_error(exc, "obs") from None
            finally:
                query.close()

    def partitions(self, max_cells: int = 200_000) -> list[SomaSource]:
        """This selection cut into consecutive parts of at most ``max_cells`` cells (by ``soma_joinid``).

        Each part is a :class:`SomaSource` restricted with ``obs_joinids=``; tokenize them one by
        one (or in separate jobs) into their own shard directories.
        """
        if max_cells < 1:
            raise DataError(f"max_cells must be >= 1, got {max_cells}.")
        ids = self.cell_index()
        if not len(ids):
            raise self._empty_error()
        return [replace(self, obs_joinids=ids[a : a + max_cells]) for a in range(0, len(ids), max_cells)]

    # ------------------------------------------------------------------ tokenize's entry
    def matrix_source(
        self, *, obs_columns: Sequence[str] = (), optional_columns: Sequence[str] = ()
    ) -> SomaMatrixSource:
        """Open the experiment and read the query's ``obs`` (only ``obs_columns`` + the present
        ``optional_columns``) and ``var``; ``X`` is read later, block by block.

        Close the returned source (:meth:`MatrixSource.close`) when done.
        """
        soma = _tiledbsoma()
        opened = _Opened(self)
        exp = opened.__enter__()
        try:
            ms = self._measurement(exp)
            layer = self._layer(ms)
            array = ms.X[layer]
            if not isinstance(array, soma.SparseNDArray):
                raise DataError(
                    f"X layer {layer!r} of measurement {self.measurement!r} is a {type(array).__name__}; cellkit "
                    "reads sparse X layers (SparseNDArray), as Census and tiledbsoma.io.from_anndata write them."
                )
            obs_schema = list(exp.obs.schema.names)
            missing = [c for c in obs_columns if c not in obs_schema]
            if missing:
                raise DataError(
                    f"obs column(s) {missing} not found in the SOMA experiment {self._name()}; available: "
                    f"{[c for c in obs_schema if c != 'soma_joinid']}."
                )
            names_col = self._obs_names_column(obs_schema)
            columns = list(dict.fromkeys([*obs_columns, *(c for c in optional_columns if c in obs_schema)]))
            query = self._query(exp)
            try:
                obs = self._read_obs(query, names_col, columns)
                var = self._read_var(query, ms)
            finally:
                query.close()
            if not len(obs):
                raise self._empty_error()
            if not len(var):
                raise DataError(
                    f"var_filter={self.var_filter!r} selects none of the genes of measurement "
                    f"{self.measurement!r}; loosen it (or pass var_filter=None)."
                )
            joinids = obs.pop("soma_joinid").to_numpy().astype(np.int64)
            var_joinids = var.pop("soma_joinid").to_numpy().astype(np.int64)
            matrix = _SomaX(array, joinids, var_joinids)
            name = f"SOMA {self._name()} ({self.measurement}/X/{layer})"
            src = SomaMatrixSource(matrix, var, obs, np.arange(len(obs), dtype=np.int64), name)
            src._file = opened
            return src
        except BaseException:
            opened.__exit__(None, None, None)
            raise

    # ------------------------------------------------------------------ internals
    def _name(self) -> str:
        if isinstance(self.experiment, (str, os.PathLike)):
            return os.fspath(self.experiment)
        return str(getattr(self.experiment, "uri", type(self.experiment).__name__))

    def _query(self, exp: Any) -> Any:
        soma = _tiledbsoma()
        coords = () if self.obs_joinids is None else (self.obs_joinids,)
        try:
            return exp.axis_query(
                self.measurement,
                obs_query=soma.AxisQuery(coords=coords, value_filter=self.obs_filter),
                var_query=soma.AxisQuery(value_filter=self.var_filter),
            )
        except Exception as exc:
            raise self._filter_error(exc, "obs") from None

    def _measurement(self, exp: Any) -> Any:
        available = list(exp.ms.keys()) if "ms" in exp else []
        if self.measurement not in available:
            raise DataError(
                f"The SOMA experiment {self._name()} has no measurement {self.measurement!r}; available: "
                f"{available}. Pass measurement=... (Census and from_anndata use 'RNA')."
            )
        return exp.ms[self.measurement]

    def _layer(self, ms: Any) -> str:
        layers = list(ms.X.keys()) if "X" in ms else []
        if self.layer is not None:
            if self.layer not in layers:
                raise DataError(
                    f"Measurement {self.measurement!r} has no X layer {self.layer!r}; available: {layers}. "
                    "Pass layer=... (Census counts: 'raw'; tiledbsoma.io.from_anndata writes .X as 'data')."
                )
            return self.layer
        if DEFAULT_LAYER in layers:
            return DEFAULT_LAYER
        if len(layers) == 1:
            return layers[0]
        raise DataError(
            f"Measurement {self.measurement!r} has X layers {layers} and none is {DEFAULT_LAYER!r}; pass layer=... "
            "to choose the counts."
        )

    def _obs_names_column(self, obs_schema: list[str]) -> str:
        if self.obs_names is not None:
            if self.obs_names not in obs_schema:
                raise DataError(
                    f"obs_names={self.obs_names!r} is not an obs column of {self._name()}; available: "
                    f"{[c for c in obs_schema if c != 'soma_joinid']} (None: 'obs_id' if present, else soma_joinid)."
                )
            return self.obs_names
        return OBS_NAMES_COLUMN if OBS_NAMES_COLUMN in obs_schema else "soma_joinid"

    def _read_obs(self, query: Any, names_col: str, columns: list[str]) -> pd.DataFrame:
        read = list(dict.fromkeys(["soma_joinid", names_col, *columns]))
        try:
            table = query.obs(column_names=read).concat()
        except Exception as exc:
            raise self._filter_error(exc, "obs") from None
        table = table.sort_by("soma_joinid")  # the documented cell order, whatever the read order
        frame = table.to_pandas()
        del table
        names = (
            frame[names_col].astype(str) if names_col != "soma_joinid" else frame["soma_joinid"].astype(str)
        )
        index = pd.Index(names.to_numpy(), dtype=object)
        check_obs_names(index, what=f"SOMA experiment {self._name()}")
        out = frame[["soma_joinid", *columns]].copy()
        out.index = index
        return out

    def _read_var(self, query: Any, ms: Any) -> pd.DataFrame:
        try:
            frame = query.var().concat().sort_by("soma_joinid").to_pandas()
        except Exception as exc:
            raise self._filter_error(exc, "var") from None
        column = self.gene_column
        if column is None:
            column = next((c for c in GENE_COLUMNS if c in frame.columns), "soma_joinid")
        elif column not in frame.columns:
            raise DataError(
                f"gene_column={column!r} is not a var column of measurement {self.measurement!r}; available: "
                f"{[c for c in frame.columns if c != 'soma_joinid']} (Census: 'feature_name' symbols, "
                "'feature_id' Ensembl ids)."
            )
        frame.index = pd.Index(frame[column].astype(str).to_numpy(), dtype=object)
        return frame

    def _filter_error(self, exc: BaseException, axis: str) -> DataError:
        if isinstance(exc, DataError):
            return exc
        value = self.obs_filter if axis == "obs" else self.var_filter
        if value is None and axis == "obs" and self.obs_joinids is not None:
            what = "obs_joinids="
        else:
            what = f"{axis}_filter={value!r}"
        reason = str(exc).strip().split("\n")[0] or type(exc).__name__  # tiledbsoma appends a C++ trace
        return DataError(
            f"Reading {axis} of {self._name()} with {what} failed: {reason}. {_FILTER_HINT}; the column names "
            f"must be {axis} columns of the experiment."
        )

    def _empty_error(self) -> DataError:
        if self.obs_filter is None and self.obs_joinids is None:
            return DataError(f"The SOMA experiment {self._name()} has no cells; nothing to tokenize.")
        with _Opened(self) as exp:
            total = int(exp.obs.count)
        return DataError(
            f"No cells selected: obs_filter={self.obs_filter!r}"
            + (" with obs_joinids=" if self.obs_joinids is not None else "")
            + f" matches none of the {total:,} cells of {self._name()}; check the column values "
            "(e.g. exp.obs.read(column_names=[...]).concat().to_pandas()[col].unique()) and loosen the filter."
        )


class _Opened:
    """The source's experiment, opened for reading if it is a URI (closed on exit), else as given."""

    def __init__(self, source: SomaSource) -> None:
        self.source = source
        self._exp: Any = None
        self._own = False

    def __enter__(self) -> Any:
        soma = _tiledbsoma()
        exp = self.source.experiment
        if isinstance(exp, (str, os.PathLike)):
            uri = os.fspath(exp)
            try:
                exp = soma.Experiment.open(uri)
            except soma.DoesNotExistError:
                raise DataError(
                    f"No SOMA experiment at {uri!r}; pass the experiment's URI (a directory written by "
                    "tiledbsoma.io.from_anndata, or a Census URI) or an open tiledbsoma.Experiment."
                ) from None
            except (TypeError, soma.SOMAError) as exc:
                raise DataError(
                    f"{uri!r} is not a SOMA experiment ({exc}); for CELLxGENE Census open it with "
                    "cellxgene_census.open_soma() and pass census['census_data']['homo_sapiens']."
                ) from None
            self._own = True
        elif not isinstance(exp, soma.Experiment):
            hint = (
                " This looks like the Census root collection: pass census['census_data']['homo_sapiens'] "
                "(or 'mus_musculus')."
                if hasattr(exp, "keys") and "census_data" in exp
                else ""
            )
            raise DataError(f"Expected a tiledbsoma.Experiment, got {type(exp).__name__}.{hint}")
        elif getattr(exp, "closed", False):
            raise DataError("This tiledbsoma.Experiment is closed; open it again (or pass its URI).")
        self._exp = exp
        return exp

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._own and self._exp is not None:
            self._exp.close()
        self._exp = None


@dataclass
class _SomaX:
    """One ``X`` layer of a query: the array handle, the cells' and genes' ``soma_joinid`` values."""

    array: Any
    joinids: np.ndarray  # (n_obs,) ascending, aligned with the source's obs rows
    var_joinids: np.ndarray  # (n_vars,) ascending, aligned with the source's var rows

    def __post_init__(self) -> None:
        n = len(self.var_joinids)
        self._all_vars = bool(n) and self.var_joinids[0] == 0 and self.var_joinids[-1] == n - 1
        self._var_lut: np.ndarray | None = None
        if not self._all_vars:  # soma_joinid -> column position (var tables are small)
            lut = np.full(int(self.var_joinids.max()) + 1 if n else 0, -1, dtype=np.int64)
            lut[self.var_joinids] = np.arange(n)
            self._var_lut = lut

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.joinids), len(self.var_joinids)

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """The CSR block of cells ``rows`` (positions into ``joinids``); columns are positions into
        ``var_joinids``. One tiledbsoma read (``SparseNDArray.read(coords).tables()``)."""
        coords = self.joinids[rows]
        n = len(coords)
        if not n:
            return sp.csr_matrix((0, len(self.var_joinids)), dtype=np.float32)
        first, last = int(coords[0]), int(coords[-1])
        contiguous = last - first + 1 == n
        obs_coords: Any = slice(first, last) if contiguous else coords  # SOMA slices are closed
        var_coords: Any = None if self._all_vars else self.var_joinids
        table = self.array.read((obs_coords, var_coords)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy()
        del table
        row = dim0 - first if contiguous else np.searchsorted(coords, dim0)
        col = dim1 if self._var_lut is None else self._var_lut[dim1]
        block = sp.csr_matrix((data, (row, col)), shape=(n, len(self.var_joinids)))
        return _canonical(block)

    def blocks(self, rows: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """``(rows, CSR block)`` for consecutive blocks of ``size`` cells; the next block is read
        in a background thread while the caller works on the current one (TileDB reads without
        holding the GIL), so at most two blocks are in memory."""
        from concurrent.futures import ThreadPoolExecutor

        parts = [rows[a : a + size] for a in range(0, len(rows), size)]
        if not parts:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellkit-soma") as pool:
            pending = pool.submit(self.read, parts[0])
            try:
                for k, part in enumerate(parts):
                    block = pending.result()
                    if k + 1 < len(parts):
                        pending = pool.submit(self.read, parts[k + 1])
                    yield part, block
                    del block
            finally:
                pending.cancel()


def _canonical(block: Any) -> sp.csr_matrix:
    """A block as :meth:`MatrixSource._read` gives it: CSR, sorted indices, integers as float32."""
    block = block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)
    if block.dtype.kind in "iub":
        block = block.astype(np.float32)
    if not block.has_canonical_format:
        block.sum_duplicates()
        block.sort_indices()
    return block


class SomaMatrixSource(MatrixSource):
    """A :class:`MatrixSource` over a SOMA query: ``matrix`` is the ``X`` layer, ``obs`` the selected
    cells (index = cell names), ``rows`` positions into ``obs``; blocks come from tiledbsoma."""

    def chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield ``(row positions, CSR block)`` pairs covering :attr:`rows` in order (see
        :meth:`MatrixSource.chunks`), each one tiledbsoma read of ``chunk_size`` cells (the next
        one read ahead)."""
        yield from self.matrix.blocks(np.asarray(self.rows, dtype=np.int64), chunk_size)

    def _read(self, idx: np.ndarray) -> sp.csr_matrix:
        return self.matrix.read(np.asarray(idx, dtype=np.int64))


def soma_source_of(data: Any, *, layer: str | None) -> SomaSource:
    """``data`` (a :class:`SomaSource`, an experiment or its URI) as a :class:`SomaSource`; ``layer``
    is tokenize's ``layer=`` (the ``X`` layer for an experiment or URI)."""
    if isinstance(data, SomaSource):
        if layer is not None and data.layer is not None and layer != data.layer:
            raise DataError(
                f"layer={layer!r} and the SomaSource's layer={data.layer!r} disagree; pass the layer to SomaSource."
            )
        return data if layer is None else replace(data, layer=layer)
    return SomaSource(data, layer=layer)
