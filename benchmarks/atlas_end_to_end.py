"""An atlas end to end from a backed ``.h5ad``: tokenize → embed (tiny model) → write, per-stage time and peak RSS.

What it does
------------
1. Builds (once, cached in ``--workdir``) a synthetic raw-count atlas of ``--cells`` cells ×
   ``--genes`` genes as one ``.h5ad``: blocks of ``--block`` cells (genes per cell log-uniform in
   ``[--min-genes, --max-genes]``, Poisson counts + 1, CSR) are written as separate files and joined on
   disk with :func:`anndata.experimental.concat_on_disk` (the atlas is never in memory).
2. Builds a tiny scGPT-family model on those genes (1 layer × d_model 16) and saves it.
3. Runs each stage as the CLI a cluster job would, in a FRESH process, and reads the child's peak RSS
   (its own ``VmHWM``, written at exit) and wall time:

   * ``tokenize``: ``cellkit tokenize ATLAS.h5ad --model M --output SHARDS/`` (streams the backed file);
   * ``embed``: ``cellkit embed SHARDS/ --model M --output EMB/`` (lazy shard windows, chunked,
     memory-mappable ``.npy`` store);
   * ``embed→h5ad``: ``cellkit embed ATLAS.h5ad --model M --output ATLAS_EMB.h5ad`` (tokenize + embed +
     write ``obsm`` into a copy of the atlas, X never loaded).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/atlas_end_to_end.py --cells 1000000 [--workdir /tmp/atlas]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_atlas(path: Path, *, cells: int, genes: int, block: int, lo: int, hi: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from anndata.experimental import concat_on_disk

    parts_dir = path.parent / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=[f"G{i:05d}" for i in range(genes)])
    p = rng.dirichlet(np.full(genes, 0.3))  # unequal detection rates
    parts = []
    for start in range(0, cells, block):
        n = min(block, cells - start)
        per_cell = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(per_cell)])
        indices = np.empty(indptr[-1], dtype=np.int32)
        for i in range(n):  # distinct genes per cell, drawn by detection rate
            indices[indptr[i] : indptr[i + 1]] = np.sort(rng.choice(genes, per_cell[i], replace=False, p=p))
        data = (rng.poisson(2.0, indptr[-1]) + 1).astype(np.float32)
        x = sp.csr_matrix((data, indices, indptr), shape=(n, genes))
        obs = pd.DataFrame(
            {"batch": pd.Categorical(rng.choice(["b1", "b2", "b3"], n))},
            index=[f"cell{start + i:08d}" for i in range(n)],
        )
        part = parts_dir / f"part{start // block:05d}.h5ad"
        ad.AnnData(x, obs=obs, var=var).write_h5ad(part)
        parts.append(part)
        print(f"  built {start + n:,} / {cells:,} cells", flush=True)
    tmp = path.with_suffix(".tmp.h5ad")
    concat_on_disk([str(p) for p in parts], str(tmp), max_loaded_elems=50_000_000)
    os.replace(tmp, path)
    shutil.rmtree(parts_dir)


#: runs ``cellkit.cli.main(ARGS)`` and writes the process's own peak RSS (``VmHWM``) at exit; not
#: ``ru_maxrss`` of the child: Linux carries the parent's high-water mark over fork + exec into it
_WRAP = r"""
import atexit, sys
def _peak(path=sys.argv[1]):
    kb = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    open(path, "w").write(kb)
atexit.register(_peak)
from cellkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_stage(name: str, args: list[str], work: Path) -> dict:
    """Run ``cellkit ARGS`` in a fresh process; its wall time, CPU time and its own peak RSS."""
    peak_file = work / f".peak-{name}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAP, str(peak_file), *args])
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)})")
    peak_mb = int(peak_file.read_text()) / 1024
    return {"stage": name, "seconds": wall, "peak_mb": peak_mb, "cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--min-genes", type=int, default=100)
    ap.add_argument("--max-genes", type=int, default=600)
    ap.add_argument("--block", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/cellkit-atlas-e2e")
    ap.add_argument("--stages", default="tokenize,embed,embed-h5ad")
    args = ap.parse_args()

    import cellkit
    from cellkit.presets import build_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    atlas = work / f"atlas_{args.cells}.h5ad"
    if not atlas.exists():
        t0 = time.perf_counter()
        build_atlas(
            atlas, cells=args.cells, genes=args.genes, block=args.block, lo=args.min_genes, hi=args.max_genes
        )
        print(f"built {atlas} in {time.perf_counter() - t0:.0f} s", flush=True)
    model_dir = work / "model"
    if not model_dir.exists():
        names = [f"G{i:05d}" for i in range(args.genes)]
        build_model(names, family="scgpt", seed=0, d_model=16, n_heads=2, n_layers=1, d_ff=32).save(model_dir)

    shards, emb, out_h5ad = work / "shards", work / "emb", work / "atlas_emb.h5ad"
    for p in (shards, emb, out_h5ad):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    common = ["--model", str(model_dir), "--quiet"]
    stages = {
        "tokenize": ["tokenize", str(atlas), "--output", str(shards), *common],
        "embed": ["embed", str(shards), "--output", str(emb), "--batch-size", str(args.batch_size), *common],
        "embed-h5ad": [
            "embed", str(atlas), "--output", str(out_h5ad), "--batch-size", str(args.batch_size), *common
        ],
    }  # fmt: skip
    rows = []
    for name in args.stages.split(","):
        row = run_stage(name, stages[name], work)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ncellkit {cellkit.__version__}, {args.cells:,} cells × {args.genes:,} genes, "
          f"{args.min_genes}–{args.max_genes} genes per cell, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip
    print("| stage | seconds | CPU s | cells/s | peak RSS (MB) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['cpu_s']:.0f} | {args.cells / r['seconds']:,.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
