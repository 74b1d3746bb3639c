"""Cost of out-of-memory recovery on the CPU: training in micro-batches, and ``batch_size="auto"``
into a directory when a chunk has to be computed again.

Run: ``OMP_NUM_THREADS=1 python benchmarks/oom_recovery.py`` (prints a table).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import cellkit
from cellkit import CellModel, GeneVocab
from cellkit._inference import OOM_ABOVE_CELLS_ENV
from cellkit.analysis.atlas import embed_to_output
from cellkit.presets import scgpt_config

N_GENES = 160


def make_adata(n: int) -> ad.AnnData:
    """Cells of ~80-130 expressed genes, three labels."""
    r = np.random.default_rng(0)
    x = r.poisson(r.uniform(0.4, 1.4, size=(n, 1)), size=(n, N_GENES)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": [f"t{i % 3}" for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))


def make_model() -> CellModel:
    genes = [f"G{i}" for i in range(N_GENES)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(0)
    return CellModel(scgpt_config(vocab, d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.0, n_bins=11), vocab)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    adata = make_adata(480)
    rows = []
    opts = {"label_key": "cell_type", "epochs": 1, "batch_size": 32, "max_steps": 8, "progress": False, "val_size": 0.0, "test_size": 0.0}
    cellkit.finetune(adata, make_model(), **opts)  # warm-up (first call's imports and allocations)
    for micro in (None, 16, 8, 4):
        s = timed(lambda micro=micro: cellkit.finetune(adata, make_model(), micro_batch=micro, **opts))
        rows.append((f"finetune 8 steps x 32 cells, micro_batch={micro}", s))
    os.environ[OOM_ABOVE_CELLS_ENV] = "20"
    s = timed(lambda: cellkit.finetune(adata, make_model(), micro_batch="auto", **opts))
    rows.append(("finetune, micro_batch='auto' (32 -> 16 at step 0)", s))
    del os.environ[OOM_ABOVE_CELLS_ENV]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        kw = {"chunk_size": 120, "progress": False}
        rows.append(("embed_to_output 480 cells, batch_size=16", timed(lambda: embed_to_output(adata, make_model(), output=out / "a", batch_size=16, **kw))))
        rows.append(("embed_to_output, batch_size=64", timed(lambda: embed_to_output(adata, make_model(), output=out / "b", batch_size=64, **kw))))
        os.environ[OOM_ABOVE_CELLS_ENV] = "20"
        rows.append(("embed_to_output, 'auto' (64 -> 16 in chunk 0)", timed(lambda: embed_to_output(adata, make_model(), output=out / "c", batch_size="auto", **kw))))
        del os.environ[OOM_ABOVE_CELLS_ENV]
    print(f"{'what':<56} {'seconds':>8}")
    for what, s in rows:
        print(f"{what:<56} {s:>8.2f}")


if __name__ == "__main__":
    main()
