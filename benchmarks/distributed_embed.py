"""``cellkit embed`` as one process vs ``torchrun --nproc_per_node N`` (gloo on the CPU).

Cells: the shipped demo PBMCs (700 cells, ``.raw``) repeated to ``--cells`` with unique names,
written to an ``.h5ad``; model: the shipped demo model. Each run is a fresh ``cellkit embed``
command into a directory store; the table gives the command's wall time (start-up included) and
the embed stage's own time (what the command prints), and checks that every run's array equals
the first one bit for bit. Runs with ``OMP_NUM_THREADS`` threads per process (default 1: one
core per rank, the configuration whose bits match across process counts).

Usage::

    python benchmarks/distributed_embed.py [--cells 5600] [--nproc 2] [--chunk-size 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(path: Path, n: int) -> None:
    import anndata as ad

    from cellkit.datasets import pbmc_demo

    base = pbmc_demo()
    reps = -(-n // base.n_obs)
    parts = []
    for r in range(reps):
        a = base.copy()
        a.obs_names = [f"{name}-{r}" for name in a.obs_names]
        parts.append(a)
    adata = ad.concat(parts)[:n].copy()
    adata.raw = ad.concat([p.raw.to_adata() for p in parts])[:n].copy()
    adata.write_h5ad(path)


def run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    m = re.search(r"in ([0-9.]+) s", proc.stdout.split("embed   ")[-1])
    return wall, float(m.group(1)) if m else float("nan"), proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=5600)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cells.h5ad"
        make_data(data, args.cells)
        common = ["-m", "cellkit", "embed", str(data), "--model", "demo", "--quiet",
                  "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)]  # fmt: skip
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        runs = [
            ("1 process", [sys.executable, *common], args.threads),
            (f"torchrun {args.nproc} processes (gloo)", [*torchrun, *common], args.threads),
            (f"1 process, {args.nproc} threads", [sys.executable, *common], args.nproc * args.threads),
        ]
        rows, first = [], None
        for i, (name, cmd, threads) in enumerate(runs):
            out = Path(tmp) / f"out{i}"
            wall, stage, _ = run([*cmd, "--output", str(out)], threads)
            emb = np.load(out / "X_cellkit.npy")
            same = "—" if first is None else ("yes" if np.array_equal(emb, first) else "NO")
            first = emb if first is None else first
            rows.append((name, threads, wall, stage, args.cells / stage, same))
    print(f"cellkit embed, demo model, {args.cells} cells, chunk {args.chunk_size}, batch {args.batch_size}")
    print("| run | threads/process | command wall s | embed stage s | cells/s (stage) | bits = 1 process |")
    print("|---|---|---|---|---|---|")
    for name, threads, wall, stage, rate, same in rows:
        print(f"| {name} | {threads} | {wall:.1f} | {stage:.1f} | {rate:.0f} | {same} |")


if __name__ == "__main__":
    main()
