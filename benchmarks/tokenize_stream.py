"""Streaming tokenization of a large backed ``.h5ad`` into shards, with peak memory.

Builds (once, in ``--workdir``) a synthetic atlas file of ``--cells`` cells × ``--genes`` genes
with ``--nnz`` nonzero counts per cell (CSR, float32, written block by block so building it
needs little memory either), then runs ``cellkit.tokenize(path, vocab, output=...)`` on it in a
fresh subprocess for each scheme and reports cells/s and the subprocess's own peak RSS (VmHWM).

Usage::

    python benchmarks/tokenize_stream.py --cells 200000 --genes 20000 --nnz 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
import cellkit
from cellkit import GeneVocab
path, out, scheme, n_genes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
genes = [f"G{i:05d}" for i in range(n_genes)]
if scheme == "geneformer":
    vocab = GeneVocab(["<pad>", "<mask>", "<cls>", "<eos>", *genes],
                      specials={"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"})
    kw = {"resources": {"gene_median": {g: 1.0 + (i % 7) for i, g in enumerate(genes)}}}
else:
    vocab = GeneVocab([*genes, "<pad>", "<cls>", "<eoc>"], specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"})
    kw = {"max_len": 1200}
t0 = time.perf_counter()
shards = cellkit.tokenize(path, vocab, scheme=scheme, output=out, overwrite=True, progress=False,
                          max_shard_samples=50_000, **kw)
dt = time.perf_counter() - t0
# the process's own peak (VmHWM): ru_maxrss of an exec'd child can carry the parent's peak
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": dt, "cells": len(shards), "tokens": shards.manifest["n_tokens"],
                  "peak_rss_mb": peak_kb / 1024}))
"""


def build_atlas(
    path: Path, n_cells: int, n_genes: int, nnz: int, *, block: int = 5000, seed: int = 0
) -> None:
    """Write a CSR ``.h5ad`` block by block (anndata's append to a backed sparse dataset)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)

    def make(n: int) -> sp.csr_matrix:
        cols = np.argsort(rng.random((n, n_genes)), axis=1)[:, :nnz]
        cols.sort(axis=1)
        data = (rng.negative_binomial(1, 0.3, size=n * nnz) + 1).astype(np.float32)
        return sp.csr_matrix((data, cols.ravel(), np.arange(n + 1) * nnz), shape=(n, n_genes))

    obs = pd.DataFrame(index=[f"cell{i:07d}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"G{i:05d}" for i in range(n_genes)])
    ad.AnnData(sp.csr_matrix((0, n_genes), dtype=np.float32), var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        del f["X"]
        write_elem(f, "X", make(min(block, n_cells)))
        x = sparse_dataset(f["X"])
        for start in range(block, n_cells, block):
            x.append(make(min(block, n_cells - start)))
        del f["obs"]
        write_elem(f, "obs", obs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000)
    p.add_argument("--schemes", default="scgpt,geneformer")
    p.add_argument("--workdir", default="benchmarks/_out")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"atlas_{args.cells}x{args.genes}x{args.nnz}.h5ad"
    if not path.exists():
        t0 = time.perf_counter()
        build_atlas(path, args.cells, args.genes, args.nnz)
        print(
            f"built {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    print(
        f"# streaming tokenization — {args.cells:,} cells × {args.genes:,} genes × {args.nnz:,} nonzeros/cell, backed h5ad "
        f"({path.stat().st_size / 1e9:.1f} GB) → npy shards\n"
    )
    print("| scheme | cells/s | seconds | tokens | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for scheme in args.schemes.split(","):
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(work / f"shards-{scheme}"), scheme, str(args.genes)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(f"| {scheme} | failed: {r.stderr.strip().splitlines()[-1]} | | | |")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(
            f"| {scheme} | {res['cells'] / res['seconds']:,.0f} | {res['seconds']:.0f} | {res['tokens']:,} | {res['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
