"""In-silico perturbation: delete or overexpress genes in the *tokens* and measure the embedding shift.

Geneformer's ``InSilicoPerturber`` idea (facts §1.6) for any loaded model: each selected cell is
tokenized with the model's own scheme, the token sequence is perturbed (never the expression
matrix), and the cell is embedded again with the model's own pooling (as
:func:`cellkit.embed_cells`). The effect on a cell is the cosine shift
``1 - cos(original, perturbed)``; with a goal group also the shift toward it,
``cos(perturbed, goal mean) - cos(original, goal mean)``.

Per-family rules (:func:`perturb_tokens`)
-----------------------------------------
A cell's sequence is ``[prefix] genes… [suffix]``: the prefix is ``<cls>`` (and TEDDY's annotation
tokens, PerturbGene's phenotype tokens), the suffix ``<eos>`` where the scheme appends one.
Genes of a combination are handled together, in the order given.

``"rank"`` (``geneformer`` and ``teddy`` schemes: the position is the gene's rank)
    *delete*: the gene's token is removed (the sequence shortens by one). *overexpress*: the token
    moves to the first gene position (position 0, or right after ``<cls>`` / the annotations),
    inserted there when the cell lacks the gene; if the cell then exceeds the maximum length
    (``model_input_size`` / ``max_seq_len``, ``<cls>``/``<eos>`` included; :func:`in_silico_perturb`
    also caps it at the model's position embeddings), genes are dropped from
    the *end* of the gene list and ``<eos>`` stays last (Geneformer V2). TEDDY tokens that carry
    values (bins, continuous rank) give the moved gene the cell's highest value (the top rank's).
``"binned"`` (``scgpt`` scheme: values carry the expression, there are no positions)
    *delete*: the gene's token and its value are removed. *overexpress*: the gene's value is set
    to the cell's top value (the largest value among its gene tokens: bin ``n_bins - 1`` for
    scGPT's binning); a gene the cell lacks is inserted at the first gene position (after
    ``<cls>``) with that value. If the cell was at the maximum length (the scheme's ``max_len``,
    when set), the gene with the lowest value (the last one among equals) is dropped to make room;
    the perturbed genes themselves are never dropped. Every occurrence of a gene is perturbed.
``"perturbgene"`` (``perturbgene`` scheme: the token is an expression bin, the token *type* is the
gene)
    *delete*: the token whose type is the gene is removed, with its type. *overexpress*: the gene's
    token becomes the top bin ``bin_{num_bins}`` and moves to the first gene position (after
    ``[CLS]`` and the phenotype tokens; PerturbGene has no positions, so only the bin matters),
    inserted when absent; past ``max_length`` the last gene before ``[EOS]`` is dropped (the
    scheme's own truncation), ``[EOS]`` stays last.

A perturbation that does not apply to a cell (delete of a gene the cell lacks) leaves its tokens
byte-identical; :func:`in_silico_perturb` then reports a shift of exactly 0 without running the
model. Under *delete* a cell counts for a perturbation when it carries *all* of its genes
(Geneformer's filter); under *overexpress* every cell counts.

Null distribution
-----------------
For each perturbed gene, ``n_null`` random genes with matched expression are perturbed the same way
on the same cells: genes are ordered by the fraction of selected cells in which they are a token,
then by their mean level there (value, relative rank or bin), and cut into ``null_bins`` equal
groups; the random genes come from the perturbed gene's group among the genes tokenized in at least
one selected cell, excluding every perturbed gene (combinations draw one gene per member). Each
random perturbation gives one mean shift; the report has their mean and standard deviation, the
z-score ``(shift - null mean) / null std`` and the one-sided empirical p-value
``(1 + #{null >= shift}) / (1 + n_null)`` (for the goal shift too: "moves further toward the goal
than random genes").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from .._anndata import check_adata, check_finite_rows, check_keys_free, record_written
from .._errors import ConfigError, DataError
from .._inference import run_inference
from .._utils import Progress, get_logger, track
from ..data.sources import select_rows
from ..data.tokenize import tokenize
from ..data.tokenized import TokenizedCells
from ..data.vocab import unknown_gene_error
from ..heads import POOLING_MODES
from ..model import CellModel
from .embeddings import pooled_embedding

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["PERTURB_MODES", "RULES", "InSilicoResult", "in_silico_perturb", "perturb_tokens"]

log = get_logger(__name__)

PERTURB_MODES = ("delete", "overexpress")
RULES = ("rank", "binned", "perturbgene")
_RULE_OF_SCHEME = {"geneformer": "rank", "teddy": "rank", "scgpt": "binned", "perturbgene": "perturbgene"}


# ====================================================================================== tokens
@dataclass
class _Layout:
    """Where the genes are in each cell of a :class:`TokenizedCells`."""

    rule: str
    key: np.ndarray  # (T,) int64 gene identity per token (token id, or type for perturbgene); -1 elsewhere
    is_gene: np.ndarray  # (T,) bool
    cell_of: np.ndarray  # (T,) int64
    prefix: np.ndarray  # (n,) leading non-gene tokens
    suffix: np.ndarray  # (n,) trailing non-gene tokens

    @property
    def n_genes(self) -> np.ndarray:
        return np.bincount(self.cell_of[self.is_gene], minlength=len(self.prefix)).astype(np.int64)


def _rule(tokens: TokenizedCells, rule: str | None) -> str:
    if rule is None:
        rule = _RULE_OF_SCHEME.get(tokens.scheme)
        if rule is None:
            raise ConfigError(
                f"Cannot tell the perturbation rule of tokens with scheme {tokens.scheme!r}; pass rule= one of {RULES}."
            )
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}.")
    if rule == "binned" and tokens.values is None:
        raise DataError("The 'binned' rule needs tokens with values (scGPT-style); these have none.")
    if rule == "perturbgene" and tokens.token_type_ids is None:
        raise DataError("The 'perturbgene' rule needs token types (gene identity); these tokens have none.")
    return rule


def _layout(tokens: TokenizedCells, rule: str) -> _Layout:
    n, lengths = len(tokens), tokens.lengths
    starts = tokens.offsets[:-1]
    cell_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pos = np.arange(tokens.n_tokens, dtype=np.int64) - starts[cell_of]
    ids = np.asarray(tokens.gene_ids)
    if rule == "perturbgene":
        types = np.asarray(tokens.token_type_ids).astype(np.int64)
        is_gene = types >= int(tokens.options.get("gene_type_offset", 1))
        key = types
    else:
        specials = np.asarray(sorted(set(tokens.specials.values())), dtype=np.int64)
        is_gene = ~np.isin(ids, specials)
        if tokens.scheme == "teddy":  # <cls> (maybe a custom id) and annotation tokens lead
            o = tokens.options
            n_lead = int(o.get("cls_token_id") is not None) + int(o.get("n_annotation_tokens") or 0)
            is_gene &= pos >= n_lead
        key = ids.astype(np.int64)
    key = np.where(is_gene, key, -1)
    big = np.iinfo(np.int64).max
    prefix = lengths.astype(np.int64).copy()
    suffix = np.zeros(n, dtype=np.int64)
    nonempty = np.flatnonzero(lengths > 0)
    if len(nonempty):
        first = np.minimum.reduceat(np.where(is_gene, pos, big), starts[nonempty])
        last = np.maximum.reduceat(np.where(is_gene, pos, -1), starts[nonempty])
        has = first != big
        prefix[nonempty[has]] = first[has]
        suffix[nonempty[has]] = lengths[nonempty[has]] - 1 - last[has]
        eos = tokens.specials.get("eos")
        empty = nonempty[~has]  # no gene: everything is prefix except a final <eos>
        if eos is not None and len(empty):
            ends = ids[tokens.offsets[empty + 1] - 1] == eos
            suffix[empty[ends]] = 1
            prefix[empty[ends]] -= 1
    return _Layout(rule, key, is_gene, cell_of, prefix, suffix)


def _default_max_len(tokens: TokenizedCells) -> int | None:
    return tokens.max_length


def _top_token(tokens: TokenizedCells) -> int:
    o = tokens.options
    if o.get("bin_0_id") is None or o.get("num_bins") is None:
        raise DataError(
            "These PerturbGene tokens do not record bin_0_id / num_bins; pass top_token= (the id of the top bin)."
        )
    return int(o["bin_0_id"]) + int(o["num_bins"])


def _n_present(lay: _Layout, keys: np.ndarray, n: int) -> np.ndarray:
    hit = lay.is_gene & np.isin(lay.key, keys)
    if not hit.any():
        return np.zeros(n, dtype=np.int64)
    pairs = np.unique(np.stack([lay.cell_of[hit], lay.key[hit]]), axis=1)
    return np.bincount(pairs[0], minlength=n).astype(np.int64)


def _perturb(
    tokens: TokenizedCells,
    keys: np.ndarray,
    mode: str,
    *,
    rule: str,
    max_len: int | None,
    top_token: int | None,
    lay: _Layout | None = None,
) -> tuple[TokenizedCells, np.ndarray, np.ndarray]:
    """Perturbed tokens, whether each cell changed, and how many of ``keys`` each cell carries."""
    lay = _layout(tokens, rule) if lay is None else lay
    n = len(tokens)
    n_present = _n_present(lay, keys, n)
    fields = tokens.fields
    arrays = {f: np.asarray(getattr(tokens, f)) for f in fields}
    if mode == "delete":
        hit = lay.is_gene & np.isin(lay.key, keys)
        removed = np.bincount(lay.cell_of[hit], minlength=n).astype(np.int64)
        keep = ~hit
        new = {f: a[keep] for f, a in arrays.items()}
        lengths = tokens.lengths - removed
        changed = removed > 0
    else:
        new, lengths, changed = _overexpress(tokens, arrays, lay, keys, rule, max_len, top_token)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = replace(
        tokens,
        gene_ids=new["gene_ids"],
        values=new.get("values"),
        token_type_ids=new.get("token_type_ids"),
        offsets=offsets,
        notes=list(tokens.notes),
        rng=None,
    )
    return out, changed, n_present


def _overexpress(
    tokens: TokenizedCells,
    arrays: dict[str, np.ndarray],
    lay: _Layout,
    keys: np.ndarray,
    rule: str,
    max_len: int | None,
    top_token: int | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    n = len(tokens)
    ids, vals, types = arrays["gene_ids"], arrays.get("values"), arrays.get("token_type_ids")
    n_bins = tokens.options.get("n_bins")
    default_top = float(n_bins - 1) if isinstance(n_bins, int | np.integer) and n_bins > 1 else 1.0
    parts: dict[str, list[np.ndarray]] = {f: [] for f in arrays}
    lengths = np.empty(n, dtype=np.int64)
    changed = np.zeros(n, dtype=bool)
    for i in range(n):
        a, b = int(tokens.offsets[i]), int(tokens.offsets[i + 1])
        p, s = a + int(lay.prefix[i]), b - int(lay.suffix[i])
        gk = lay.key[p:s]
        hit = np.isin(gk, keys)
        absent = keys[~np.isin(keys, gk)]
        g_ids = ids[p:s]
        g_vals = None if vals is None else vals[p:s]
        g_types = None if types is None else types[p:s]
        top = float(g_vals.max()) if g_vals is not None and len(g_vals) else default_top
        if rule == "binned":
            ins = {"gene_ids": absent.astype(ids.dtype)}
            new_ids = np.concatenate([ins["gene_ids"], g_ids])
            new_vals = np.concatenate([np.full(len(absent), top, dtype=vals.dtype), g_vals])
            new_vals[len(absent) :][hit] = top
            new_types = (
                None if types is None else np.concatenate([np.zeros(len(absent), types.dtype), g_types])
            )
            droppable = np.concatenate([np.zeros(len(absent), bool), ~hit])
            over = 0 if max_len is None else (b - a) + len(absent) - max_len
            keep = np.ones(len(new_ids), dtype=bool)
            if over > 0 and len(absent):
                cand = np.flatnonzero(droppable)
                # lowest value first; among equal values the last position first
                order = cand[np.lexsort((-cand, new_vals[cand]))]
                keep[order[: min(over, len(absent), len(order))]] = False
            new_ids, new_vals = new_ids[keep], new_vals[keep]
            new_types = None if new_types is None else new_types[keep]
        else:
            if rule == "perturbgene":
                ins_ids = np.full(len(keys), top_token, dtype=ids.dtype)
                ins_types = keys.astype(types.dtype)
            else:
                ins_ids = keys.astype(ids.dtype)
                ins_types = None
                if types is not None:  # keep a present gene's type; 0 for inserted ones
                    ins_types = np.zeros(len(keys), dtype=types.dtype)
                    for j, k in enumerate(keys):
                        where = np.flatnonzero(gk == k)
                        if len(where):
                            ins_types[j] = g_types[where[0]]
            rest = ~hit
            new_ids = np.concatenate([ins_ids, g_ids[rest]])
            new_types = None if types is None else np.concatenate([ins_types, g_types[rest]])
            new_vals = None
            if vals is not None:
                new_vals = np.concatenate([np.full(len(keys), top, dtype=vals.dtype), g_vals[rest]])
            if max_len is not None:
                budget = max_len - (p - a) - (b - s)
                if budget < len(keys):
                    raise ConfigError(
                        f"max_len={max_len} leaves room for {max(budget, 0)} gene(s) after the cell's special "
                        f"tokens, fewer than the {len(keys)} perturbed together."
                    )
                new_ids = new_ids[:budget]
                new_types = None if new_types is None else new_types[:budget]
                new_vals = None if new_vals is None else new_vals[:budget]
        cell = {
            "gene_ids": np.concatenate([ids[a:p], new_ids, ids[s:b]]),
        }
        if vals is not None:
            cell["values"] = np.concatenate([vals[a:p], new_vals, vals[s:b]])
        if types is not None:
            cell["token_type_ids"] = np.concatenate([types[a:p], new_types, types[s:b]])
        lengths[i] = len(cell["gene_ids"])
        changed[i] = lengths[i] != b - a or any(not np.array_equal(cell[f], arrays[f][a:b]) for f in arrays)
        for f in arrays:
            parts[f].append(cell[f].astype(arrays[f].dtype, copy=False))
    new = {
        f: (np.concatenate(parts[f]) if parts[f] else arrays[f][:0]).astype(arrays[f].dtype, copy=False)
        for f in arrays
    }
    return new, lengths, changed


def perturb_tokens(
    tokens: TokenizedCells,
    gene_ids: int | Sequence[int] | np.ndarray,
    mode: Literal["delete", "overexpress"] = "delete",
    *,
    rule: Literal["rank", "binned", "perturbgene"] | None = None,
    max_len: int | Literal["scheme"] | None = "scheme",
    top_token: int | None = None,
) -> TokenizedCells:
    """Delete or overexpress genes in tokenized cells (a pure function; ``tokens`` is not modified).

    Parameters
    ----------
    tokens
        Cells from :func:`cellkit.tokenize`.
    gene_ids
        What identifies each gene in these tokens: its vocabulary token id (``scgpt``,
        ``geneformer``, ``teddy``) or its token type (``perturbgene``: ``gene_type_offset`` + the
        gene's index in the model's gene list). Several ids are perturbed together, in this order.
    mode
        ``"delete"`` or ``"overexpress"``.
    rule
        ``"rank"``, ``"binned"`` or ``"perturbgene"`` (see the module docstring); default from
        ``tokens.scheme`` (``geneformer``/``teddy`` → rank, ``scgpt`` → binned).
    max_len
        Longest sequence after *overexpress* (specials included); ``"scheme"``: the scheme's own
        option recorded in the tokens (``model_input_size``, ``max_seq_len``, ``max_len``,
        ``max_length``); ``None``: no limit.
    top_token
        ``perturbgene``: the bin token an overexpressed gene gets (default ``bin_{num_bins}``).

    Returns
    -------
    New :class:`~cellkit.data.TokenizedCells` (same cells, names and metadata). A cell the
    perturbation does not touch keeps byte-identical token arrays.

    Examples
    --------
    >>> tokens = cellkit.tokenize(adata, model)
    >>> deleted = perturb_tokens(tokens, [model.vocab["CD3E"]], "delete")
    """
    if mode not in PERTURB_MODES:
        raise ConfigError(f"mode must be one of {PERTURB_MODES}, got {mode!r}.")
    keys = np.atleast_1d(np.asarray(gene_ids))
    if not keys.size:
        raise ConfigError("gene_ids is empty; name at least one gene to perturb.")
    if keys.dtype.kind not in "iu" or keys.ndim != 1:
        raise ConfigError(f"gene_ids must be integer token ids (or token types), got {gene_ids!r}.")
    if len(np.unique(keys)) != len(keys):
        raise ConfigError(f"gene_ids lists a gene more than once: {keys.tolist()}.")
    rule = _rule(tokens, rule)
    if isinstance(max_len, str):
        if max_len != "scheme":
            raise ConfigError(f"max_len must be an integer, 'scheme' or None, got {max_len!r}.")
        max_len = _default_max_len(tokens)
    if rule == "perturbgene" and mode == "overexpress" and top_token is None:
        top_token = _top_token(tokens)
    out, _, _ = _perturb(tokens, keys.astype(np.int64), mode, rule=rule, max_len=max_len, top_token=top_token)
    return out


# ====================================================================================== genes
@dataclass
class _GeneSpace:
    """The genes a model can perturb, by name, and how to turn them into token keys."""

    names: list[str]
    index: dict[str, int]
    perturbgene: bool

    def keys(self, names: Sequence[str], tokens: TokenizedCells) -> np.ndarray:
        if self.perturbgene:
            offset = int(tokens.options.get("gene_type_offset", 1))
            return np.asarray([offset + self.index[g] for g in names], dtype=np.int64)
        return np.asarray([self.index[g] for g in names], dtype=np.int64)

    def name_of(self, tokens: TokenizedCells) -> Callable[[int], str]:
        if self.perturbgene:
            offset = int(tokens.options.get("gene_type_offset", 1))
            return lambda k: self.names[int(k) - offset]
        by_id = {v: g for g, v in self.index.items()}
        return lambda k: by_id[int(k)]


def _gene_space(model: CellModel, scheme: str, tokenize_options: Mapping[str, Any]) -> _GeneSpace:
    if scheme == "perturbgene":
        genes = tokenize_options.get("genes")
        if genes is None:
            genes = (getattr(model, "resources", None) or {}).get("genes")
        if genes is None:
            raise DataError(
                "A PerturbGene model needs its gene list (a gene's index there is its token type): pass "
                "tokenize_options={'genes': [...]} or use a model with a 'genes' resource."
            )
        names = [str(g) for g in genes]
        return _GeneSpace(names, {g: i for i, g in enumerate(names)}, perturbgene=True)
    special = set(model.vocab.specials.values())
    stoi = model.vocab.to_dict()
    names = [t for t in model.vocab.tokens if t not in special]
    return _GeneSpace(names, {g: stoi[g] for g in names}, perturbgene=False)


def _perturbations(genes: Any, combos: Any, space: _GeneSpace) -> list[tuple[str, ...]]:
    """The perturbations as tuples of gene names (checked against the model's genes)."""
    if isinstance(combos, bool | np.bool_):
        if genes is None:
            raise ConfigError("Pass genes=[...] (the genes to perturb) or combos=[(g1, g2), ...].")
        gene_list = [genes] if isinstance(genes, str) else list(genes)
        if not gene_list:
            raise ConfigError("genes is empty; name at least one gene to perturb.")
        gene_list = [str(g) for g in gene_list]
        dup = sorted({g for g in gene_list if gene_list.count(g) > 1})
        if dup:
            raise ConfigError(f"genes lists {dup} more than once.")
        perts = [tuple(gene_list)] if combos else [(g,) for g in gene_list]
    else:
        if genes is not None:
            raise ConfigError("Pass genes=[...] or an explicit list combos=[(g1, g2), ...], not both.")
        if isinstance(combos, str) or not isinstance(combos, Sequence) or not len(combos):
            raise ConfigError(
                f"combos must be False, True or a non-empty list of gene tuples, got {combos!r}."
            )
        perts = []
        for c in combos:
            combo = (c,) if isinstance(c, str) else tuple(str(g) for g in c)
            if not combo:
                raise ConfigError("combos holds an empty combination.")
            if len(set(combo)) != len(combo):
                raise ConfigError(f"The combination {combo} lists a gene twice.")
            perts.append(combo)
        if len(set(perts)) != len(perts):
            raise ConfigError("combos lists a combination twice.")
    missing = list(dict.fromkeys(g for p in perts for g in p if g not in space.index))
    if missing:
        what = "model's gene list" if space.perturbgene else "model's vocabulary"
        raise unknown_gene_error(missing, space.names, where=f"the {what}")
    return perts


# ====================================================================================== model runs
def _embedder(
    model: CellModel,
    *,
    pooling: str,
    idx: int | None,
    batch_size: int,
    device: str,
) -> Callable[..., np.ndarray]:
    """``embed(tokens, on_states=None)``: pooled embeddings as :func:`cell_embeddings` computes them.

    ``on_states(index, h, lengths)`` receives each batch's token states (``(B, L, d)`` float32
    numpy, the cells' positions in ``tokens`` and their lengths) of the layer ``idx``.
    """
    normalize = model.config.family == "scgpt"
    same_as_model = idx is None and pooling == model.config.pooling

    def embed(tokens: TokenizedCells, on_states: Callable[..., None] | None = None) -> np.ndarray:
        def fn(out: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            h = out.last_hidden_state if idx is None else out.hidden_states[idx]
            emb = pooled_embedding(model, out, batch, pooling, idx, same_as_model, normalize)
            if on_states is not None:
                index = batch["index"].cpu().numpy()
                on_states(index, h.float().cpu().numpy(), tokens.lengths[index])
            return {"emb": emb}

        res = run_inference(
            model,
            tokens,
            fn,
            heads=(),
            batch_size=batch_size,
            device=device,
            progress=False,
            desc="perturb",
            output_hidden_states=idx is not None,
        )
        return res["emb"].astype(np.float64)

    return embed


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (float64); NaN where a vector is zero."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(a * b, axis=-1) / (na * nb)


# ====================================================================================== null genes
def _gene_levels(tokens: TokenizedCells, lay: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, fraction of cells, mean level) of every gene tokenized in at least one cell."""
    n = len(tokens)
    g = np.flatnonzero(lay.is_gene)
    cells, keys = lay.cell_of[g], lay.key[g]
    if lay.rule == "binned":
        level = np.asarray(tokens.values, dtype=np.float64)[g]
    elif lay.rule == "perturbgene":
        level = np.asarray(tokens.gene_ids, dtype=np.float64)[g]  # bin tokens are consecutive ids
    else:  # relative rank: the first gene 1, the last 0
        n_genes = lay.n_genes
        first = tokens.offsets[:-1] + lay.prefix
        r = g - first[cells]
        level = 1.0 - r / np.maximum(n_genes[cells] - 1, 1)
    uniq, inv = np.unique(keys, return_inverse=True)
    pairs = np.unique(np.stack([cells, keys]), axis=1)
    freq = np.zeros(len(uniq))
    np.add.at(freq, np.searchsorted(uniq, pairs[1]), 1.0)
    mean = np.bincount(inv, weights=level, minlength=len(uniq)) / np.bincount(inv, minlength=len(uniq))
    return uniq, freq / max(n, 1), mean


def _null_draws(
    perts_keys: list[np.ndarray],
    tokens: TokenizedCells,
    lay: _Layout,
    *,
    n_null: int,
    null_bins: int,
    rng: np.random.Generator,
    name_of: Callable[[int], str],
) -> list[np.ndarray]:
    """Per perturbation, an ``(n_null, k)`` array of matched random gene keys."""
    keys, freq, level = _gene_levels(tokens, lay)
    perturbed = np.unique(np.concatenate(perts_keys))
    extra = perturbed[~np.isin(perturbed, keys)]  # perturbed genes no selected cell carries
    all_keys = np.concatenate([keys, extra])
    all_freq = np.concatenate([freq, np.zeros(len(extra))])
    all_level = np.concatenate([level, np.zeros(len(extra))])
    order = np.lexsort((all_keys, all_level, all_freq))  # by frequency, then level, then id
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    bins = rank * null_bins // len(order)
    bin_of = dict(zip(all_keys.tolist(), bins.tolist(), strict=True))
    is_candidate = ~np.isin(all_keys, perturbed) & (all_freq > 0)
    pools = {b: np.sort(all_keys[is_candidate & (bins == b)]) for b in range(null_bins)}
    draws = []
    for pk in perts_keys:
        out = np.empty((n_null, len(pk)), dtype=np.int64)
        used: set[int] = set()
        for j, k in enumerate(pk.tolist()):
            b = bin_of[k]
            pool = pools[b][~np.isin(pools[b], list(used))]
            if len(pool) < n_null:
                raise ConfigError(
                    f"n_null={n_null} random genes matched to {name_of(k)!r} are needed, but its expression group "
                    f"({b + 1} of null_bins={null_bins}) has only {len(pool)} candidate gene(s) in the selected "
                    "cells; lower n_null or null_bins, or select more cells."
                )
            pick = rng.choice(pool, size=n_null, replace=False)
            out[:, j] = pick
            used.update(pick.tolist())
        draws.append(out)
    return draws


# ====================================================================================== statistics
def _stats(observed: float, null: np.ndarray) -> tuple[float, float, float, float]:
    """(null mean, null std, z, one-sided empirical p) of ``observed`` against ``null`` draws."""
    null = null[np.isfinite(null)]
    if not len(null) or not np.isfinite(observed):
        return np.nan, np.nan, np.nan, np.nan
    mean = float(null.mean())
    std = float(null.std(ddof=1)) if len(null) > 1 else np.nan
    z = (observed - mean) / std if np.isfinite(std) and std > 0 else np.nan
    p = (1.0 + float((null >= observed).sum())) / (1.0 + len(null))
    return mean, std, z, p


def _mean(x: np.ndarray, mask: np.ndarray) -> float:
    return float(x[mask].mean()) if mask.any() else np.nan


# ====================================================================================== result
#: the tables of an :class:`InSilicoResult`, in the order of its dict form
RESULT_TABLES = ("summary", "cells", "null", "gene_shifts")


@dataclass
class InSilicoResult:
    """What :func:`in_silico_perturb` returns: its tables and the settings of the run.

    Attributes
    ----------
    summary
        One row per perturbation (and group): ``perturbation`` (genes joined by ``+``), ``genes``
        (comma-separated), ``mode``, [``group``], ``n_cells`` (cells counted: delete → the cells
        carrying all its genes), ``mean_shift``, ``median_shift`` (cosine shift), ``mean_cosine``,
        [``goal_shift``], ``null_mean``, ``null_std``, ``z``, ``p``, ``distinguishable`` [and
        ``goal_null_mean``, ``goal_null_std``, ``goal_z``, ``goal_p``] (NaN without a null).
        ``distinguishable`` is ``True`` when the mean shift is larger than the random genes'
        shifts: one-sided empirical ``p < 0.05`` *and* ``z >= 2``; ``False`` otherwise, and
        always ``False`` without a null (``n_null=0``: nothing to compare with). With ``n_null``
        random genes the smallest possible ``p`` is ``1 / (n_null + 1)``: use ``n_null >= 19``.
    cells
        One row per perturbation and cell: ``perturbation``, ``cell``, [``group``],
        ``n_present``, ``counted``, ``cosine``, ``shift``, [``goal_shift``].
    null
        One row per random perturbation: ``perturbation``, ``draw``, its ``genes``, [``group``],
        ``n_cells``, ``mean_shift``, [``goal_shift``] (empty with ``n_null=0``).
    params
        The settings and counts of the run (plain values: ``mode``, ``perturbations``, ``rule``,
        ``scheme``, ``max_len``, ``pooling``, ``hidden_layer``, ``goal``, ``groupby``,
        ``n_null``, ``null_bins``, ``seed``, ``max_cells``, ``n_cells_selected``, ``n_cells``,
        ``n_cells_without_genes``; ``-1`` / ``""`` for "none").
    gene_shifts
        With ``gene_shifts=True``: per perturbation, the other genes' mean state shift
        (``perturbation``, ``gene``, ``n_cells``, ``mean_shift``), else ``None``.

    Examples
    --------
    >>> res = in_silico_perturb(adata, model, genes=["CD3E"], key_added="perturb")  # doctest: +SKIP
    >>> res.summary  # doctest: +SKIP
    >>> InSilicoResult.from_dict(adata.uns["perturb"]).cells  # doctest: +SKIP
    """

    summary: pd.DataFrame
    cells: pd.DataFrame
    null: pd.DataFrame
    params: dict[str, Any]
    gene_shifts: pd.DataFrame | None = None

    def __repr__(self) -> str:
        shifts = "" if self.gene_shifts is None else f", gene_shifts {len(self.gene_shifts)} rows"
        return (
            f"InSilicoResult({self.params.get('mode', '?')}: {len(self.summary)} summary rows, "
            f"{len(self.cells)} cell rows, {len(self.null)} null rows{shifts})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in ``adata.uns[key_added]``: ``"summary"``, ``"cells"``, ``"null"``,
        ``"gene_shifts"`` (only when computed) and ``"params"``."""
        out: dict[str, Any] = {"summary": self.summary, "cells": self.cells, "null": self.null}
        if self.gene_shifts is not None:
            out["gene_shifts"] = self.gene_shifts
        out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InSilicoResult:
        """Read the dict of :meth:`to_dict` back, e.g. ``InSilicoResult.from_dict(adata.uns[key])``.

        Parameters
        ----------
        data
            A mapping with the frames ``"summary"``, ``"cells"``, ``"null"``, optionally
            ``"gene_shifts"``, and ``"params"``.

        Raises
        ------
        DataError
            When a table is missing or is not a DataFrame.
        """
        if not isinstance(data, Mapping):
            raise DataError(
                f"An in-silico perturbation result is a dict of tables; got {type(data).__name__}."
            )
        missing = [k for k in ("summary", "cells", "null", "params") if k not in data]
        if missing:
            raise DataError(
                f"This is not a stored in-silico perturbation result: it lacks {missing} (it has {sorted(data)})."
            )
        for k in RESULT_TABLES:
            if data.get(k) is not None and not isinstance(data[k], pd.DataFrame):
                raise DataError(f"{k!r} of an in-silico perturbation result must be a DataFrame.")
        return cls(
            summary=data["summary"],
            cells=data["cells"],
            null=data["null"],
            params=dict(data["params"]),
            gene_shifts=data.get("gene_shifts"),
        )


# ====================================================================================== entry point
def in_silico_perturb(
    adata: AnnData,
    model: CellModel,
    *,
    genes: str | Sequence[str] | None = None,
    mode: Literal["delete", "overexpress"] = "delete",
    combos: bool | Sequence[Sequence[str]] = False,
    cells: Any = None,
    goal: Any = None,
    max_cells: int | None = None,
    groupby: str | None = None,
    n_null: int = 0,
    null_bins: int = 10,
    gene_shifts: bool = False,
    pooling: str | None = None,
    hidden_layer: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str | None = None,
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | Progress = True,
) -> InSilicoResult:
    """Delete or overexpress genes in the cells' tokens and measure how the cell embeddings move.

    Geneformer's in-silico perturbation (``InSilicoPerturber`` + ``InSilicoPerturberStats``) for
    any loaded model; the per-family token rules are in :mod:`cellkit.analysis.perturb`. Three
    stages: *plan* (check the perturbations, select and tokenize the cells), *embed* (the
    original cells, the perturbed ones and their random expression-matched counterparts) and
    *summarise* (the tables of :class:`InSilicoResult`).

    Parameters
    ----------
    adata
        Cells with the expression the model's tokenizer expects.
    model
        Any loaded :class:`cellkit.CellModel` (scGPT, Geneformer, TEDDY, PerturbGene-style).
    genes
        Gene(s) to perturb, as the model names them (vocabulary tokens; PerturbGene: its gene list).
    mode
        ``"delete"`` or ``"overexpress"``.
    combos
        ``False``: each gene of ``genes`` on its own; ``True``: all of ``genes`` together as one
        combination; or an explicit list of combinations ``[("G1", "G2"), ("G3",)]`` (then leave
        ``genes`` out).
    cells
        Cells to perturb (mask, positions, names or a query string, see :func:`cellkit.data.select_cells`); default all. Cells with no
        gene token are left out (``params["n_cells_without_genes"]``).
    goal
        Cells of a target state (same kinds of selection); adds the shift toward their mean
        embedding, ``cos(perturbed, goal) - cos(original, goal)``.
    max_cells
        Use at most this many of the selected cells, and of the goal cells: a random subsample
        (seeded by ``seed``, obs order kept); ``None``: all of them.
    groupby
        An ``obs`` column: the summary gets one row per perturbation and group.
    n_null
        Random expression-matched genes per perturbed gene (0: no null distribution); at least
        19 for a perturbation to be called ``distinguishable`` (``p < 0.05``) in the summary.
    null_bins
        Number of expression groups the random genes are matched within.
    gene_shifts
        Also the shift of the other genes' output states, ``1 - cos`` before/after, averaged over
        the counted cells where the gene occurs in both (keeps the selected cells' token states in
        memory: ``n_tokens × d_model`` float32).
    pooling, hidden_layer
        Cell embedding as :func:`cellkit.analysis.cell_embeddings` (default the model's pooling,
        last layer); ``hidden_layer`` also picks the states of ``gene_shifts``.
    batch_size, device
        Inference settings. Results do not depend on the batch size.
    key_added
        Also store the result in ``adata.uns[key_added]`` as the plain dict of
        :meth:`InSilicoResult.to_dict`; default ``None``: nothing is written into ``adata``.
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize`.
    seed
        Seed of the random null genes and of the ``max_cells`` subsample.
    overwrite
        Replace ``uns[key_added]`` even when cellkit did not write it.
    progress
        ``True``: a progress bar over the perturbations (and their random draws); a
        :class:`cellkit.Progress` follows the call and can cancel it (:class:`cellkit.Cancelled`;
        nothing is stored in ``uns``).

    Returns
    -------
    :class:`InSilicoResult`: ``.summary`` (one row per perturbation and group), ``.cells`` (per
    cell), ``.null`` (per random perturbation), ``.gene_shifts`` (when asked) and ``.params``.
    With ``key_added`` the same tables are in ``adata.uns[key_added]``; nothing else of ``adata``
    is written.

    Examples
    --------
    >>> res = in_silico_perturb(adata, model, genes=["CD3E", "LYZ"], mode="delete", n_null=20,
    ...                         goal="bulk_labels == 'CD14+ Monocyte'")
    >>> res.summary.sort_values("mean_shift", ascending=False)
    """
    pooling = _checked_options(
        adata,
        model,
        key_added=key_added,
        overwrite=overwrite,
        mode=mode,
        n_null=n_null,
        null_bins=null_bins,
        batch_size=batch_size,
        max_cells=max_cells,
        pooling=pooling,
    )
    from .embeddings import resolve_hidden_layer

    idx = resolve_hidden_layer(model, hidden_layer)
    plan = _plan(
        adata,
        model,
        genes=genes,
        combos=combos,
        cells=cells,
        goal=goal,
        max_cells=max_cells,
        seed=seed,
        groupby=groupby,
        mode=mode,
        tokenize_options=dict(tokenize_options or {}),
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
    )
    shifts, null_keys = _embed(
        plan,
        model,
        pooling=pooling,
        idx=idx,
        batch_size=batch_size,
        device=device,
        gene_shifts=gene_shifts,
        n_null=n_null,
        null_bins=null_bins,
        seed=seed,
        mode=mode,
        progress=progress,
    )
    settings = {
        "pooling": pooling,
        "hidden_layer": -1 if hidden_layer is None else int(hidden_layer),
        "goal": "" if goal is None else (goal if isinstance(goal, str) else f"{len(plan.goal_rows)} cells"),
        "n_null": int(n_null),
        "null_bins": int(null_bins),
        "seed": int(seed),
        "max_cells": -1 if max_cells is None else int(max_cells),
    }
    result = _summarise(plan, shifts, null_keys, mode=mode, groupby=groupby, settings=settings)
    if key_added is not None:
        adata.uns[key_added] = result.to_dict()
        record_written(adata, [("uns", key_added)])
    return result


# ---------------------------------------------------------------- in_silico_perturb: plan
def _checked_options(
    adata: AnnData,
    model: CellModel,
    *,
    key_added: str | None,
    overwrite: bool,
    mode: str,
    n_null: int,
    null_bins: int,
    batch_size: int,
    max_cells: int | None,
    pooling: str | None,
) -> str:
    """Check the options that need no tokens; returns the pooling (default the model's)."""
    check_adata(adata, what="cellkit.analysis.in_silico_perturb")
    if key_added is not None:
        check_keys_free(
            adata, [("uns", key_added)], overwrite=overwrite, what="cellkit.analysis.in_silico_perturb"
        )
    if mode not in PERTURB_MODES:
        raise ConfigError(f"mode must be one of {PERTURB_MODES}, got {mode!r}.")
    for name, value, low in (
        ("n_null", n_null, 0),
        ("null_bins", null_bins, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    if max_cells is not None and (
        isinstance(max_cells, bool) or not isinstance(max_cells, int | np.integer) or max_cells < 1
    ):
        raise ConfigError(f"max_cells must be a positive integer or None (all cells), got {max_cells!r}.")
    pooling = pooling or model.config.pooling
    if pooling not in POOLING_MODES:
        raise ConfigError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}.")
    return pooling


@dataclass
class _Plan:
    """What to perturb where: the perturbations, the selected cells' tokens and their gene keys."""

    perts: list[tuple[str, ...]]
    space: _GeneSpace
    #: tokenizes rows of the AnnData as the cells were (for the goal cells)
    tokenize_rows: Callable[[np.ndarray], TokenizedCells]
    tokens: TokenizedCells
    rule: str
    lay: _Layout
    names: np.ndarray
    n_selected: int
    n_without: int
    max_len: int | None
    top_token: int | None
    pert_keys: list[np.ndarray]
    name_of: Callable[[int], str]
    group_names: list[str]
    group_codes: np.ndarray
    goal_rows: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.tokens)


def _perturb_scheme(model: CellModel, opts: Mapping[str, Any]) -> str:
    """The tokenization scheme, checked to have a perturbation rule."""
    scheme = opts.get("scheme") or model.config.family
    if scheme not in _RULE_OF_SCHEME:
        raise ConfigError(
            f"This model's tokens have no perturbation rule (scheme {scheme!r}); pass "
            f"tokenize_options={{'scheme': ...}} with one of {sorted(_RULE_OF_SCHEME)}."
        )
    return scheme


def _subsample(rows: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    """At most ``max_cells`` of ``rows``: a seeded random subsample in the original order."""
    if max_cells is None or len(rows) <= max_cells:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=int(max_cells), replace=False))]


def _selected_rows(adata: AnnData, cells: Any, goal: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of the cells to perturb and of the goal cells (``None`` without a goal)."""
    try:
        positions = select_rows(adata.obs, cells)
    except DataError as exc:
        raise DataError(f"cells= selects no usable cells: {exc}") from None
    goal_rows = None
    if goal is not None:
        try:
            goal_rows = select_rows(adata.obs, goal)
        except DataError as exc:
            raise DataError(f"The goal group is empty or invalid (goal={goal!r}): {exc}") from None
    return positions, goal_rows


def _row_tokenizer(
    adata: AnnData,
    model: CellModel,
    opts: Mapping[str, Any],
    *,
    layer: str | None,
    use_raw: bool | None,
    gene_column: str | None,
) -> Callable[[np.ndarray], TokenizedCells]:
    """``tok(rows)``: the in-memory tokens of those rows of ``adata`` (quiet about cells without genes)."""

    def tok(rows: np.ndarray) -> TokenizedCells:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no gene in the vocabulary.*")
            t = tokenize(
                adata,
                model,
                cells=rows,
                layer=layer,
                use_raw=use_raw,
                gene_column=gene_column,
                progress=False,
                **opts,
            )
        return t.to_memory() if not isinstance(t, TokenizedCells) else t

    return tok


def _cells_with_genes(
    tok: Callable[[np.ndarray], TokenizedCells], positions: np.ndarray
) -> tuple[TokenizedCells, str, _Layout, int]:
    """Tokens of the selected cells that carry a gene, their rule and layout, and how many were left out."""
    tokens = tok(positions)
    rule = _rule(tokens, None)
    lay = _layout(tokens, rule)
    with_genes = lay.n_genes > 0
    n_without = int((~with_genes).sum()) + (len(positions) - len(tokens))
    if not with_genes.all():
        tokens = tokens.subset(np.flatnonzero(with_genes))
        lay = _layout(tokens, rule)
    if len(tokens) == 0:
        raise DataError(
            f"None of the {len(positions)} selected cells has a gene in the model's vocabulary; check the gene "
            "identifiers (gene_column=...) or the selection (cells=...)."
        )
    return tokens, rule, lay, n_without


def _max_len(model: CellModel, tokens: TokenizedCells) -> int | None:
    """The longest a perturbed cell may be: the tokens' maximum length, capped by the model's positions."""
    max_len = _default_max_len(tokens)
    n_pos = model.config.encoder.max_position_embeddings
    if n_pos:
        max_len = n_pos if max_len is None else min(max_len, n_pos)
    return max_len


def _groups(
    adata: AnnData, groupby: str | None, cell_pos: np.ndarray, n: int
) -> tuple[list[str], np.ndarray]:
    """Group names and each cell's group code (one unnamed group without ``groupby``)."""
    if groupby is None:
        return [], np.zeros(n, dtype=np.int64)
    labels = adata.obs[groupby].iloc[cell_pos].astype("category").cat.remove_unused_categories()
    return [str(c) for c in labels.cat.categories], labels.cat.codes.to_numpy()


def _plan(
    adata: AnnData,
    model: CellModel,
    *,
    genes: Any,
    combos: Any,
    cells: Any,
    goal: Any,
    max_cells: int | None,
    seed: int,
    groupby: str | None,
    mode: str,
    tokenize_options: dict[str, Any],
    layer: str | None,
    use_raw: bool | None,
    gene_column: str | None,
) -> _Plan:
    """Check the perturbations and the cells, tokenize the cells and find the perturbed genes' keys."""
    opts = tokenize_options
    scheme = _perturb_scheme(model, opts)
    space = _gene_space(model, scheme, opts)
    perts = _perturbations(genes, combos, space)
    if groupby is not None and groupby not in adata.obs.columns:
        raise DataError(f"groupby={groupby!r} is not an obs column; available: {list(adata.obs.columns)}.")
    positions, goal_rows = _selected_rows(adata, cells, goal)
    n_selected = len(positions)
    positions = _subsample(positions, max_cells, seed)
    if goal_rows is not None:
        goal_rows = _subsample(goal_rows, max_cells, seed)
    tok = _row_tokenizer(adata, model, opts, layer=layer, use_raw=use_raw, gene_column=gene_column)
    tokens, rule, lay, n_without = _cells_with_genes(tok, positions)
    names = np.asarray(tokens.obs_names).astype(str)
    cell_pos = adata.obs_names.get_indexer(names)
    max_len = _max_len(model, tokens)
    top_token = _top_token(tokens) if rule == "perturbgene" and mode == "overexpress" else None
    pert_keys = [space.keys(p, tokens) for p in perts]
    name_of = space.name_of(tokens)
    group_names, group_codes = _groups(adata, groupby, cell_pos, len(tokens))
    return _Plan(
        perts=perts,
        space=space,
        tokenize_rows=tok,
        tokens=tokens,
        rule=rule,
        lay=lay,
        names=names,
        n_selected=n_selected,
        n_without=n_without,
        max_len=max_len,
        top_token=top_token,
        pert_keys=pert_keys,
        name_of=name_of,
        group_names=group_names,
        group_codes=group_codes,
        goal_rows=goal_rows,
    )


# ---------------------------------------------------------------- in_silico_perturb: embed
def _embed(
    plan: _Plan,
    model: CellModel,
    *,
    pooling: str,
    idx: int | None,
    batch_size: int,
    device: str,
    gene_shifts: bool,
    n_null: int,
    null_bins: int,
    seed: int,
    mode: str,
    progress: bool | Progress,
) -> tuple[_Shifts, list[np.ndarray]]:
    """Embed the original cells, draw the random null genes, embed every perturbation and draw.

    Returns the recorded shifts and, per perturbation, its ``(n_null, k)`` random gene keys.
    """
    embed = _embedder(model, pooling=pooling, idx=idx, batch_size=batch_size, device=device)
    d_model = model.config.encoder.d_model if gene_shifts else None
    orig, states = _original_embeddings(plan, embed, d_model=d_model)
    goal_mean, orig_goal = _goal_embedding(plan, embed, orig)
    null_keys = (
        _null_draws(
            plan.pert_keys,
            plan.tokens,
            plan.lay,
            n_null=n_null,
            null_bins=null_bins,
            rng=np.random.default_rng(seed),
            name_of=plan.name_of,
        )
        if n_null
        else [np.zeros((0, len(k)), dtype=np.int64) for k in plan.pert_keys]
    )
    n_keys = (
        (plan.tokens.options.get("gene_type_offset", 1) + len(plan.space.names))
        if plan.space.perturbgene
        else len(model.vocab)
    )
    shifts = _Shifts(
        plan,
        embed,
        orig,
        states,
        goal_mean,
        orig_goal,
        n_null=n_null,
        n_keys=n_keys,
        gene_shifts=gene_shifts,
        chunk_cells=max(8 * batch_size, 256),
    )
    _embed_perturbations(plan, shifts, null_keys, mode=mode, progress=progress)
    return shifts, null_keys


def _original_embeddings(
    plan: _Plan, embed: Callable[..., np.ndarray], *, d_model: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The cells' embeddings before perturbation and, with ``d_model`` (gene shifts), their token states."""
    tokens = plan.tokens
    states = None
    if d_model is not None:
        states = np.zeros((tokens.n_tokens, d_model), dtype=np.float32)

        def keep_states(index: np.ndarray, h: np.ndarray, lengths: np.ndarray) -> None:
            for row, (c, m) in enumerate(zip(index.tolist(), lengths.tolist(), strict=True)):
                a = tokens.offsets[c]
                states[a : a + m] = h[row, :m]

        orig = embed(tokens, keep_states)
    else:
        orig = embed(tokens)
    check_finite_rows(orig, what="embeddings", names=tokens.obs_names)
    return orig, states


def _goal_embedding(
    plan: _Plan, embed: Callable[..., np.ndarray], orig: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The goal cells' mean embedding and the original cells' cosine to it (``None`` without a goal)."""
    if plan.goal_rows is None:
        return None, None
    goal_tokens = plan.tokenize_rows(plan.goal_rows)
    goal_lay = _layout(goal_tokens, plan.rule)
    ok = goal_lay.n_genes > 0
    if not ok.any():
        raise DataError(
            f"No cell of the goal group ({len(plan.goal_rows)} cells) has a gene in the model's vocabulary."
        )
    goal_mean = embed(goal_tokens.subset(np.flatnonzero(ok))).mean(axis=0)
    return goal_mean, _cosine(orig, goal_mean[None, :])


class _Shifts:
    """Per perturbation ``p``, slot ``s`` (0: itself, 1…K: its random draws) and cell: the shifts.

    Perturbed cells wait in ``pending`` until ``chunk_cells`` of them can be embedded together.
    """

    def __init__(
        self,
        plan: _Plan,
        embed: Callable[..., np.ndarray],
        orig: np.ndarray,
        states: np.ndarray | None,
        goal_mean: np.ndarray | None,
        orig_goal: np.ndarray | None,
        *,
        n_null: int,
        n_keys: int,
        gene_shifts: bool,
        chunk_cells: int,
    ) -> None:
        P, K, n = len(plan.perts), n_null, plan.n
        self.plan, self.embed, self.orig, self.states = plan, embed, orig, states
        self.goal_mean, self.orig_goal = goal_mean, orig_goal
        self.n_null, self.gene_shifts, self.chunk_cells = n_null, gene_shifts, chunk_cells
        self.shift = np.zeros((P, 1 + K, n))
        self.goal_shift = np.zeros((P, 1 + K, n))
        self.counted = np.zeros((P, 1 + K, n), dtype=bool)
        self.present = np.zeros((P, 1 + K, n), dtype=np.int64)
        self.gs_sum = np.zeros((P, n_keys)) if gene_shifts else None
        self.gs_cnt = np.zeros((P, n_keys)) if gene_shifts else None
        self.pending: list[tuple[int, int, np.ndarray, TokenizedCells]] = []
        self.n_pending = 0

    def add(self, p: int, s: int, sel: np.ndarray, perturbed: TokenizedCells) -> None:
        """Queue the changed cells ``sel`` of job ``(p, s)``; embed the queue once it is large enough."""
        if len(sel):
            self.pending.append((p, s, sel, perturbed.subset(sel)))
            self.n_pending += len(sel)
        if self.n_pending >= self.chunk_cells:
            self.flush()

    def count_unchanged(self, p: int, keys: np.ndarray, changed: np.ndarray) -> None:
        """Counted cells the perturbation leaves as they are: their other genes' shifts are 0."""
        tokens, lay = self.plan.tokens, self.plan.lay
        for c in np.flatnonzero(self.counted[p, 0] & ~changed):
            k = lay.key[tokens.offsets[c] : tokens.offsets[c + 1]]
            k = np.unique(k[(k >= 0) & ~np.isin(k, keys)])
            self.gs_cnt[p, k] += 1.0

    def flush(self) -> None:
        """Embed the queued cells and record their shifts."""
        if not self.pending:
            return
        alone = [job for job in self.pending if self.gene_shifts and job[1] == 0]
        pooled = [job for job in self.pending if not (self.gene_shifts and job[1] == 0)]
        for p, s, sel, pt in alone:  # its token states are compared with the originals
            self._record(p, s, sel, self.embed(pt, self._gene_state_shifts(p, sel, pt)))
        if pooled:  # the other perturbations' cells run together, batched by length
            emb = self.embed(TokenizedCells.concat([pt for *_, pt in pooled]))
            start = 0
            for p, s, sel, _pt in pooled:
                self._record(p, s, sel, emb[start : start + len(sel)])
                start += len(sel)
        self.pending, self.n_pending = [], 0

    def _record(self, p: int, s: int, sel: np.ndarray, emb: np.ndarray) -> None:
        self.shift[p, s, sel] = 1.0 - _cosine(self.orig[sel], emb)
        if self.goal_mean is not None:
            self.goal_shift[p, s, sel] = _cosine(emb, self.goal_mean[None, :]) - self.orig_goal[sel]

    def _gene_state_shifts(self, p: int, orig_cells: np.ndarray, pert: TokenizedCells) -> Callable[..., None]:
        """Accumulate ``1 - cos`` of the other genes' states of perturbation ``p`` (counted cells)."""
        tokens, lay, states = self.plan.tokens, self.plan.lay, self.states
        counted, gs_sum, gs_cnt = self.counted, self.gs_sum, self.gs_cnt
        pl = _layout(pert, self.plan.rule)
        skip = self.plan.pert_keys[p]

        def on_states(index: np.ndarray, h: np.ndarray, lengths: np.ndarray) -> None:
            for row, (q, m) in enumerate(zip(index.tolist(), lengths.tolist(), strict=True)):
                c = int(orig_cells[q])
                if not counted[p, 0, c]:  # e.g. a combination only partly present under delete
                    continue
                a0, b0 = tokens.offsets[c], tokens.offsets[c + 1]
                a1 = pert.offsets[q]
                k0, k1 = lay.key[a0:b0], pl.key[a1 : a1 + m]
                u0, i0 = np.unique(k0, return_index=True)
                u1, i1 = np.unique(k1, return_index=True)
                common, j0, j1 = np.intersect1d(u0, u1, assume_unique=True, return_indices=True)
                ok = (common >= 0) & ~np.isin(common, skip)
                x0 = states[a0 + i0[j0[ok]]].astype(np.float64)
                x1 = h[row, i1[j1[ok]]].astype(np.float64)
                np.add.at(gs_sum[p], common[ok], 1.0 - _cosine(x0, x1))
                np.add.at(gs_cnt[p], common[ok], 1.0)

        return on_states


def _embed_perturbations(
    plan: _Plan, shifts: _Shifts, null_keys: list[np.ndarray], *, mode: str, progress: bool | Progress
) -> None:
    """Perturb the cells for every perturbation and random draw, embed them and record the shifts."""
    jobs = [(p, s) for p in range(len(plan.perts)) for s in range(1 + shifts.n_null)]
    with track(progress, total=len(jobs), desc="perturbing genes", unit="perturbation") as bar:
        for p, s in jobs:
            keys = plan.pert_keys[p] if s == 0 else null_keys[p][s - 1]
            perturbed, changed, n_present = _perturb(
                plan.tokens,
                keys,
                mode,
                rule=plan.rule,
                max_len=plan.max_len,
                top_token=plan.top_token,
                lay=plan.lay,
            )
            shifts.present[p, s] = n_present
            shifts.counted[p, s] = n_present == len(keys) if mode == "delete" else True
            if shifts.gene_shifts and s == 0:
                shifts.count_unchanged(p, keys, changed)
            sel = np.flatnonzero(changed)
            shifts.add(p, s, sel, perturbed)
            bar.advance(1)
        shifts.flush()


# ---------------------------------------------------------------- in_silico_perturb: summarise
def _summarise(
    plan: _Plan,
    shifts: _Shifts,
    null_keys: list[np.ndarray],
    *,
    mode: str,
    groupby: str | None,
    settings: Mapping[str, Any],
) -> InSilicoResult:
    """The tables of the recorded shifts and the run's parameters (``settings`` plus the plan's counts)."""
    summary, null_frame = _summary_frames(plan, shifts, null_keys, mode=mode, groupby=groupby)
    params = {
        "mode": mode,
        "perturbations": ["+".join(c) for c in plan.perts],
        "rule": plan.rule,
        "scheme": plan.tokens.scheme,
        "max_len": -1 if plan.max_len is None else int(plan.max_len),
        "groupby": groupby or "",
        **settings,
        "n_cells_selected": int(plan.n_selected),
        "n_cells": int(plan.n),
        "n_cells_without_genes": int(plan.n_without),
    }
    return InSilicoResult(
        summary=summary,
        cells=_cells_frame(plan, shifts, groupby=groupby),
        null=null_frame,
        params=params,
        gene_shifts=_gene_shifts_frame(plan, shifts) if shifts.gene_shifts else None,
    )


#: a perturbation's shift is "distinguishable" from random genes' when p < this and z >= DISTINGUISHABLE_Z
DISTINGUISHABLE_P = 0.05
#: see :data:`DISTINGUISHABLE_P`
DISTINGUISHABLE_Z = 2.0


def _distinguishable(z: float, p: float) -> bool:
    """Whether a shift stands out from its null: ``p < 0.05`` and ``z >= 2`` (``False`` with NaN)."""
    return bool(p < DISTINGUISHABLE_P and z >= DISTINGUISHABLE_Z)


def _summary_row(
    shifts: _Shifts,
    p: int,
    combo: tuple[str, ...],
    gname: str | None,
    gmask: np.ndarray,
    *,
    mode: str,
    groupby: str | None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One summary row (perturbation ``p`` in one group) and its random draws' mean shifts and goal shifts."""
    shift, goal_shift, counted, K = shifts.shift, shifts.goal_shift, shifts.counted, shifts.n_null
    m0 = counted[p, 0] & gmask
    obs_shift = _mean(shift[p, 0], m0)
    row: dict[str, Any] = {"perturbation": "+".join(combo), "genes": ",".join(combo), "mode": mode}
    if groupby:
        row["group"] = gname
    row.update(
        {
            "n_cells": int(m0.sum()),
            "mean_shift": obs_shift,
            "median_shift": float(np.median(shift[p, 0][m0])) if m0.any() else np.nan,
            "mean_cosine": _mean(1.0 - shift[p, 0], m0),
        }
    )
    null_shift = np.array([_mean(shift[p, s], counted[p, s] & gmask) for s in range(1, 1 + K)])
    null_goal = np.array([_mean(goal_shift[p, s], counted[p, s] & gmask) for s in range(1, 1 + K)])
    if shifts.goal_mean is not None:
        row["goal_shift"] = _mean(goal_shift[p, 0], m0)
    row.update(zip(("null_mean", "null_std", "z", "p"), _stats(obs_shift, null_shift), strict=True))
    row["distinguishable"] = _distinguishable(row["z"], row["p"])
    if shifts.goal_mean is not None:
        row.update(
            zip(
                ("goal_null_mean", "goal_null_std", "goal_z", "goal_p"),
                _stats(row["goal_shift"], null_goal),
                strict=True,
            )
        )
    return row, null_shift, null_goal


def _null_rows(
    plan: _Plan,
    shifts: _Shifts,
    null_keys: list[np.ndarray],
    p: int,
    gname: str | None,
    gmask: np.ndarray,
    null_shift: np.ndarray,
    null_goal: np.ndarray,
    *,
    groupby: str | None,
) -> list[dict[str, Any]]:
    """One row per random draw of perturbation ``p`` in one group."""
    rows = []
    for s in range(1, 1 + shifts.n_null):
        null_row: dict[str, Any] = {
            "perturbation": "+".join(plan.perts[p]),
            "draw": s - 1,
            "genes": ",".join(plan.name_of(k) for k in null_keys[p][s - 1]),
        }
        if groupby:
            null_row["group"] = gname
        null_row["n_cells"] = int((shifts.counted[p, s] & gmask).sum())
        null_row["mean_shift"] = null_shift[s - 1]
        if shifts.goal_mean is not None:
            null_row["goal_shift"] = null_goal[s - 1]
        rows.append(null_row)
    return rows


def _summary_frames(
    plan: _Plan, shifts: _Shifts, null_keys: list[np.ndarray], *, mode: str, groupby: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary (one row per perturbation and group) and the null frame (one row per random draw)."""
    group_list: list[tuple[str | None, np.ndarray]] = (
        [(g, plan.group_codes == i) for i, g in enumerate(plan.group_names)]
        if groupby
        else [(None, np.ones(plan.n, bool))]
    )
    rows, null_rows = [], []
    for p, combo in enumerate(plan.perts):
        for gname, gmask in group_list:
            row, null_shift, null_goal = _summary_row(
                shifts, p, combo, gname, gmask, mode=mode, groupby=groupby
            )
            rows.append(row)
            null_rows += _null_rows(
                plan, shifts, null_keys, p, gname, gmask, null_shift, null_goal, groupby=groupby
            )
    summary = pd.DataFrame(rows)
    null_columns = ["perturbation", "draw", "genes", *(["group"] if groupby else []), "n_cells", "mean_shift"]
    null_frame = pd.DataFrame(
        null_rows, columns=[*null_columns, *(["goal_shift"] if shifts.goal_mean is not None else [])]
    )
    return summary, null_frame


def _cells_frame(plan: _Plan, shifts: _Shifts, *, groupby: str | None) -> pd.DataFrame:
    """The per-cell frame of the perturbations themselves (not of their random draws)."""
    P, n = len(plan.perts), plan.n
    shift = shifts.shift
    per_cell: dict[str, Any] = {
        "perturbation": np.repeat(["+".join(c) for c in plan.perts], n),
        "cell": np.tile(plan.names, P),
    }
    if groupby:
        per_cell["group"] = np.tile(
            np.asarray([plan.group_names[c] if c >= 0 else "" for c in plan.group_codes]), P
        )
    per_cell.update(
        {
            "n_present": shifts.present[:, 0].ravel(),
            "counted": shifts.counted[:, 0].ravel(),
            "cosine": 1.0 - shift[:, 0].ravel(),
            "shift": shift[:, 0].ravel(),
        }
    )
    if shifts.goal_mean is not None:
        per_cell["goal_shift"] = shifts.goal_shift[:, 0].ravel()
    return pd.DataFrame(per_cell)


def _gene_shifts_frame(plan: _Plan, shifts: _Shifts) -> pd.DataFrame:
    """Per perturbation, the other genes' mean state shift, largest first."""
    gs_sum, gs_cnt = shifts.gs_sum, shifts.gs_cnt
    gs_rows = []
    for p, combo in enumerate(plan.perts):
        ks = np.flatnonzero(gs_cnt[p] > 0)
        mean = gs_sum[p, ks] / gs_cnt[p, ks]
        for j in np.argsort(-mean, kind="stable"):
            gs_rows.append(
                {
                    "perturbation": "+".join(combo),
                    "gene": plan.name_of(int(ks[j])),
                    "n_cells": int(gs_cnt[p, ks[j]]),
                    "mean_shift": float(mean[j]),
                }
            )
    return pd.DataFrame(gs_rows, columns=["perturbation", "gene", "n_cells", "mean_shift"])
