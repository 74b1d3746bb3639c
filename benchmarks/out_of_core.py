"""Out-of-core fine-tuning from a token shard directory: peak RSS and time per stage vs. cells.

Issue 18's acceptance: fine-tuning a tiny model from a 2,000,000-cell shard directory (synthetic,
real length distribution) for a bounded number of steps keeps the peak RSS ≤ 2 GB, and the peak
at 200,000 cells is the same within 10 %. ``cellkit.finetune`` on a
:class:`cellkit.data.ShardedTokens` never loads the tokens: the split is an index set over the
shards, the label column is read without the token arrays, and the datasets read cells from the
memory-mapped shards.

The shard directories are written with cellkit's own :class:`cellkit.data.tokenized.ShardWriter`
(the writer behind ``cellkit.tokenize(..., output=...)``), in blocks, from a template that
``cellkit.tokenize`` made with the model (so the manifest's scheme, options and specials are the
model's): per cell a ``<cls>`` token then genes drawn from the ``--genes`` vocabulary with binned
values; lengths are log-normal (median ``--median-len`` tokens, sigma ``--sigma``, clipped to
``[16, --max-len]``, roughly what scGPT's tokenizer gives on 10x data with ``max_len=1200``); a
``cell_type`` column with ``--classes`` classes of unequal size and a ``batch`` column ride along.
Tokens are int32 ids + float32 values (8 bytes per token; the shard format's dtypes).

Each cell count is fine-tuned in a FRESH subprocess (``--threads`` torch threads): open the
directory, build ``cellkit.presets.build_model(genes, family="scgpt", d_model=32, n_layers=2,
dropout=0.0, ...)``, then ``cellkit.finetune(shards, model, label_key="cell_type",
max_steps=--steps, batch_size=--batch-size, ...)`` with the fractions ``--val-size`` /
``--test-size`` held out (default 0.05 % each: 100 / 1,000 test cells, predicted at the end; the
stratified split itself runs over all cells). ``dropout=0.0`` lets PyTorch's SDPA take its
memory-efficient CPU kernel; with dropout it takes the math path, which materialises the
``B × H × L × L`` attention (about +1.4 GB at batch 16 × 1,200 tokens): activation memory that
does not depend on the number of cells, but would hide what does.
The child reports the wall time of each stage (setup until the first training step: names check,
label column, split, datasets; the training steps; the held-out evaluation) and the RSS after each
(``VmRSS``), and its peak RSS (``VmHWM`` == ``ru_maxrss``).

Usage::

    python benchmarks/out_of_core.py --cells 200000,2000000 --workdir /tmp/ooc

Options: ``--steps``, ``--batch-size``, ``--median-len``, ``--sigma``, ``--max-len``,
``--genes``, ``--classes``, ``--shard-cells``, ``--threads``, ``--keep`` (keep the shard
directories), ``--bucket`` (``bucket_by_length=True``).
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _model(spec: dict):
    from cellkit.presets import build_model

    genes = [f"G{i:05d}" for i in range(spec["genes"])]
    return build_model(
        genes, family="scgpt", d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0, seed=0
    )


def write_shards(spec: dict, n_cells: int, path: Path) -> dict:
    """Write ``n_cells`` synthetic cells as a shard directory at ``path``; returns sizes and seconds."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import cellkit
    from cellkit.data.tokenized import ShardWriter

    t0 = time.perf_counter()
    model = _model(spec)
    genes = [f"G{i:05d}" for i in range(spec["genes"])]
    tiny = ad.AnnData(
        sp.csr_matrix(np.ones((2, len(genes)), dtype=np.float32)),
        obs=pd.DataFrame({"cell_type": ["a", "b"], "batch": ["x", "y"]}, index=["t0", "t1"]),
        var=pd.DataFrame(index=genes),
    )
    template = cellkit.tokenize(tiny, model, obs_columns=["cell_type", "batch"], progress=False)
    cls_id, cls_value = int(template.gene_ids[0]), float(template.values[0])
    rng = np.random.default_rng(0)
    classes = [f"type{c:02d}" for c in range(spec["classes"])]
    weights = 1.0 / np.arange(1, len(classes) + 1)  # unequal class sizes (Zipf-like)
    weights /= weights.sum()
    writer = ShardWriter(path, max_shard_samples=spec["shard_cells"], overwrite=True)
    block = 50_000
    n_tokens = 0
    try:
        for start in range(0, n_cells, block):
            n = min(block, n_cells - start)
            lengths = np.exp(rng.normal(np.log(spec["median_len"]), spec["sigma"], n))
            lengths = np.clip(np.rint(lengths), 16, spec["max_len"]).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            total = int(offsets[-1])
            gene_ids = rng.integers(0, len(genes), total, dtype=np.int32)
            values = rng.integers(1, spec["n_bins"], total).astype(np.float32)
            gene_ids[offsets[:-1]] = cls_id
            values[offsets[:-1]] = cls_value
            obs = pd.DataFrame(
                {
                    "cell_type": pd.Categorical(np.asarray(classes)[rng.choice(len(classes), n, p=weights)]),
                    "batch": pd.Categorical(np.asarray(["b0", "b1", "b2", "b3"])[rng.integers(0, 4, n)]),
                }
            )
            cells = cellkit.data.TokenizedCells(
                gene_ids=gene_ids,
                offsets=offsets,
                values=values,
                obs_names=np.char.add("cell", np.char.zfill(np.arange(start, start + n).astype(str), 8)),
                obs=obs,
                scheme=template.scheme,
                options=template.options,
                specials=template.specials,
                pad_value=template.pad_value,
            )
            writer.add(cells)
            n_tokens += total
            del cells, gene_ids, values, obs
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"write_seconds": time.perf_counter() - t0, "n_tokens": n_tokens}


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
t_import = time.perf_counter()
spec = json.loads(sys.argv[1])
from out_of_core import _model, _status_mb
import numpy as np
import torch
torch.set_num_threads(spec["threads"])
import cellkit
from cellkit.data import open_shards
t_import = time.perf_counter() - t_import
stages = {"import": {"seconds": t_import, "rss_mb": _status_mb("VmRSS")}}
t = time.perf_counter()
shards = open_shards(spec["path"])
model = _model(spec)
stages["open+model"] = {"seconds": time.perf_counter() - t, "rss_mb": _status_mb("VmRSS")}
marks = {}
def cb(event):
    if event.kind == "train_start":
        marks["train_start"] = (time.perf_counter(), _status_mb("VmRSS"), _status_mb("VmHWM"))
    elif event.kind == "finish":
        marks["finish"] = (time.perf_counter(), _status_mb("VmRSS"), _status_mb("VmHWM"))
t = time.perf_counter()
result = cellkit.finetune(shards, model, label_key="cell_type", val_size=spec["val_size"],
                          test_size=spec["test_size"], max_steps=spec["steps"], epochs=1, lr=1e-3,
                          batch_size=spec["batch_size"], bucket_by_length=spec["bucket"], device="cpu",
                          progress=False, callbacks=[cb])
t_end = time.perf_counter()
ts, rs, hs = marks["train_start"]
tf, rf, hf = marks["finish"]
stages["setup (names, labels, split, datasets)"] = {"seconds": ts - t, "rss_mb": rs, "hwm_mb": hs}
stages["train steps"] = {"seconds": tf - ts, "rss_mb": rf, "hwm_mb": hf}
stages["held-out predict"] = {"seconds": t_end - tf, "rss_mb": _status_mb("VmRSS")}
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
steps = len(result.history.step_records)
n_test = int(len(result.confusion) and result.confusion.to_numpy().sum())
print("RESULT " + json.dumps({"stages": stages, "peak_rss_mb": peak, "vmhwm_mb": _status_mb("VmHWM"),
                              "steps": steps, "status": result.status, "n_test": n_test,
                              "accuracy": result.metrics.get("accuracy"), "torch": torch.__version__}))
"""


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec), str(HERE)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="200000,2000000")
    p.add_argument("--workdir", default="/tmp/cellkit-out-of-core")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--median-len", type=float, default=300)
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--max-len", type=int, default=1200)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--n-bins", type=int, default=51)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--shard-cells", type=int, default=100_000)
    p.add_argument("--val-size", type=float, default=0.0005)
    p.add_argument("--test-size", type=float, default=0.0005)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bucket", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--write-only", action="store_true")
    args = p.parse_args()
    spec = {
        k: getattr(args, k)
        for k in (
            "steps",
            "batch_size",
            "median_len",
            "sigma",
            "max_len",
            "genes",
            "n_bins",
            "classes",
            "shard_cells",
            "val_size",
            "test_size",
            "threads",
            "bucket",
        )
    }
    sys.path.insert(0, str(REPO))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(c) for c in args.cells.split(",")):
        path = work / f"shards-{n}"
        info_file = work / f"shards-{n}.json"
        if not (path / "manifest.json").exists() or not info_file.exists():
            info = write_shards(spec, n, path)
            info_file.write_text(json.dumps(info))
        info = json.loads(info_file.read_text())
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
        print(f"{n:,} cells: {info['n_tokens']:,} tokens, {disk:.2f} GiB on disk, written in {info['write_seconds']:.0f} s")
        if args.write_only:
            continue
        res = run_child({**spec, "path": str(path)})
        rows.append((n, info, disk, res))
        print(json.dumps(res, indent=1))
        if not args.keep:
            shutil.rmtree(path)
    if not rows:
        return
    print()
    print(f"{'cells':>10} {'tokens':>14} {'disk GiB':>9} {'write s':>8} {'setup s':>8} {'train s':>8} "
          f"{'ms/step':>8} {'predict s':>9} {'RSS setup':>10} {'RSS train':>10} {'peak RSS MB':>12}")
    for n, info, disk, res in rows:
        st = res["stages"]
        setup = st["setup (names, labels, split, datasets)"]
        train = st["train steps"]
        print(
            f"{n:>10,} {info['n_tokens']:>14,} {disk:>9.2f} {info['write_seconds']:>8.0f} {setup['seconds']:>8.1f} "
            f"{train['seconds']:>8.1f} {1000 * train['seconds'] / max(res['steps'], 1):>8.0f} "
            f"{st['held-out predict']['seconds']:>9.1f} {setup['rss_mb']:>10.0f} {train['rss_mb']:>10.0f} "
            f"{res['peak_rss_mb']:>12.0f}"
        )
    if len(rows) > 1:
        lo, hi = rows[0][3]["peak_rss_mb"], rows[-1][3]["peak_rss_mb"]
        print(f"peak RSS at {rows[-1][0]:,} cells / at {rows[0][0]:,} cells: {hi / lo:.3f}")


if __name__ == "__main__":
    main()
