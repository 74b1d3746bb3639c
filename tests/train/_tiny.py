"""A tiny labelled token dataset and model for trainer tests (no AnnData)."""

from __future__ import annotations

import numpy as np
import torch

from cellkit import CellModel
from cellkit.data.collate import Collator
from cellkit.data.synthetic import synthetic_vocab
from cellkit.presets import scgpt_config

N_GENES = 30


class TinyCells(torch.utils.data.Dataset):
    """Cells whose values carry their class (0, 1, 2): learnable in a few steps."""

    def __init__(self, n: int, seed: int = 0, n_classes: int = 3, n_batches: int = 2) -> None:
        r = np.random.default_rng(seed)
        self.items = []
        cls_id = N_GENES + 1  # synthetic_vocab: genes, then <pad>, <cls>, <eoc>
        for i in range(n):
            length = int(r.integers(5, 20))
            lab = i % n_classes
            # a class prefers its own third of the genes and has higher values
            pool = np.r_[np.arange(lab * 10, lab * 10 + 10), r.choice(N_GENES, 10, replace=False)]
            genes = r.choice(np.unique(pool), min(length, len(np.unique(pool))), replace=False)
            vals = r.integers(1, 5, len(genes)).astype(np.float32) + 3 * lab
            self.items.append(
                {
                    "gene_ids": np.r_[cls_id, genes].astype(np.int64),
                    "values": np.r_[0.0, vals].astype(np.float32),
                    "labels": lab,
                    "batch_labels": i % n_batches,
                    "index": i,
                    "cell_key": 1000 + i + 10_000 * seed,
                }
            )
        self.lengths = np.array([len(it["gene_ids"]) for it in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def tiny_model(seed: int = 0, *, dropout: float = 0.1, heads: dict | None = None, **cfg) -> CellModel:
    torch.manual_seed(seed)
    vocab = synthetic_vocab(N_GENES)
    model = CellModel(
        scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=dropout, **cfg), vocab
    )
    for name, opts in (heads if heads is not None else {"classifier": {"n_classes": 3}}).items():
        model.add_head(name, **opts)
    return model


def collator(model: CellModel, **kw) -> Collator:
    return Collator(pad_id=model.vocab.special_id("pad"), pad_value=-2.0, **kw)
