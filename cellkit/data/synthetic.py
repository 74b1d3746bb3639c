"""Small seeded synthetic inputs for tests, docs, benchmarks and the demo job."""

from __future__ import annotations

import numpy as np
import torch

from .vocab import GeneVocab

__all__ = ["synthetic_batch", "synthetic_vocab"]


def synthetic_vocab(n_genes: int, *, specials: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")) -> GeneVocab:
    """``G00000 …`` genes in id order followed by scGPT's special tokens ``<pad>``, ``<cls>``, ``<eoc>``."""
    roles = {"<pad>": "pad", "<cls>": "cls", "<eoc>": "eos", "<mask>": "mask", "<eos>": "eos"}
    tokens = [f"G{i:05d}" for i in range(n_genes)] + list(specials)
    return GeneVocab(tokens, specials={roles[t]: t for t in specials if t in roles})


def synthetic_batch(
    vocab: GeneVocab,
    lengths: list[int] | np.ndarray,
    *,
    seed: int = 0,
    n_bins: int = 51,
    cls_value: float = -2.0,
    pad_value: float = -2.0,
    add_cls: bool = True,
) -> dict[str, torch.Tensor]:
    """A padded batch of random cells in scGPT's input convention.

    Parameters
    ----------
    vocab
        Vocabulary with ``pad`` (and ``cls`` when ``add_cls``) specials.
    lengths
        Real tokens per cell (including ``<cls>``).
    seed
        Seed of the numpy generator.
    n_bins
        Values are integer bins ``1 … n_bins - 1`` stored as float.
    cls_value, pad_value
        Values at ``<cls>`` and at padding.

    Returns
    -------
    ``{"gene_ids": (B, L) int64, "values": (B, L) float32, "padding_mask": (B, L) bool}`` with
    ``L = max(lengths)``.
    """
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in lengths]
    width = max(lengths)
    genes = np.array([i for i, t in enumerate(vocab) if not vocab.is_special(t)])
    ids = np.full((len(lengths), width), vocab.pad_id, dtype=np.int64)
    vals = np.full((len(lengths), width), pad_value, dtype=np.float32)
    for row, n in enumerate(lengths):
        start = 1 if add_cls else 0
        k = n - start
        ids[row, start:n] = rng.choice(genes, size=k, replace=False)
        vals[row, start:n] = rng.integers(1, n_bins, size=k)
        if add_cls:
            ids[row, 0], vals[row, 0] = vocab.cls_id, cls_value
    mask = np.arange(width)[None, :] >= np.asarray(lengths)[:, None]
    return {
        "gene_ids": torch.from_numpy(ids),
        "values": torch.from_numpy(vals),
        "padding_mask": torch.from_numpy(mask),
    }
