"""Peak memory of embedding a token shard directory into an array store (lazy, chunked inference).

A block of synthetic cells (``--genes`` genes, Poisson counts; an scGPT-family model built on
those genes, 1 layer × d_model 16) is tokenized once and repeated, with unique names, into shard
directories of each ``--cells`` count (``ShardWriter``, ``--shard-size`` cells per shard). Each
count is then embedded in a FRESH subprocess with ``cellkit.embed_cells(shards, model,
output=DIR)`` (the path of ``cellkit embed SHARDS --output DIR``); the child reports its wall
time, cells/s and peak RSS (``VmHWM``). Peak RSS should not grow with the number of cells: tokens
are read chunk by chunk from the memory-mapped shards and results go to disk chunk by chunk.

Usage::

    python benchmarks/embed_shards_memory.py [--cells 20000,100000] [--chunk-size 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import cellkit
from cellkit.analysis.embeddings import embed_cells
from cellkit.data.tokenized import open_shards
shards, model_dir, out, chunk, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = cellkit.load_model(model_dir)
tokens = open_shards(shards)
t0 = time.perf_counter()
embed_cells(tokens, model, output=out, chunk_size=chunk, batch_size=batch, progress=False)
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": dt, "cells": len(tokens), "peak_mb": int(hwm) / 1024}))
"""


def build(tmp: Path, counts: list[int], genes: int, shard_size: int) -> tuple[Path, dict[int, Path]]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellkit.data.tokenize import tokenize
    from cellkit.data.tokenized import ShardWriter
    from cellkit.presets import build_model

    r = np.random.default_rng(0)
    names = [f"G{i}" for i in range(genes)]
    block = 2000
    x = r.poisson(r.uniform(0.05, 2.0, size=genes), size=(block, genes)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(block)]),
                       var=pd.DataFrame(index=names))  # fmt: skip
    model = build_model(names, family="scgpt", seed=0, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    model_dir = tmp / "model"
    model.save(model_dir)
    base = tokenize(adata, model, progress=False)
    dirs = {}
    for n in counts:
        writer = ShardWriter(tmp / f"shards{n}", max_shard_samples=shard_size)
        for start in range(0, n, block):
            take = min(block, n - start)
            part = base if take == block else base.subset(np.arange(take))
            writer.add(replace(part, obs_names=np.asarray([f"c{start + i}" for i in range(take)])))
        writer.close()
        dirs[n] = tmp / f"shards{n}"
    return model_dir, dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="20000,100000")
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--shard-size", type=int, default=25_000)
    p.add_argument("--chunk-size", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    counts = [int(c) for c in args.cells.split(",")]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model_dir, dirs = build(tmp, counts, args.genes, args.shard_size)
        rows = []
        for n in counts:
            out = tmp / f"emb{n}"
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(dirs[n]), str(model_dir), str(out), str(args.chunk_size),
                 str(args.batch_size)],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            emb = np.load(out / "X_cellkit.npy", mmap_mode="r")
            assert emb.shape == (n, 16)
            assert np.isfinite(emb[-5:]).all()
            rows.append((n, res["seconds"], n / res["seconds"], res["peak_mb"]))
    print(f"embed_cells(shards, output=DIR): {args.genes} genes, chunk {args.chunk_size}, 1 thread")
    print("| cells | seconds | cells/s | peak RSS MB |")
    print("|---|---|---|---|")
    for n, s, rate, mb in rows:
        print(f"| {n:,} | {s:.1f} | {rate:.0f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
