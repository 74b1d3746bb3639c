"""Row-chunk access to expression matrices without densifying them.

A :class:`MatrixSource` wraps an in-memory or backed AnnData (``X``, a layer, or ``.raw``) and
hands out CSR blocks of selected rows. :func:`h5ad_sources` opens a list of ``.h5ad`` partitions
(as atlas/census downloads come) backed, one after another; :func:`scbank_sources` reads scGPT's
scBank directories (parquet tables of gene ids and expression values).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import DataError, VocabError
from .._utils import read_json
from .selection import select_cells
from .vocab import GeneVocab

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["MatrixSource", "h5ad_sources", "scbank_sources", "select_rows"]


@dataclass
class MatrixSource:
    """Selected rows of one expression matrix.

    Attributes
    ----------
    matrix
        In-memory array/sparse matrix, or a backed anndata dataset, shape ``(n_obs, n_vars)``.
    var
        Gene table (index = gene names) of the matrix's columns.
    obs
        Cell table of all rows (``obs_names`` index).
    rows
        Sorted row indices to use (the selection).
    name
        Where the rows come from (file path or ``"AnnData"``), for messages.
    """

    matrix: Any
    var: pd.DataFrame
    obs: pd.DataFrame
    rows: np.ndarray
    name: str = "AnnData"
    _file: Any = None

    def close(self) -> None:
        """Close the file this source opened itself (backed partitions); a no-op otherwise."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    def chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield ``(row indices, CSR block)`` pairs covering :attr:`rows` in order.

        Blocks are copies with sorted indices and no explicit zeros, in the source's dtype
        (integers become float32).
        """
        for start in range(0, len(self.rows), chunk_size):
            idx = self.rows[start : start + chunk_size]
            block = self._read(idx)
            yield idx, block

    def _read(self, idx: np.ndarray) -> sp.csr_matrix:
        m = self.matrix
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
            block = m[int(idx[0]) : int(idx[-1]) + 1]
        else:
            block = m[idx]
        if sp.issparse(block):
            block = sp.csr_matrix(block, copy=True)
        else:
            block = sp.csr_matrix(np.asarray(block))
        if block.dtype.kind in "iub":
            block = block.astype(np.float32)
        block.sum_duplicates()
        block.sort_indices()
        return block


def _matrix_of(adata: AnnData, layer: str | None, use_raw: bool) -> tuple[Any, pd.DataFrame]:
    if use_raw and layer is not None:
        raise DataError("Pass either layer=... or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise DataError("use_raw=True but this AnnData has no .raw; pass layer=... or the counts in .X.")
        return adata.raw.X, adata.raw.var
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
        return adata.layers[layer], adata.var
    if adata.X is None:
        raise DataError("This AnnData has no .X; pass layer=... to choose the expression matrix.")
    return adata.X, adata.var


def select_rows(obs: pd.DataFrame, cells: Any) -> np.ndarray:
    """Sorted row indices for a selection that must not be empty.

    :func:`cellkit.data.select_cells` with ``order="sorted"`` (each cell once, obs order), refusing
    an empty result.

    Parameters
    ----------
    obs
        The cell table.
    cells
        ``None`` (all), a boolean mask ``(n_obs,)``, integer positions, obs names, or a query string
        in cellkit's restricted grammar (e.g. ``"bulk_labels == 'CD14+ Monocyte'"``; see
        :func:`cellkit.data.parse_query`).
    """
    rows = select_cells(obs, cells, order="sorted")
    if not len(rows):
        where = "the data has no cells" if not len(obs) else f"cells= selects none of the {len(obs):,} cells"
        raise DataError(f"No cells selected: the selection is empty ({where}); nothing to tokenize.")
    return rows


def anndata_source(
    adata: AnnData, *, layer: str | None = None, use_raw: bool = False, cells: Any = None
) -> MatrixSource:
    """A :class:`MatrixSource` over an in-memory or backed AnnData."""
    matrix, var = _matrix_of(adata, layer, use_raw)
    if getattr(matrix, "format", None) == "csc" or sp.isspmatrix_csc(matrix):
        raise DataError(
            "The expression matrix is stored column-wise (CSC); cellkit reads cells row by row. Convert it "
            "once: adata.X = adata.X.tocsr() (in memory) or rewrite the file with a CSR matrix."
        )
    rows = select_rows(adata.obs, cells)
    name = str(adata.filename) if getattr(adata, "isbacked", False) else "AnnData"
    return MatrixSource(matrix, var, adata.obs, rows, name)


def h5ad_sources(paths: Sequence[str | os.PathLike[str]], *, layer: str | None = None) -> list[MatrixSource]:
    """Open ``.h5ad`` partitions backed (``mode="r"``); call :meth:`MatrixSource.close` when done."""
    import anndata as ad

    sources = []
    try:
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise DataError(f"{path} does not exist.")
            adata = ad.read_h5ad(path, backed="r")
            src = anndata_source(adata, layer=layer)
            src.name = str(path)
            src._file = adata.file
            sources.append(src)
    except BaseException:
        for src in sources:
            src.close()
        raise
    return sources


def scbank_sources(path: str | os.PathLike[str]) -> tuple[list[str], Iterator[MatrixSource]]:
    """Read an scGPT scBank directory: ``gene_vocab.json`` + ``*.datatable.parquet`` tables.

    Each table holds one row per cell with list columns ``genes`` (ids in the scBank's own gene
    vocabulary) and ``expressions``. Returns the scBank gene names (id order) and one source per
    table whose columns are the scBank genes.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    vocab_file = path / "gene_vocab.json"
    if not vocab_file.is_file():
        raise DataError(
            f"{path} has no gene_vocab.json; an scBank directory holds it next to *.datatable.parquet files."
        )
    stoi = read_json(vocab_file, what="scBank gene vocabulary", expect=dict, error=DataError)
    try:
        genes = GeneVocab.from_dict(stoi).tokens
    except VocabError as exc:
        raise DataError(f"{vocab_file}: {exc}") from None
    tables = sorted(path.glob("*.datatable.parquet"))
    if not tables:
        raise DataError(f"{path} has no *.datatable.parquet table.")

    def gen() -> Iterator[MatrixSource]:
        for table_path in tables:
            table = pq.read_table(table_path)
            for col in ("genes", "expressions"):
                if col not in table.column_names:
                    raise DataError(f"{table_path} has no {col!r} column (columns: {table.column_names}).")
            g = table.column("genes").combine_chunks()
            e = table.column("expressions").combine_chunks()
            indptr = g.offsets.to_numpy().astype(np.int64)
            m = sp.csr_matrix(
                (e.values.to_numpy().astype(np.float32), g.values.to_numpy().astype(np.int64), indptr),
                shape=(len(table), len(genes)),
            )
            names = (
                table.column("id").to_numpy().astype(str)
                if "id" in table.column_names
                else np.array([f"{table_path.stem}:{i}" for i in range(len(table))])
            )
            obs = pd.DataFrame(index=pd.Index(names, name=None))
            yield MatrixSource(
                m, pd.DataFrame(index=pd.Index(genes)), obs, np.arange(len(table)), str(table_path)
            )

    return genes, gen()
