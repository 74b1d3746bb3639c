"""Streaming cell embedding of a large backed ``.h5ad``: cells/s and peak memory.

This benchmark is about **streaming memory**, not compute: it checks that
``cellkit.embed_cells`` on an ``anndata.read_h5ad(path, backed="r")`` atlas keeps the process's
peak RSS bounded (the goal: ≤ 2 GB for 200,000 cells) while it tokenizes ``--chunk-size`` cells at
a time, runs the encoder and fills ``obsm``. Embedding 200k cells with the 12 × 512 whole-human
shape on a 2-core CPU would take many hours, so the model is small (default 1 layer × d_model 64,
4 heads, d_ff 128) and cells are sampled to ``--max-len`` tokens (scGPT's ``max_len`` tokenize
option); the encoder's memory does not depend on the number of cells either way.

The input is the synthetic atlas of ``benchmarks/tokenize_stream.py`` (``--cells`` × ``--genes`` ×
``--nnz`` nonzero raw counts per cell, CSR float32, in ``--workdir``; built there with the same
code if missing). The model is ``cellkit.presets.build_model(var_names, family="scgpt", ...,
seed=0)``, i.e. its vocabulary is the file's genes. Each ``--embed`` count (the first N cells of
the file, via ``cells=``; default: all) runs in a FRESH subprocess, which reports its wall time,
cells/s and its own peak RSS (``VmHWM`` from ``/proc/self/status``), plus the RSS after opening
the file and building the model (base). Several counts show whether memory grows with the number
of cells (only the ``(n_obs, d_model)`` float32 ``obsm`` output should).

Usage::

    python benchmarks/embed_stream.py                                   # all 200,000 cells
    python benchmarks/embed_stream.py --embed 25000,50000,100000,200000 # RSS vs cells

Options: ``--d-model``, ``--n-layers``, ``--n-heads``, ``--d-ff``, ``--max-len``,
``--batch-size``, ``--chunk-size``, ``--threads`` (torch threads in the child), ``--repeats``
(fresh processes per count; the fastest is reported, the largest peak RSS), ``--only`` (a
comma-separated subset of the ``--embed`` counts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
def vmhwm_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
def vmrss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
import numpy as np
import torch
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
import anndata as ad
import cellkit
from cellkit.presets import build_model
t_open = time.perf_counter()
adata = ad.read_h5ad(spec["path"], backed="r")
model = build_model(list(adata.var_names), family="scgpt", d_model=spec["d_model"], n_heads=spec["n_heads"],
                    n_layers=spec["n_layers"], d_ff=spec["d_ff"], seed=0)
t_open = time.perf_counter() - t_open
n = spec["cells"]
cells = None if n >= adata.n_obs else np.arange(n)
base_rss, base_hwm = vmrss_mb(), vmhwm_mb()
t0, c0 = time.perf_counter(), time.process_time()
cellkit.embed_cells(adata, model, cells=cells, chunk_size=spec["chunk_size"], batch_size=spec["batch_size"],
                    device="cpu", tokenize_options={"max_len": spec["max_len"]}, progress=False)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
emb = adata.obsm["X_cellkit"]
done = int((~np.isnan(emb).any(axis=1)).sum())
assert done == n, (done, n)
print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "cells": done, "open_seconds": t_open,
                              "obsm_mb": emb.nbytes / 2**20, "base_rss_mb": base_rss, "base_hwm_mb": base_hwm,
                              "peak_rss_mb": vmhwm_mb(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters())}))
"""


def run_child(spec: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit status {proc.returncode}: {' | '.join(tail)[-400:]}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000, help="cells in the atlas file")
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000)
    p.add_argument("--embed", default=None, help="comma-separated numbers of cells to embed (default: all)")
    p.add_argument("--only", default=None, help="comma-separated subset of the --embed counts")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument(
        "--max-len", type=int, default=256, help="tokens per cell incl. <cls> (longer cells sampled)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per count (fastest reported)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--workdir", type=Path, default=HERE / "_out")
    args = p.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"atlas_{args.cells}x{args.genes}x{args.nnz}.h5ad"
    if not path.exists():  # the tokenize_stream.py atlas: build it with that script's code
        sys.path.insert(0, str(HERE))
        from tokenize_stream import build_atlas

        t0 = time.perf_counter()
        build_atlas(path, args.cells, args.genes, args.nnz)
        print(f"built {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    counts = [int(x) for x in (args.embed or str(args.cells)).split(",")]
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        counts = [c for c in counts if c in keep]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for n in counts:
        spec = {
            "path": str(path),
            "cells": n,
            "d_model": args.d_model,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "d_ff": args.d_ff,
            "max_len": args.max_len,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "threads": args.threads,
        }
        runs = []
        for i in range(args.repeats):
            print(f"[{n:,} cells] run {i + 1}/{args.repeats} …", file=sys.stderr, flush=True)
            runs.append(run_child(spec, args.timeout))
            r = runs[-1]
            msg = r.get("error") or f"{r['seconds']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
            print(f"[{n:,} cells]   {msg}", file=sys.stderr, flush=True)
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append((n, runs[-1]))
            continue
        best = dict(min(ok, key=lambda r: r["seconds"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
        best["all_seconds"] = [round(r["seconds"], 1) for r in ok]
        rows.append((n, best))

    first = next((r for _, r in rows if "error" not in r), {})
    print(
        f"# streaming embedding — backed h5ad {path.name} ({path.stat().st_size / 1e9:.1f} GB), "
        f"scgpt family {args.n_layers} layer(s) × d_model {args.d_model} ({args.n_heads} heads, d_ff {args.d_ff}; "
        f"{first.get('params', 0):,} parameters), max_len {args.max_len}, batch {args.batch_size}, "
        f"chunk {args.chunk_size:,}, torch {first.get('torch', '?')} with {first.get('threads', '?')} thread(s); "
        f"load average at start {load}\n"
    )
    print(
        "| cells embedded | cells/s | seconds | CPU (s) | obsm (MB) | RSS before the call (MB) | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, r in rows:
        if "error" in r:
            print(f"| {n:,} | failed: {r['error']} | | | | | |")
            continue
        print(
            f"| {n:,} | {r['cells'] / r['seconds']:,.0f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
            f"{r['obsm_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['peak_rss_mb']:,.0f} |"
        )
    runs_text = "; ".join(f"{n:,}: {r.get('all_seconds')}" for n, r in rows)
    print(f"\nRuns (s): {runs_text}")
    print(
        f"Command: `python benchmarks/embed_stream.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )


if __name__ == "__main__":
    main()
