"""Tokenizing a TileDB-SOMA experiment (the CELLxGENE Census format) into shards, with peak memory.

Builds (once, in ``--workdir``) a local SOMA experiment of ``--cells`` synthetic cells ×
``--genes`` genes with the SOMA write API, 100,000 cells per write (so building it needs
little memory either; ``X`` tiles are 2,048 cells × all genes): ``obs`` with Census-like columns (``obs_id``, ``tissue_general``, ``cell_type``,
``is_primary_data``), ``var`` (``feature_id``, ``feature_name``) and ``ms["RNA"].X["raw"]`` with
raw counts; genes per cell are log-uniform between ``--min-genes`` and ``--max-genes`` (Census
cells have a few hundred to a few thousand), common genes more often than rare ones. Then, for
each scheme, a fresh subprocess runs

    cellkit.tokenize(SomaSource(uri, obs_filter=...), vocab, output=..., obs_columns=["cell_type"])

and reports cells/s (wall clock), the process's CPU seconds (``resource.getrusage``: on a shared,
loaded machine wall time overstates the work) and its own peak RSS (``VmHWM``; ``ru_maxrss`` of
an exec'd child can carry the parent's peak).

Usage::

    python benchmarks/soma_tokenize.py --cells 100000
    python benchmarks/soma_tokenize.py --cells 1000000 --schemes scgpt,geneformer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import cellkit
from cellkit import GeneVocab
from cellkit.data import SomaSource
uri, out, scheme, n_genes, obs_filter, chunk = sys.argv[1:7]
n_genes, chunk = int(n_genes), int(chunk)
obs_filter = None if obs_filter == "-" else obs_filter
genes = [f"GENE{i:05d}" for i in range(n_genes)]
if scheme == "geneformer":
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    vocab = GeneVocab(["<pad>", "<mask>", "<cls>", "<eos>", *ids],
                      specials={"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"})
    kw = {"resources": {"gene_median": {g: 1.0 + (i % 7) for i, g in enumerate(ids)}}}  # feature_id, by default
else:
    vocab = GeneVocab([*genes, "<pad>", "<cls>", "<eoc>"], specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"})
    kw = {"max_len": 1200}
t0 = time.perf_counter()
shards = cellkit.tokenize(SomaSource(uri, obs_filter=obs_filter), vocab, scheme=scheme, output=out,
                          obs_columns=["cell_type"], overwrite=True, progress=False, chunk_size=chunk,
                          max_shard_samples=100_000, **kw)
dt = time.perf_counter() - t0
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": dt, "cpu_seconds": usage.ru_utime + usage.ru_stime, "ru_maxrss_mb": usage.ru_maxrss / 1024, "cells": len(shards), "tokens": shards.manifest["n_tokens"],
                  "shards": shards.n_shards, "peak_rss_mb": peak_kb / 1024}))
"""

TISSUES = np.array(["blood", "lung", "brain", "liver", "kidney"])
CELL_TYPES = np.array(["T cell", "B cell", "monocyte", "NK cell", "neuron", "hepatocyte", "epithelial cell"])


def build_experiment(
    uri: str,
    n_cells: int,
    n_genes: int,
    min_genes: int,
    max_genes: int,
    *,
    block: int = 50_000,
    seed: int = 0,
) -> int:
    """Write the experiment with the SOMA API, ``block`` cells per write; returns the number of nonzeros."""
    import pyarrow as pa
    import tiledbsoma as soma

    rng = np.random.default_rng(seed)
    obs_schema = pa.schema(
        [
            ("soma_joinid", pa.int64()),
            ("obs_id", pa.large_string()),
            ("tissue_general", pa.large_string()),
            ("cell_type", pa.large_string()),
            ("is_primary_data", pa.bool_()),
        ]
    )
    var_schema = pa.schema(
        [("soma_joinid", pa.int64()), ("feature_id", pa.large_string()), ("feature_name", pa.large_string())]
    )
    nnz = 0
    with soma.Experiment.create(uri) as exp:
        obs = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n_cells - 1)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", soma.Measurement)
        var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, n_genes - 1)])
        var.write(
            pa.table(
                {
                    "soma_joinid": np.arange(n_genes, dtype=np.int64),
                    "feature_id": [f"ENSG{i:011d}" for i in range(n_genes)],
                    "feature_name": [f"GENE{i:05d}" for i in range(n_genes)],
                },
                schema=var_schema,
            )
        )
        x_coll = rna.add_new_collection("X")
        # tiles of 2,048 cells × all genes, row-major: a block sorted by (cell, gene) is then in the
        # array's global order and is written without TileDB re-sorting it (sort_coords=False), about
        # 15x faster to build on this machine; reading is tiledbsoma's either way
        layout = {"dims": {"soma_dim_0": {"tile": 2048}, "soma_dim_1": {"tile": n_genes}}}
        layout |= {"cell_order": "row-major", "tile_order": "row-major"}
        x = x_coll.add_new_sparse_ndarray(
            "raw", type=pa.float32(), shape=(n_cells, n_genes), platform_config={"tiledb": {"create": layout}}
        )
        in_order = {"tiledb": {"write": {"sort_coords": False}}}
        for start in range(0, n_cells, block):
            n = min(block, n_cells - start)
            ids = np.arange(start, start + n, dtype=np.int64)
            obs.write(
                pa.table(
                    {
                        "soma_joinid": ids,
                        "obs_id": [f"cell{i:08d}" for i in ids],
                        "tissue_general": TISSUES[rng.integers(0, len(TISSUES), n)],
                        "cell_type": CELL_TYPES[rng.integers(0, len(CELL_TYPES), n)],
                        "is_primary_data": rng.random(n) < 0.9,
                    },
                    schema=obs_schema,
                )
            )
            k = np.exp(rng.uniform(np.log(min_genes), np.log(max_genes), n)).astype(np.int64)
            rows = np.repeat(np.arange(n, dtype=np.int64), k)
            cols = (n_genes * rng.random(len(rows)) ** 2).astype(np.int64)  # common genes more often
            key = np.sort(rows * n_genes + cols)
            key = key[np.r_[True, key[1:] != key[:-1]]]  # one entry per (cell, gene)
            del rows, cols
            counts = (rng.negative_binomial(1, 0.3, size=len(key)) + 1).astype(np.float32)
            x.write(
                pa.table(
                    {
                        "soma_dim_0": key // n_genes + start,
                        "soma_dim_1": key % n_genes,
                        "soma_data": counts,
                    }
                ),
                platform_config=in_order,
            )
            nnz += len(key)
            del key, counts
    return nnz


def _du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--min-genes", type=int, default=200)
    p.add_argument("--max-genes", type=int, default=2_000)
    p.add_argument("--schemes", default="scgpt,geneformer")
    p.add_argument("--obs-filter", default="is_primary_data == True", help="'-' for all cells")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--workdir", default="benchmarks/_out")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    uri = work / f"soma_{args.cells}x{args.genes}_{args.min_genes}-{args.max_genes}_v2"
    if not uri.exists():
        t0 = time.perf_counter()
        nnz = build_experiment(str(uri), args.cells, args.genes, args.min_genes, args.max_genes)
        (uri.parent / f"{uri.name}.nnz").write_text(str(nnz))
        print(
            f"built {uri} ({_du(uri):.2f} GB, {nnz:,} nonzeros) in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    nnz_file = uri.parent / f"{uri.name}.nnz"
    nnz = int(nnz_file.read_text()) if nnz_file.exists() else 0
    print(
        f"# SOMA → shards — {args.cells:,} cells × {args.genes:,} genes, {nnz / args.cells:,.0f} nonzeros/cell "
        f"(log-uniform {args.min_genes:,}–{args.max_genes:,}), local experiment {_du(uri):.2f} GB; obs_filter "
        f"{args.obs_filter!r}; chunk_size {args.chunk_size}; npy shards of 100,000 cells; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    print("| scheme | cells | cells/s | seconds | CPU s (process) | tokens | shards | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme in args.schemes.split(","):
        out = work / f"soma-shards-{scheme}"
        cmd = [sys.executable, "-c", CHILD, str(uri), str(out), scheme, str(args.genes), args.obs_filter]
        r = subprocess.run([*cmd, str(args.chunk_size)], capture_output=True, text=True)
        if r.returncode:
            print(f"| {scheme} | failed: {r.stderr.strip().splitlines()[-1]} | | | | | | |")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(
            f"| {scheme} | {res['cells']:,} | {res['cells'] / res['seconds']:,.0f} | {res['seconds']:.0f} | "
            f"{res['cpu_seconds']:.0f} | "
            f"{res['tokens']:,} | {res['shards']} | {res['peak_rss_mb']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
