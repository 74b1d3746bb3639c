"""What recording a run (``run.json``) costs at atlas scale: the data fingerprint and the model identity.

What it does
------------
* ``hash_names``: SHA-256 of ``--cells`` obs_names (10x-barcode-like strings) in blocks;
* ``hash_positions``: SHA-256 of the selected cell positions;
* ``data_fingerprint``: the whole fingerprint of an AnnData of ``--cells`` cells × ``--genes`` genes
  (obs / var name hashes, all cells selected), and with a query selection (``cells="batch == 'b1'"``);
* ``model_identity``: config + vocabulary + every weight of an scGPT-size model (``--d-model``,
  ``--layers``, ``--genes`` vocabulary), once per run (embed / predict reuse the fingerprint they
  already compute for the result store);
* ``write_run``: writing the record (atomic).

Each line is the best of ``--repeat`` runs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/run_record_cost.py --cells 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cellkit import CellModel, GeneVocab
from cellkit._utils._run import RunRecord, environment, hash_names, hash_positions, write_run
from cellkit.analysis._runs import data_fingerprint, model_identity
from cellkit.presets import scgpt_config


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=30_000)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    n = a.cells
    names = pd.Index([f"AAACCTGAGAAGGCCT-{i}-sample{i % 97}" for i in range(n)])
    obs = pd.DataFrame({"batch": np.where(np.arange(n) % 2, "b1", "b2")}, index=names)
    adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(a.genes)]))
    genes = list(adata.var_names)
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    model = CellModel(
        scgpt_config(vocab, d_model=a.d_model, n_heads=8, n_layers=a.layers, d_ff=a.d_model, n_bins=51), vocab
    )
    rec = RunRecord(function="cellkit.finetune", environment=environment("cpu"))
    rows = [
        (f"hash_names ({n:,} obs_names)", best(lambda: hash_names(names), a.repeat)),
        (f"hash_positions ({n:,} cells)", best(lambda: hash_positions(np.arange(n)), a.repeat)),
        (f"data_fingerprint ({n:,} × {a.genes:,}, all cells)", best(lambda: data_fingerprint(adata), a.repeat)),
        (
            "data_fingerprint (query cells=\"batch == 'b1'\")",
            best(lambda: data_fingerprint(adata, cells="batch == 'b1'"), a.repeat),
        ),
        (
            f"model_identity ({model.num_parameters() / 1e6:.1f} M parameters)",
            best(lambda: model_identity(model), a.repeat),
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("write_run (atomic, fsync)", best(lambda: write_run(rec, tmp), a.repeat)))
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  seconds")
    for name, sec in rows:
        print(f"{name:<{width}}  {sec:8.3f}")


if __name__ == "__main__":
    main()
