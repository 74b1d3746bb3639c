"""Collate per-cell items into padded batches whose keys are :meth:`cellkit.CellModel.forward` kwargs.

:class:`Collator` pads a list of cells to the longest one (right padding), optionally truncates and
rounds the width up, and optionally masks the batch for pretraining:

``masking="values"``
    scGPT's masked value prediction: a fixed number of expression values per cell are replaced by
    ``mask_value``; targets are the original values.
``masking="tokens"``
    BERT / Geneformer masked language modelling: token ids are selected with ``mlm_probability``
    and replaced 80 / 10 / 10 by ``<mask>`` / a random gene / themselves.
``masking="phenotypic"``
    PerturbGene's phenotypic MLM over bin tokens, gene token types and phenotype tokens.

Every random decision is a hash of ``(seed, epoch, cell key, position)`` (see
:mod:`cellkit.data._hashing`), never a draw from a stream, so a cell gets the same mask in any
batch, any order, with any number of DataLoader workers or ranks. :func:`scgpt_random_mask_value`
is the exception: it reproduces scGPT 0.2.4's ``random_mask_value`` draw for draw, for parity
checks against scGPT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from cellkit._errors import DataError
from cellkit._utils._batch import FORWARD_KEYS

from ._hashing import uniform_hash

__all__ = ["FORWARD_KEYS", "Collator", "scgpt_random_mask_value"]

MaskingMode = Literal["values", "tokens", "phenotypic"]
MASKING_MODES = ("values", "tokens", "phenotypic")
#: label of positions that carry no MLM target (``torch.nn.CrossEntropyLoss(ignore_index=-100)``)
IGNORE_INDEX = -100

# stream ids: the last hash key, so that the decisions of one cell never share a draw
_TOK_SELECT, _TOK_ACTION, _TOK_RANDOM = 1, 2, 3
_PG_GENE, _PG_SWAP, _PG_SEQUENCE, _PG_PHENO, _PG_DROP, _PG_DRAW, _PG_RANK = 4, 5, 6, 7, 8, 9, 10

_MASK64 = (1 << 64) - 1
#: Collator fields :meth:`Collator.for_tokens` takes from the tokens' ``options`` when present
_OPTION_FIELDS = ("vocab_size", "gene_type_offset", "n_gene_types", "num_bins", "bin_0_id")


@dataclass
class Collator:
    """Pad (and optionally mask) a list of cells into one batch.

    Items are mappings with ``gene_ids`` ``(n_i,)`` (or ``input_ids``), optionally ``values``
    ``(n_i,)``, ``token_type_ids`` ``(n_i,)``, and the scalars ``index``, ``cell_key``, ``labels``,
    ``batch_labels`` — what :class:`~cellkit.data.dataset.CellDataset` and
    :class:`~cellkit.data.dataset.ShardStreamDataset` yield. Per-token arrays of an item must be
    present in every item of the batch or in none. The batch keys in :data:`FORWARD_KEYS` are the
    model's forward inputs (the trainer and inference pass exactly those); the others are targets.

    Parameters
    ----------
    pad_id
        Token id written at padding (and at dropped phenotype tokens).
    pad_value
        Value written at padding.
    max_len
        Keep at most this many tokens per cell: the first ``max_len`` (truncation from the end).
    pad_to_multiple_of
        Round the batch width up to a multiple of this (tensor-core friendly); the width never
        exceeds ``max_len``.
    masking
        ``None`` (no masking), ``"values"``, ``"tokens"`` or ``"phenotypic"``; see the module
        docstring and the options below.
    mask_ratio
        ``"values"``: fraction of the eligible positions to mask.
    mask_value
        ``"values"``: value written at masked positions (scGPT: ``-1``).
    keep_first_n_tokens
        ``"values"``: the first positions of every cell are never masked (default 1: ``<cls>``).
    value_sampling
        ``"values"``: ``"exact"`` masks exactly ``int(n_eligible * mask_ratio)`` positions per
        cell (scGPT's ``random_mask_value``); ``"bernoulli"`` masks each eligible position
        independently with probability ``mask_ratio`` (scGPT's pretraining ``DataCollator``).
    mlm_probability
        ``"tokens"``: probability that a non-special, non-pad position is selected.
    replace_probs
        ``"tokens"``: of the selected positions, the fractions that become ``mask_id`` and a random
        non-special token; the rest keep their id (BERT: ``(0.8, 0.1)``).
    mask_id
        ``"tokens"`` / ``"phenotypic"``: id of the ``<mask>`` token.
    vocab_size
        ``"tokens"``: random replacement ids are drawn from ``[0, vocab_size)`` minus ``special_ids``.
    special_ids
        Token ids that are never masked (``"tokens"``) nor drawn as random replacements.
    gene_type_offset
        ``"phenotypic"``: first token type of a gene (``1 + n_categories``). Type 0 marks special
        tokens, types ``1 … gene_type_offset - 1`` phenotype tokens.
    n_gene_types
        ``"phenotypic"``: number of gene identities (gene types are
        ``gene_type_offset … gene_type_offset + n_gene_types - 1``).
    num_bins
        ``"phenotypic"``: number of expression bins above ``bin_0``.
    bin_0_id
        ``"phenotypic"``: token id of ``bin_0`` (not expressed), the label of swapped-in genes.
    gene_mask_prob, phenotype_mask_prob, phenotype_drop_prob, swap_sequence_prob
        ``"phenotypic"`` rates, see :meth:`mask_phenotypic`.
    seed
        Seed of every random decision.
    epoch
        Part of every random decision; change it with :meth:`set_epoch` so each epoch gets new
        masks (the DataLoader re-sends the collator to its workers at every epoch unless
        ``persistent_workers=True``).
    return_tensors
        Return ``torch.Tensor`` (default) or numpy arrays.

    Notes
    -----
    The output has the :meth:`cellkit.CellModel.forward` kwargs ``gene_ids`` ``(B, L)`` int64,
    ``values`` ``(B, L)`` float32 (items with values), ``padding_mask`` ``(B, L)`` bool (True at
    padding), ``token_type_ids`` ``(B, L)`` int64 and ``batch_labels`` ``(B,)`` int64 (when the
    items carry them); plus the targets ``labels`` ``(B,)`` int64, ``index`` ``(B,)`` int64 and,
    with masking, ``target_values`` ``(B, L)`` float32 + ``mlm_mask`` ``(B, L)`` bool
    (``"values"``) or ``mlm_labels`` ``(B, L)`` int64 with ``-100`` where there is no target
    (``"tokens"``, ``"phenotypic"``).

    Masking needs a key per cell: the item's ``cell_key`` (a hash of the cell name) or, when
    absent, its ``index``.

    Examples
    --------
    >>> items = [{"gene_ids": np.array([9, 1, 2]), "values": np.array([0.0, 3, 5]), "index": 0},
    ...          {"gene_ids": np.array([9, 4]), "values": np.array([0.0, 2]), "index": 1}]
    >>> batch = Collator(pad_id=0, pad_value=-2)(items)
    >>> batch["gene_ids"].tolist(), batch["padding_mask"].tolist()
    ([[9, 1, 2], [9, 4, 0]], [[False, False, False], [False, False, True]])
    """

    pad_id: int = 0
    pad_value: float = 0.0
    max_len: int | None = None
    pad_to_multiple_of: int | None = None
    masking: MaskingMode | None = None
    # -- "values" (scGPT)
    mask_ratio: float = 0.15
    mask_value: float = -1.0
    keep_first_n_tokens: int = 1
    value_sampling: Literal["exact", "bernoulli"] = "exact"
    # -- "tokens" (BERT / Geneformer)
    mlm_probability: float = 0.15
    replace_probs: tuple[float, float] = (0.8, 0.1)
    mask_id: int | None = None
    vocab_size: int | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)
    # -- "phenotypic" (PerturbGene)
    gene_type_offset: int | None = None
    n_gene_types: int | None = None
    num_bins: int | None = None
    bin_0_id: int | None = None
    gene_mask_prob: float = 0.15
    phenotype_mask_prob: float = 0.5
    phenotype_drop_prob: float = 0.1
    swap_sequence_prob: float = 0.9
    # -- all
    seed: int = 0
    epoch: int = 0
    return_tensors: bool = True

    def __post_init__(self) -> None:
        self.special_ids = frozenset(int(i) for i in self.special_ids)
        self.replace_probs = tuple(float(p) for p in self.replace_probs)  # type: ignore[assignment]
        if self.masking not in (None, *MASKING_MODES):
            raise DataError(
                f"Unknown masking {self.masking!r}; use None, 'values', 'tokens' or 'phenotypic'."
            )
        if self.max_len is not None and self.max_len < 1:
            raise DataError(f"max_len must be >= 1 (or None for no limit), got {self.max_len}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1 (or None), got {self.pad_to_multiple_of}.")
        if self.keep_first_n_tokens < 0:
            raise DataError(f"keep_first_n_tokens must be >= 0, got {self.keep_first_n_tokens}.")
        if self.value_sampling not in ("exact", "bernoulli"):
            raise DataError(f"value_sampling must be 'exact' or 'bernoulli', got {self.value_sampling!r}.")
        for name in (
            "mask_ratio",
            "mlm_probability",
            "gene_mask_prob",
            "phenotype_mask_prob",
            "phenotype_drop_prob",
            "swap_sequence_prob",
        ):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise DataError(f"{name} must be a probability in [0, 1], got {p}.")
        if len(self.replace_probs) != 2 or min(self.replace_probs) < 0 or sum(self.replace_probs) > 1:
            raise DataError(
                f"replace_probs must be two non-negative fractions (mask, random) summing to <= 1, "
                f"got {self.replace_probs}."
            )
        if self.masking == "tokens":
            self._require("mask_id", "vocab_size")
            if self.vocab_size < 1 or len(self._random_ids()) == 0:
                raise DataError(
                    f"vocab_size={self.vocab_size} leaves no non-special token to draw random replacements from."
                )
        if self.masking == "phenotypic":
            self._require("mask_id", "gene_type_offset", "n_gene_types", "num_bins", "bin_0_id")
            if self.gene_type_offset < 1 or self.n_gene_types < 1 or self.num_bins < 1:
                raise DataError(
                    "gene_type_offset, n_gene_types and num_bins must all be >= 1 for phenotypic masking "
                    f"(got {self.gene_type_offset}, {self.n_gene_types}, {self.num_bins})."
                )
            if self.swap_sequence_prob > 0 and self.swap_fraction > 1:
                raise DataError(
                    f"The swap fraction 1 / (num_bins + 1) / swap_sequence_prob = {self.swap_fraction:.3f} "
                    "exceeds 1; raise swap_sequence_prob or num_bins."
                )

    def _require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise DataError(
                f"masking={self.masking!r} needs {', '.join(missing)}; pass them, or build the collator with "
                "Collator.for_tokens(tokens, ...) to read them from the tokens."
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_tokens(cls, tokens: Any, **kwargs: Any) -> Collator:
        """A collator for these tokens: pad id / value, ``<mask>`` id and special ids read from them.

        Parameters
        ----------
        tokens
            A :class:`~cellkit.data.tokenized.TokenizedCells` or
            :class:`~cellkit.data.tokenized.ShardedTokens` (anything with ``specials``,
            ``pad_value`` and ``options`` or a ``manifest``).
        **kwargs
            Any :class:`Collator` field; overrides what is read from the tokens. ``vocab_size``,
            ``gene_type_offset``, ``n_gene_types``, ``num_bins`` and ``bin_0_id`` are also taken
            from the tokens' scheme options when present there.
        """
        specials: Mapping[str, int] = dict(getattr(tokens, "specials", {}) or {})
        if "pad" not in specials and "pad_id" not in kwargs:
            raise DataError(
                f"These tokens name no pad token (specials: {dict(specials) or 'none'}); pass pad_id=... ."
            )
        options = getattr(tokens, "options", None)
        if options is None:
            options = getattr(tokens, "manifest", {}).get("options", {})
        defaults: dict[str, Any] = {
            "pad_value": float(getattr(tokens, "pad_value", 0.0)),
            "special_ids": frozenset(int(i) for i in specials.values()),
        }
        if "pad" in specials:
            defaults["pad_id"] = int(specials["pad"])
        if "mask" in specials:
            defaults["mask_id"] = int(specials["mask"])
        for name in _OPTION_FIELDS:
            if options.get(name) is not None:
                defaults[name] = options[name]
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise DataError(f"Collator has no option(s) {sorted(unknown)}; see help(Collator).")
        return cls(**(defaults | kwargs))

    def set_epoch(self, epoch: int) -> None:
        """Use the masks of ``epoch`` from now on."""
        self.epoch = int(epoch)

    @property
    def swap_fraction(self) -> float:
        """``"phenotypic"``: fraction of masked gene positions swapped in a swapping sequence."""
        return 1.0 / ((self.num_bins or 0) + 1) / max(self.swap_sequence_prob, 1e-12)

    def _random_ids(self) -> np.ndarray:
        ids = np.arange(self.vocab_size or 0, dtype=np.int64)
        return ids[~np.isin(ids, np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids)))]

    # ------------------------------------------------------------------ collation
    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``items`` into one batch; see the class docstring for the keys."""
        batch = self.pad(items)
        if self.masking is not None:
            keys = _cell_keys(items)
            if self.masking == "values":
                self.mask_values(batch, keys)
            elif self.masking == "tokens":
                self.mask_tokens(batch, keys)
            else:
                self.mask_phenotypic(batch, keys)
        if self.return_tensors:
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        return batch

    def pad(self, items: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Pad / truncate ``items`` into numpy arrays (no masking).

        Returns
        -------
        ``gene_ids`` ``(B, L)`` int64, ``values`` ``(B, L)`` float32, ``padding_mask`` ``(B, L)`` bool,
        ``token_type_ids`` ``(B, L)`` int64 and the scalars ``batch_labels`` / ``labels`` /
        ``index`` ``(B,)`` int64, each when the items have it.
        """
        if len(items) == 0:
            raise DataError("Cannot collate an empty list of cells.")
        seqs: dict[str, list[np.ndarray]] = {}
        for name in ("gene_ids", "values", "token_type_ids"):
            got = [_field(item, name) for item in items]
            present = [g is not None for g in got]
            if any(present) and not all(present):
                raise DataError(
                    f"{sum(present)} of {len(items)} cells have {name!r} and the others do not; "
                    "every cell of a batch must carry the same fields."
                )
            if all(present):
                seqs[name] = [np.asarray(g).reshape(-1) for g in got]
        if "gene_ids" not in seqs:
            raise DataError(
                f"The items have no 'gene_ids' (keys: {sorted(items[0])}); collate tokenized cells, "
                "e.g. from CellDataset."
            )
        raw = np.array([len(s) for s in seqs["gene_ids"]], dtype=np.int64)
        for name, arrs in seqs.items():
            lens = np.array([len(a) for a in arrs])
            if not np.array_equal(lens, raw):
                bad = int(np.flatnonzero(lens != raw)[0])
                raise DataError(
                    f"Cell {bad} has {lens[bad]} {name} but {raw[bad]} gene_ids; they must match."
                )
        lengths = raw if self.max_len is None else np.minimum(raw, self.max_len)
        width = int(lengths.max())
        if self.pad_to_multiple_of is not None:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            if self.max_len is not None:
                width = min(width, self.max_len)
        b = len(items)
        rows = np.repeat(np.arange(b), lengths)
        cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        fill = {
            "gene_ids": (self.pad_id, np.int64),
            "values": (self.pad_value, np.float32),
            "token_type_ids": (0, np.int64),
        }
        out: dict[str, np.ndarray] = {}
        for name, arrs in seqs.items():
            value, dtype = fill[name]
            arr = np.full((b, width), value, dtype=dtype)
            if len(rows):
                arr[rows, cols] = np.concatenate([a[:n] for a, n in zip(arrs, lengths)]).astype(
                    dtype, copy=False
                )
            out[name] = arr
        out["padding_mask"] = np.arange(width)[None, :] >= lengths[:, None]
        # scalars
        for name in ("batch_labels", "labels", "index"):
            got = [item.get(name) for item in items]
            present = [g is not None for g in got]
            if any(present) and not all(present):
                raise DataError(f"{sum(present)} of {len(items)} cells have {name!r} and the others do not.")
            if all(present):
                out[name] = np.asarray([int(g) for g in got], dtype=np.int64)
        order = ("gene_ids", "values", "padding_mask", "token_type_ids", "batch_labels", "labels", "index")
        return {k: out[k] for k in order if k in out}

    # ------------------------------------------------------------------ masking
    def mask_values(self, batch: dict[str, np.ndarray], keys: np.ndarray) -> None:
        """scGPT masked value prediction, in place on a padded numpy ``batch``.

        Eligible positions of a cell are its real (non-pad) tokens after the first
        ``keep_first_n_tokens``. With ``value_sampling="exact"`` exactly
        ``int(n_eligible * mask_ratio)`` of them are masked: those with the smallest
        ``uniform_hash(seed, epoch, key, position)``; with ``"bernoulli"`` those whose draw is below
        ``mask_ratio``. Masked values become ``mask_value``. Unlike scGPT's ``random_mask_value``
        (see :func:`scgpt_random_mask_value`), eligibility follows the cell's length, not its values:
        ``<cls>`` is excluded by ``keep_first_n_tokens`` whatever its value, and zero-valued genes
        are eligible.

        Adds ``target_values`` ``(B, L)`` float32 (the values before masking) and ``mlm_mask``
        ``(B, L)`` bool (True where masked); ``values`` is overwritten.
        """
        if "values" not in batch:
            raise DataError(
                "masking='values' needs per-token values; these cells have none (rank-only scheme?)."
            )
        values = batch["values"]
        b, width = values.shape
        pos = np.arange(width)
        eligible = ~batch["padding_mask"] & (pos[None, :] >= self.keep_first_n_tokens)
        u = uniform_hash(self.seed, self.epoch, keys[:, None], pos[None, :])
        if self.value_sampling == "bernoulli":
            mask = eligible & (u < self.mask_ratio)
        else:
            n_mask = (eligible.sum(axis=1) * self.mask_ratio).astype(np.int64)  # floor, like int()
            ranked = np.where(eligible, u, np.inf)
            mask = np.zeros((b, width), dtype=bool)
            for row in np.flatnonzero(n_mask > 0):
                # the n smallest draws; padding (inf) is never among them, so the width does not matter
                mask[row, np.argpartition(ranked[row], n_mask[row] - 1)[: n_mask[row]]] = True
        batch["target_values"] = values.copy()
        values[mask] = self.mask_value
        batch["mlm_mask"] = mask

    def mask_tokens(self, batch: dict[str, np.ndarray], keys: np.ndarray) -> None:
        """BERT / Geneformer masked language modelling, in place on a padded numpy ``batch``.

        Each non-pad position whose id is not in ``special_ids`` is selected with probability
        ``mlm_probability``. A selected position becomes ``mask_id`` with probability
        ``replace_probs[0]``, a random non-special id from ``[0, vocab_size)`` with probability
        ``replace_probs[1]``, and keeps its id otherwise. Adds ``mlm_labels`` ``(B, L)`` int64: the
        original id at selected positions, ``-100`` elsewhere.
        """
        ids = batch["gene_ids"]
        pos = np.arange(ids.shape[1])[None, :]
        k = keys[:, None]
        special = np.isin(ids, np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids)))
        eligible = ~batch["padding_mask"] & ~special
        selected = eligible & (
            uniform_hash(self.seed, self.epoch, k, pos, _TOK_SELECT) < self.mlm_probability
        )
        batch["mlm_labels"] = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
        action = uniform_hash(self.seed, self.epoch, k, pos, _TOK_ACTION)
        p_mask, p_random = self.replace_probs
        to_mask = selected & (action < p_mask)
        to_random = selected & (action >= p_mask) & (action < p_mask + p_random)
        pool = self._random_ids()
        draw = np.floor(uniform_hash(self.seed, self.epoch, k, pos, _TOK_RANDOM) * len(pool)).astype(np.int64)
        ids[to_mask] = self.mask_id
        ids[to_random] = pool[draw[to_random]]

    def mask_phenotypic(self, batch: dict[str, np.ndarray], keys: np.ndarray) -> None:
        """PerturbGene's phenotypic MLM, in place on a padded numpy ``batch``.

        Positions are told apart by token type: 0 = special token, ``1 … gene_type_offset - 1`` =
        phenotype token (tissue, cell type, …), ``>= gene_type_offset`` = gene (the id is the
        expression bin token, the type is the gene). Per cell:

        1. Each gene position is masked with probability ``gene_mask_prob``: id → ``mask_id``,
           label = its bin token.
        2. With probability ``swap_sequence_prob`` (0.9) the cell is a *swapping* cell. There each
           masked gene position is, with probability ``1 / (num_bins + 1) / swap_sequence_prob``,
           given the type of a gene that is **not expressed** in the cell (drawn uniformly without
           replacement among ``n_gene_types`` genes minus those present), with label ``bin_0_id``.
           This makes ``bin_0`` about as frequent a target as each expressed bin. When fewer
           unexpressed genes exist than positions to swap, the extra positions stay plain masks.
        3. Each phenotype position is masked with probability ``phenotype_mask_prob`` (0.5): id →
           ``mask_id``, label = its phenotype token. Of those, a fraction ``phenotype_drop_prob``
           (0.1) is *dropped* to mimic missing annotations: id → ``pad_id``, type → 0, label
           ``-100``; the position stays attended (``padding_mask`` False), as in PerturbGene.

        Special tokens and padding are never masked. There is no 80/10/10 replacement. Adds
        ``mlm_labels`` ``(B, L)`` int64 (``-100`` where there is no target) and updates
        ``gene_ids`` and ``token_type_ids``.
        """
        if "token_type_ids" not in batch:
            raise DataError(
                "masking='phenotypic' needs token_type_ids (gene identity per token); these cells have none. "
                "Tokenize with the 'perturbgene' scheme."
            )
        ids, types = batch["gene_ids"], batch["token_type_ids"]
        real = ~batch["padding_mask"]
        pos = np.arange(ids.shape[1])[None, :]
        k = keys[:, None]
        offset = int(self.gene_type_offset)
        is_gene = real & (types >= offset)
        is_pheno = real & (types >= 1) & (types < offset)
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        # 1. genes
        gene_masked = is_gene & (uniform_hash(self.seed, self.epoch, k, pos, _PG_GENE) < self.gene_mask_prob)
        labels[gene_masked] = ids[gene_masked]
        # 2. swaps to unexpressed genes
        swapping = uniform_hash(self.seed, self.epoch, keys, -1, _PG_SEQUENCE) < self.swap_sequence_prob
        swap = (
            gene_masked
            & swapping[:, None]
            & (uniform_hash(self.seed, self.epoch, k, pos, _PG_SWAP) < self.swap_fraction)
        )
        for row in np.flatnonzero(swap.any(axis=1)):
            where = np.flatnonzero(swap[row])
            expressed = types[row, is_gene[row]] - offset
            genes = self._unexpressed(int(keys[row]), expressed, len(where))
            where = where[: len(genes)]
            types[row, where] = genes + offset
            labels[row, where] = self.bin_0_id
        ids[gene_masked] = self.mask_id
        # 3. phenotypes
        pheno_masked = is_pheno & (
            uniform_hash(self.seed, self.epoch, k, pos, _PG_PHENO) < self.phenotype_mask_prob
        )
        labels[pheno_masked] = ids[pheno_masked]
        ids[pheno_masked] = self.mask_id
        dropped = pheno_masked & (
            uniform_hash(self.seed, self.epoch, k, pos, _PG_DROP) < self.phenotype_drop_prob
        )
        ids[dropped] = self.pad_id
        types[dropped] = 0
        labels[dropped] = IGNORE_INDEX
        batch["mlm_labels"] = labels

    def _unexpressed(self, key: int, expressed: np.ndarray, k: int) -> np.ndarray:
        """``k`` distinct gene indices in ``[0, n_gene_types)`` not in ``expressed`` (fewer if none left)."""
        n = int(self.n_gene_types)
        taken = np.zeros(n, dtype=bool)
        taken[expressed[(expressed >= 0) & (expressed < n)]] = True
        n_free = n - int(taken.sum())
        k = min(k, n_free)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if 2 * n_free < n or n <= 4096:
            # few free genes (or a small gene set): rank all free genes by their hash
            free = np.flatnonzero(~taken)
            u = uniform_hash(self.seed, self.epoch, key, free, _PG_RANK)
            return free[np.argsort(u, kind="stable")[:k]]
        # many free genes: rejection sampling over a counter (expected < 2 draws per gene)
        chosen: list[int] = []
        start = 0
        while len(chosen) < k:
            m = 2 * (k - len(chosen)) + 8
            draws = uniform_hash(self.seed, self.epoch, key, np.arange(start, start + m), _PG_DRAW) * n
            start += m
            for g in draws.astype(np.int64).tolist():  # floor: draws are non-negative
                if not taken[g]:
                    taken[g] = True
                    chosen.append(g)
                    if len(chosen) == k:
                        break
        return np.asarray(chosen, dtype=np.int64)


def _field(item: Mapping[str, Any], name: str) -> Any:
    value = item.get(name)
    if value is None and name == "gene_ids":
        value = item.get("input_ids")
    return value


def _cell_keys(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``(B,)`` uint64 hash keys of the cells: ``cell_key`` when every item has one, else ``index``."""
    # signed keys (the int64 view datasets use) wrap to the same uint64 as their unsigned form
    for name in ("cell_key", "index"):
        if all(item.get(name) is not None for item in items):
            return np.asarray([int(item[name]) & _MASK64 for item in items], dtype=np.uint64)
    raise DataError(
        "Masking needs a stable key per cell so masks do not depend on the batch: give every item a "
        "'cell_key' or an 'index' (CellDataset and ShardStreamDataset add both)."
    )


def scgpt_random_mask_value(
    values: np.ndarray,
    *,
    mask_ratio: float = 0.15,
    mask_value: float = -1.0,
    pad_value: float = 0.0,
    rng: np.random.RandomState,
) -> np.ndarray:
    """scGPT 0.2.4's ``random_mask_value``, draw for draw (for parity with scGPT).

    Works on a copy. For each row in order: the eligible positions are those whose value differs
    from ``pad_value`` (with scGPT's ``pad_value=-2`` this **includes** the ``<cls>`` position and
    zero-valued genes); ``int(n_eligible * mask_ratio)`` of them are drawn with
    ``rng.choice(eligible, n, replace=False)`` and set to ``mask_value``. Pass the
    ``np.random.RandomState`` that scGPT's global ``np.random`` would be in (seeded once, after
    preprocessing and tokenization drew from it) to reproduce scGPT's masks exactly.

    Parameters
    ----------
    values
        ``(B, L)`` padded values.
    mask_ratio, mask_value, pad_value
        As in scGPT (there ``pad_value`` defaults to 0; the tutorials pass -2).
    rng
        The legacy numpy generator to draw from (advanced in place).

    Returns
    -------
    ``(B, L)`` float32 masked copy. For masking that does not depend on batch composition use
    ``Collator(masking="values")``.
    """
    if not isinstance(rng, np.random.RandomState):
        raise DataError(
            "scgpt_random_mask_value needs a np.random.RandomState (scGPT draws from the legacy global "
            f"generator), got {type(rng).__name__}."
        )
    out = np.array(values, copy=True)
    if out.ndim != 2:
        raise DataError(f"values must be a (B, L) array, got shape {out.shape}.")
    for i in range(len(out)):
        row = out[i]
        non_padding_idx = np.nonzero(row - pad_value)[0]
        n_mask = int(len(non_padding_idx) * mask_ratio)
        mask_idx = rng.choice(non_padding_idx, n_mask, replace=False)
        row[mask_idx] = mask_value
    return out.astype(np.float32)
