"""Cell embeddings: encoder-only, length-bucketed, streamed over any AnnData, into ``obsm``.

:func:`embed_cells` tokenizes the cells block by block with the model's own scheme (so a backed
atlas never sits in memory), runs the encoder without any vocabulary-sized head, pools each cell
(``cls`` / ``mean`` over non-pad tokens / value-``weighted``) from the chosen layer and writes the
vectors to ``adata.obsm[key_added]`` in the input order. Results do not depend on the batch size
or on the bucketing (beyond float rounding, ~1e-7: the bits follow ``batch_size`` and ``chunk_size``).

For atlases, ``embed_cells(adata_or_shards, model, output="out.h5ad" | "store_dir")`` writes the
vectors to a file instead, chunk by chunk, resumably and in parallel under ``torchrun`` (the same
bits for any number of processes); see :mod:`cellkit.analysis.atlas` and ``cellkit embed --help``.

Reference semantics, when asked:

- scGPT's ``embed_data``: ``pooling="cls"``, last layer, L2-normalised (the default for scGPT
  models), ``<cls>`` value = ``pad_value`` and ``max_len=1200`` (pass them as tokenize options).
- Geneformer's ``EmbExtractor``: ``emb_mode="cell"`` = ``pooling="mean"`` (``<cls>``/``<eos>``
  left out), ``emb_mode="cls"`` = ``pooling="cls"``; ``emb_layer=-1`` (its default, the
  second-to-last layer) = ``hidden_layer=-2``; no normalisation (the default for Geneformer models).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._anndata import check_adata, check_finite_rows, check_keys_free, finite_embedding, record_written
from .._errors import ConfigError, DataError
from .._inference import AutoBatchSize, run_inference, to_batch_size
from .._utils import Progress, get_logger, track
from ..data.sources import select_rows
from ..data.tokenize import tokenize
from ..data.tokenized import ShardedTokens, TokenizedCells
from ..heads import POOLING_MODES, pool_cells
from ..model import CellModel

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["cell_embeddings", "embed_cells", "resolve_hidden_layer", "umap"]

log = get_logger(__name__)


def resolve_hidden_layer(model: CellModel, hidden_layer: int | None) -> int | None:
    """Index into ``hidden_states`` (``n_layers + 1`` entries, input embeddings first).

    ``None`` or ``-1``: the last layer (returned as ``None``: no hidden states needed); ``-2``:
    the second-to-last (Geneformer's default ``emb_layer=-1``); ``0``: the input embeddings;
    ``k > 0``: the output of layer ``k``.
    """
    n = model.config.encoder.n_layers
    if hidden_layer is None:
        return None
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int | np.integer):
        raise ConfigError(f"hidden_layer must be an integer or None, got {hidden_layer!r}.")
    if not -(n + 1) <= hidden_layer <= n:
        raise ConfigError(
            f"hidden_layer={hidden_layer} is out of range for this {n}-layer model: use -1 (last, default), "
            f"-2 (second-to-last) … {-(n + 1)} (input embeddings), or 0 … {n} counted from the input."
        )
    idx = int(hidden_layer) % (n + 1)
    return None if idx == n else idx


def pooled_embedding(
    model: CellModel,
    out: Any,
    batch: Mapping[str, torch.Tensor],
    mode: str,
    idx: int | None,
    same_as_model: bool,
    normalize: bool,
) -> torch.Tensor:
    """``(B, d)`` float32 cell embeddings of one forward output: the model's own pooling, or
    ``mode`` over hidden layer ``idx`` (``<cls>``/``<eos>`` excluded from means), L2-normalised on request."""
    if same_as_model:
        emb = out.cell_embedding
    else:
        h = out.last_hidden_state if idx is None else out.hidden_states[idx]
        gene_ids = batch["gene_ids"].to(h.device)
        emb = pool_cells(
            h,
            mode=mode,  # type: ignore[arg-type]
            padding_mask=out.padding_mask,
            values=batch["values"].to(h.device) if "values" in batch else None,
            exclude_mask=model._boundary_tokens(gene_ids) if mode == "mean" else None,
        )
    emb = emb.float()
    return torch.nn.functional.normalize(emb, p=2, dim=1) if normalize else emb


def cell_embeddings(
    model: CellModel,
    tokens: TokenizedCells | ShardedTokens,
    *,
    pooling: str | None = None,
    hidden_layer: int | None = None,
    normalize: bool | None = None,
    batch_size: int | str | AutoBatchSize = 64,
    device: str | torch.device | None = "auto",
    amp: str | None = None,
    progress: bool | Progress = True,
    precision: str = "fp32",
) -> np.ndarray:
    """Embed tokenized cells (arrays in, array out).

    Parameters
    ----------
    model
        Any loaded :class:`cellkit.CellModel`.
    tokens
        Cells tokenized for this model.
    pooling
        ``"cls"``, ``"mean"`` (non-pad tokens, ``<cls>``/``<eos>`` excluded) or ``"weighted"``;
        default the model's.
    hidden_layer
        Which layer's states to pool (see :func:`resolve_hidden_layer`); default the last.
    normalize
        L2-normalise each embedding; default ``True`` for scGPT-family models (``embed_data``),
        ``False`` otherwise.
    batch_size, device, amp
        Inference settings; ``amp="bf16"`` autocasts on CUDA. ``batch_size="auto"``: see
        :func:`embed_cells`.
    progress
        ``True``: a progress bar; a :class:`cellkit.Progress` to follow or cancel the call.
    precision
        ``"fp32"`` (default, exact), ``"bf16"`` (GPUs and CPUs with AMX / AVX512-BF16; elsewhere it
        stays fp32 with a warning) or ``"fp16"`` (CUDA).

    Returns
    -------
    ``(n_cells, d_model)`` float32, in the order of ``tokens``. A shard directory is read window
    by window (see :func:`cellkit._inference.run_inference`), never loaded whole.
    """
    mode = pooling or model.config.pooling
    if mode not in POOLING_MODES:
        raise ConfigError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}.")
    idx = resolve_hidden_layer(model, hidden_layer)
    if normalize is None:
        normalize = model.config.family == "scgpt"
    same_as_model = idx is None and mode == model.config.pooling
    if len(tokens) == 0:  # no cell: an empty result (empty shards cannot be loaded)
        return np.zeros((0, model.config.encoder.d_model), dtype=np.float32)

    def fn(out: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"emb": pooled_embedding(model, out, batch, mode, idx, same_as_model, normalize)}

    res = run_inference(
        model,
        tokens,
        fn,
        heads=(),
        batch_size=batch_size,
        device=device,
        precision=precision,
        amp=amp,
        progress=progress,
        desc="embed",
        output_hidden_states=idx is not None,
    )
    if "emb" not in res:
        return np.zeros((0, model.config.encoder.d_model), dtype=np.float32)
    return res["emb"].astype(np.float32, copy=False)


def embed_cells(
    adata: AnnData | TokenizedCells | ShardedTokens,
    model: CellModel,
    *,
    key_added: str = "X_cellkit",
    cells: Any = None,
    pooling: str | None = None,
    hidden_layer: int | None = None,
    normalize: bool | None = None,
    batch_size: int | str = 64,
    chunk_size: int = 20_000,
    device: str = "auto",
    amp: str | None = None,
    on_empty: str = "raise",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
    progress: bool | Progress = True,
    output: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
) -> AnnData | None:
    """Embed cells with a model and store the vectors in ``adata.obsm[key_added]`` (or in ``output``).

    Parameters
    ----------
    adata
        Cells (in memory or ``backed="r"``) with the expression the model's tokenizer expects;
        with ``output``, also tokenized cells (e.g. a shard directory, ``cellkit.tokenize(...,
        output=DIR)``).
    model
        Any loaded :class:`cellkit.CellModel` (scGPT, Geneformer, PerturbGene-style, cellkit).
    key_added
        ``obsm`` key written: ``(n_obs, d_model)`` float32; rows of unselected cells are NaN. An
        existing entry that cellkit did not write (e.g. ``"X_pca"``) is refused unless ``overwrite``.
    cells
        Which cells: a mask, positions, obs names or a query string such as
        ``"bulk_labels == 'B cell'"`` (see :func:`cellkit.data.select_cells`); default all.
    pooling, hidden_layer, normalize
        See :func:`cell_embeddings` (defaults reproduce scGPT's ``embed_data`` for scGPT models and
        the model's own pooling otherwise).
    batch_size
        Cells per forward pass (cells are sorted by length, so batches carry little padding), or
        ``"auto"``: 64, halved after each out-of-memory error down to one cell (then a
        :class:`cellkit.ConfigError` says what to try). Each halving starts the pass over (chunks
        done at a larger size are redone), so the embeddings are exactly those of the fixed
        ``batch_size`` that worked, which is logged (a warning: ``batch_size auto: 64 → 32 after
        out-of-memory``). See :class:`cellkit._inference.AutoBatchSize`.
    chunk_size
        Cells tokenized (and sorted by length into batches) at a time: bounds memory on large
        (backed) data. With ``output``, also the unit of work dealt to ``torchrun`` ranks and of
        resuming.
    device, amp
        ``"auto"``: CUDA when available; ``amp="bf16"`` for bf16 autocast on GPU (older alias of
        ``precision``).
    on_empty
        Cells with no gene in the model's vocabulary: ``"raise"`` (default, a
        :class:`cellkit.DataError` naming them) or ``"nan"`` (their rows stay NaN; a warning counts them).
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize` (``layer`` is the AnnData layer to read).
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Replace ``obsm[key_added]`` even when cellkit did not write it (cellkit's own results are
        replaced without it).
    progress
        ``True``: a progress bar over the cells; ``False``: none; a :class:`cellkit.Progress`
        follows the call (cells done, an estimate) and can cancel it: a cancelled call raises
        :class:`cellkit.Cancelled` and writes nothing.
    output
        Write the embeddings to a file instead of ``adata`` (which is then left as it is): a path
        ending in ``.h5ad`` (a copy of the input with ``obsm[key_added]``, written atomically) or
        a directory (``obs_names.npy`` + a memory-mappable ``{key_added}.npy``); see
        :mod:`cellkit.analysis.atlas`. The work is done in chunks of ``chunk_size`` cells: under
        ``torchrun`` each process embeds its share (same result, bit for bit, as one process), and
        a killed job called again with the same arguments skips the chunks already written (other
        arguments: refused unless ``overwrite``).
    precision
        ``"fp32"`` (default, exact), ``"bf16"`` (GPUs and CPUs with AMX / AVX512-BF16; elsewhere it
        stays fp32 with a warning) or ``"fp16"`` (CUDA).

    Returns
    -------
    ``None`` (``adata.obsm[key_added]`` or ``output`` written) or the copy with ``copy=True``.

    Raises
    ------
    DataError
        Duplicate ``obs_names``, a taken ``key_added``, cells with no vocabulary gene (with
        ``on_empty="raise"``) or embeddings that come out NaN / infinite.
    """
    if output is not None:
        if copy:
            raise ConfigError("copy=True returns an AnnData; with output= the results go to the file instead.")
        from .atlas import embed_to_output

        embed_to_output(
            adata,
            model,
            output=output,
            key_added=key_added,
            cells=cells,
            pooling=pooling,
            hidden_layer=hidden_layer,
            normalize=normalize,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=device,
            precision=precision,
            amp=amp,
            on_empty=on_empty,
            tokenize_options=tokenize_options,
            layer=layer,
            use_raw=use_raw,
            gene_column=gene_column,
            overwrite=overwrite,
            progress=progress,
        )
        return None
    check_adata(adata, what="cellkit.embed_cells")
    check_keys_free(adata, [("obsm", key_added)], overwrite=overwrite, what="cellkit.embed_cells")
    if on_empty not in ("raise", "nan"):
        raise ConfigError(f"on_empty must be 'raise' or 'nan', got {on_empty!r}.")
    batch_size = to_batch_size(batch_size)  # "auto": one AutoBatchSize carried over all chunks
    if chunk_size < 1:
        raise ConfigError("chunk_size must be >= 1.")
    resolve_hidden_layer(model, hidden_layer)  # fail before any work
    positions = select_rows(adata.obs, cells)
    if len(positions) == 0:
        raise DataError(f"No cells selected: the AnnData has {adata.n_obs} cells and cells= selects none.")
    d = model.config.encoder.d_model
    out = np.full((adata.n_obs, d), np.nan, dtype=np.float32)
    opts = dict(tokenize_options or {})
    unseen_warning = opts.pop("unseen_warning", 0.1)  # checked on the first chunk only: one warning per call
    empty: list[str] = []
    starts = list(range(0, len(positions), chunk_size))
    ran_at: dict[int, int] = {}  # batch_size="auto": chunk start -> the size it ran at
    with track(progress, total=len(positions), desc="embedding cells") as bar:
        while starts:
            start = starts.pop(0)
            chunk = positions[start : start + chunk_size]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*no gene in the vocabulary.*")
                tokens = tokenize(
                    adata,
                    model,
                    cells=chunk,
                    layer=layer,
                    use_raw=use_raw,
                    gene_column=gene_column,
                    progress=False,
                    unseen_warning=unseen_warning,
                    **opts,
                )
            unseen_warning = None
            bar.check()
            emb, bad = _embed_tokens(
                model,
                tokens,
                pooling=pooling,
                hidden_layer=hidden_layer,
                normalize=normalize,
                batch_size=batch_size,
                device=device,
                precision=precision,
                amp=amp,
                on_empty=on_empty,
                progress=bar,
            )
            if start not in ran_at:
                empty.extend(np.asarray(tokens.obs_names)[bad].astype(str).tolist())
            pos = adata.obs_names.get_indexer(np.asarray(tokens.obs_names).astype(str))
            out[pos] = emb
            if isinstance(batch_size, AutoBatchSize):  # a later chunk halved it: redo the earlier ones
                ran_at[start] = batch_size.size
                starts += [s for s, z in ran_at.items() if z != batch_size.size and s not in starts]
    if empty:
        warnings.warn(
            f"{len(empty)} cells have no gene in the model's vocabulary; their {key_added!r} rows are NaN "
            f"(e.g. {empty[:3]}).",
            UserWarning,
            stacklevel=2,
        )
    target = adata.copy() if copy else adata
    target.obsm[key_added] = out
    record_written(target, [("obsm", key_added)])
    return target if copy else None


def _embed_tokens(
    model: CellModel,
    tokens: TokenizedCells,
    *,
    pooling: str | None,
    hidden_layer: int | None,
    normalize: bool | None,
    batch_size: int | AutoBatchSize,
    device: str | torch.device | None,
    precision: str,
    amp: str | None,
    on_empty: str,
    progress: bool | Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, d)`` embeddings of one block of tokenized cells and the ``(n,)`` mask of cells with no
    vocabulary gene (their rows NaN; a :class:`DataError` with ``on_empty="raise"``)."""
    n_boundary = sum(1 for r in ("cls", "eos") if r in model.vocab.specials)
    genes_per_cell = tokens.lengths - _boundary_count(model, tokens, n_boundary)
    bad = genes_per_cell <= 0
    if bad.any() and on_empty == "raise":
        names = np.asarray(tokens.obs_names)[bad].astype(str)
        raise DataError(
            f"{int(bad.sum())} cells have no gene in the model's vocabulary, e.g. {list(names[:5])}; "
            "their embeddings would be meaningless. Check the gene identifiers (gene_column=...), "
            "drop these cells (cells=...), or pass on_empty='nan' to leave their rows NaN."
        )
    emb = cell_embeddings(
        model,
        tokens,
        pooling=pooling,
        hidden_layer=hidden_layer,
        normalize=normalize,
        batch_size=batch_size,
        device=device,
        amp=amp,
        precision=precision,
        progress=progress,
    )
    check_finite_rows(emb, what="embeddings", names=tokens.obs_names, skip=bad)
    emb[bad] = np.nan
    return emb, bad


def _boundary_count(model: CellModel, tokens: TokenizedCells, n_boundary: int) -> np.ndarray:
    """Special tokens per cell (``<cls>``, ``<eos>``, phenotype tokens are not genes)."""
    if n_boundary == 0 and tokens.token_type_ids is None:
        return np.zeros(len(tokens), dtype=np.int64)
    specials = np.asarray(sorted(tokens.specials.values()), dtype=np.int64)
    is_special = np.isin(tokens.gene_ids, specials)
    if tokens.token_type_ids is not None:  # PerturbGene: genes are the tokens with a gene type
        offset = int(tokens.options.get("gene_type_offset", 1))
        is_special |= tokens.token_type_ids < offset
    counts = np.add.reduceat(is_special.astype(np.int64), tokens.offsets[:-1]) if len(tokens) else np.zeros(0)
    counts[tokens.lengths == 0] = 0
    return counts


def umap(
    adata: AnnData,
    *,
    use_rep: str = "X_cellkit",
    key_added: str | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.3,
    metric: str = "cosine",
    random_state: int = 0,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """UMAP of an embedding with umap-learn, into ``obsm[key_added]`` (default ``use_rep + "_umap"``).

    Only ``obsm[key_added]`` is written (no neighbour graph in ``obsp``); rows that are NaN in
    ``use_rep`` (unselected cells) stay NaN. An embedding with infinite values (or rows only partly
    NaN) is refused, as is an existing ``obsm[key_added]`` that cellkit did not write (unless
    ``overwrite``).

    Parameters
    ----------
    adata
        Cells with ``obsm[use_rep]``.
    use_rep
        The embedding (e.g. from :func:`embed_cells`).
    key_added
        ``obsm`` key for the ``(n_obs, 2)`` coordinates.
    n_neighbors, min_dist, metric, random_state
        umap-learn settings.
    copy
        Return a modified copy.
    overwrite
        Replace ``obsm[key_added]`` even when cellkit did not write it.
    """
    check_adata(adata, what="cellkit.analysis.umap")
    out_key = key_added or f"{use_rep}_umap"
    check_keys_free(adata, [("obsm", out_key)], overwrite=overwrite, what="cellkit.analysis.umap")
    if use_rep not in adata.obsm:
        raise DataError(f"obsm[{use_rep!r}] does not exist; run cellkit.embed_cells(adata, model) first.")
    x, ok = finite_embedding(adata.obsm[use_rep], what=f"obsm[{use_rep!r}]")
    if ok.sum() < 3:
        raise DataError(f"UMAP needs at least 3 embedded cells; obsm[{use_rep!r}] has {int(ok.sum())}.")
    import umap as umap_learn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        reducer = umap_learn.UMAP(
            n_neighbors=min(n_neighbors, int(ok.sum()) - 1),
            min_dist=min_dist,
            metric=metric,
            random_state=random_state,
        )
        coords = reducer.fit_transform(x[ok])
    full = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
    full[ok] = coords
    target = adata.copy() if copy else adata
    target.obsm[out_key] = full
    record_written(target, [("obsm", out_key)])
    return target if copy else None
