"""Tokenization throughput (cells/s) and peak memory, cellkit vs scGPT's and Geneformer's tokenizers.

What it measures
----------------
One synthetic raw-count ``.h5ad`` (default 20,000 cells × 20,000 genes, ~2,000 nonzero integer
counts per cell, CSR float32; built once and cached in ``benchmarks/_out/`` with matching
Geneformer dictionaries and an scGPT vocabulary) is tokenized by

* ``cellkit.tokenize(adata_in_memory, vocab, scheme=...)`` for each scheme: ``scgpt``
  (``deterministic`` and ``compat``; normalize_total 1e4, log1p, 51 bins, max_len 1200),
  ``geneformer`` (V2: model_input_size 4096, gene medians), ``teddy`` (rank encoding and 51 bins,
  max_seq_len 2048) and ``perturbgene`` (10 shared bins, cell-type token, max_length 2048);
* scGPT 0.2.4 (when ``--scgpt-python`` exists): ``np.random.seed(0)``, ``Preprocessor(...)(adata)``
  (normalize_total 1e4, log1p, binning 51) then ``tokenize_and_pad_batch(adata.layers["X_binned"],
  gene_ids, max_len=1200, vocab=vocab, pad_token="<pad>", pad_value=-2, append_cls=True,
  include_zero_gene=False)`` — the whole Preprocessor + tokenize is the timed call;
* Geneformer ``TranscriptomeTokenizer`` at ff551ee (when ``--geneformer-python`` and
  ``--geneformer-src`` exist): ``tokenize_anndata(path)`` + ``create_dataset(...)`` (V2, 4096,
  special tokens, nproc=1); ``tokenize_anndata`` reads the file itself, so its time includes the
  read, and it is also reported alone.

Every measurement runs in a FRESH subprocess. The child imports its libraries, reads the
``.h5ad`` into memory (timed separately: "read"), runs the same call once on the first 64 cells
(warm-up: lazy imports, numba compilation, first-call caches), then times the call on all cells
with ``time.perf_counter``. Peak RSS is the child's own peak resident memory at the end (``VmHWM``
from ``/proc/self/status``, i.e. ``getrusage(RUSAGE_SELF).ru_maxrss`` without the parent's peak that
Linux folds into ``ru_maxrss`` at exec), so it includes the interpreter, the libraries and the
in-memory AnnData; "base RSS" is the same reading just before the timed call (after the read and
the warm-up). "end-to-end" = read + call. "CPU" is the child's CPU time during the call (all
threads): cellkit's numba kernels use every core while the references run on one, and on a shared
machine CPU time is the steadier number. Inputs are built in a child too, so this process stays
small.

Speed-up: cellkit ``scgpt`` rows ÷ scGPT (Preprocessor + tokenize_and_pad_batch), cellkit
``geneformer`` ÷ Geneformer (tokenize_anndata + create_dataset); the end-to-end speed-up compares
read + call (Geneformer's call already reads the file).

How to run (from the repository root, with cellkit's environment)::

    python benchmarks/tokenize_throughput.py                       # 20k × 20k × 2k, all rows
    python benchmarks/tokenize_throughput.py --cells 2000 --genes 5000 --nnz 500   # quick
    python benchmarks/tokenize_throughput.py --profile --out benchmarks/_out/tokenize_throughput.md

Options: ``--only cellkit-scgpt,gf-ref`` (row keys, see ``--list``), ``--repeats`` /
``--ref-repeats`` (fresh runs per cellkit / reference row), ``--stat median|best`` (which run is
reported: the median, default, or the fastest — on a shared machine the fastest run is the one
least disturbed by other load; use it for both sides), ``--timeout`` (seconds per child; a reference that runs longer is
recorded as such), ``--scgpt-python``, ``--geneformer-python``, ``--geneformer-src`` (missing
interpreters are skipped with a note), ``--threads N`` (NUMBA/OMP/BLAS threads in every child),
``--profile`` (cProfile of the cellkit ``scgpt`` deterministic and ``geneformer`` runs, or the rows
named by ``--profile-rows``, top 15 by tottime, appended to the output; ``.pstats`` files are kept
in ``--workdir``). cProfile sees only the calling thread: time spent in worker threads shows as
``acquire`` of a lock, and a numba kernel is one opaque entry. ``--out`` also writes the markdown
there and the raw numbers next to it (``.json``).

The output records the repository's commit and a hash of the cellkit sources each row imported
(to measure a fixed snapshot while the tree changes, put a copy first on ``PYTHONPATH``).

This file imports only the standard library and numpy at module level, so the reference
interpreters can run it as a child (``--child``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_DIR = HERE / "_out"
SCGPT_HELPERS = REPO / "tests" / "fixtures" / "scgpt" / "make_fixtures.py"
GENEFORMER_HELPERS = REPO / "tests" / "fixtures" / "tokenize" / "make_geneformer_tokens.py"

N_WARMUP = 64
CELL_TYPES = ["T cell", "B cell", "NK cell", "monocyte", "dendritic cell", "platelet", "erythrocyte", "HSC"]
PERTURBGENE_EDGES = [0.5, 1.5, 2.5, 3.5, 5.5, 8.5, 13.5, 21.5, 34.5, 55.5]  # raw counts: 10 bins
SCGPT_PP = dict(
    use_key="X",
    filter_gene_by_counts=False,
    filter_cell_by_counts=False,
    normalize_total=1e4,
    result_normed_key="X_normed",
    log1p=True,
    result_log1p_key="X_log1p",
    subset_hvg=False,
    binning=51,
    result_binned_key="X_binned",
)
SCGPT_TOK = dict(max_len=1200, pad_token="<pad>", pad_value=-2, append_cls=True, include_zero_gene=False)
SCGPT_CELLKIT = dict(normalize_total=1e4, log1p=True, n_bins=51, max_len=1200)

# row key -> (label, kind, scheme, options, reference key)
ROWS: dict[str, tuple[str, str, str | None, dict, str | None]] = {
    "cellkit-scgpt": (
        "cellkit `scgpt` (deterministic)",
        "cellkit",
        "scgpt",
        dict(SCGPT_CELLKIT),
        "scgpt-ref",
    ),
    "cellkit-scgpt-compat": (
        'cellkit `scgpt` (mode="compat")',
        "cellkit",
        "scgpt",
        dict(SCGPT_CELLKIT, mode="compat"),
        "scgpt-ref",
    ),
    "cellkit-geneformer": (
        "cellkit `geneformer` (V2, 4096)",
        "cellkit",
        "geneformer",
        dict(model_input_size=4096),
        "gf-ref",
    ),
    "cellkit-teddy": (
        "cellkit `teddy` (rank, max_seq_len 2048)",
        "cellkit",
        "teddy",
        dict(max_seq_len=2048),
        None,
    ),
    "cellkit-teddy-bins": (
        "cellkit `teddy` (bins=51, max_seq_len 2048)",
        "cellkit",
        "teddy",
        dict(max_seq_len=2048, bins=51),
        None,
    ),
    "cellkit-perturbgene": (
        "cellkit `perturbgene` (10 bins, cell-type token, max_length 2048)",
        "cellkit",
        "perturbgene",
        dict(max_length=2048, bin_edges=PERTURBGENE_EDGES, phenotype_columns=["cell_type"]),
        None,
    ),
    "scgpt-ref": ("scGPT 0.2.4 Preprocessor + tokenize_and_pad_batch", "scgpt-ref", None, {}, None),
    "gf-ref": ("Geneformer tokenize_anndata + create_dataset", "gf-ref", None, {}, None),
}
PROFILED = ("cellkit-scgpt", "cellkit-geneformer")


# ===================================================================================== inputs
def input_paths(n_cells: int, n_genes: int, nnz: int, seed: int, workdir: Path) -> dict[str, Path]:
    stem = f"tt_{n_cells}x{n_genes}x{nnz}_s{seed}"
    return {
        "h5ad": workdir / f"{stem}.h5ad",
        "warmup": workdir / f"{stem}.warmup.h5ad",
        "gf_token": workdir / f"{stem}.gf_token_dictionary.pkl",
        "gf_median": workdir / f"{stem}.gf_gene_median_dictionary.pkl",
        "gf_mapping": workdir / f"{stem}.gf_ensembl_mapping_dict.pkl",
        "scgpt_vocab": workdir / f"{stem}.scgpt_vocab.json",
    }


def gene_names(n_genes: int) -> list[str]:
    width = max(5, len(str(n_genes - 1)))
    return [f"G{i:0{width}d}" for i in range(n_genes)]


def ensembl_ids(n_genes: int) -> list[str]:
    return [f"ENSG{i + 1:011d}" for i in range(n_genes)]


def build_inputs(paths: dict[str, Path], n_cells: int, n_genes: int, nnz: int, seed: int) -> None:
    """Write the synthetic counts and the dictionaries (skipped when all files exist)."""
    if all(p.exists() for p in paths.values()):
        return
    import pickle

    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    log_pop = np.log(rng.lognormal(0.0, 1.0, n_genes))  # how often a gene is detected
    gene_mean = rng.lognormal(0.0, 1.0, n_genes)  # its expression level when detected
    lo, hi = max(1, round(0.8 * nnz)), min(n_genes, round(1.2 * nnz))
    indptr = [np.zeros(1, np.int64)]
    indices, data = [], []
    total = 0
    block = max(1, min(n_cells, (1 << 24) // n_genes))  # ~16M keys per block
    for start in range(0, n_cells, block):
        n = min(block, n_cells - start)
        k = rng.integers(lo, hi + 1, size=n)  # nonzeros per cell
        kmax = int(k.max())
        keys = log_pop[None, :] + rng.gumbel(size=(n, n_genes))  # Gumbel top-k = weighted sampling
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)  # by key, descending
        keep = np.arange(kmax)[None, :] < k[:, None]
        cols = np.where(keep, top, n_genes)
        cols.sort(axis=1)
        cols = cols[cols < n_genes]  # row-major: each row's kept columns, ascending
        rows = np.repeat(np.arange(n), k)
        size_factor = rng.lognormal(0.0, 0.3, n)
        lam = gene_mean[cols] * size_factor[rows] * rng.gamma(2.0, 0.5, size=len(cols))  # NB = Poisson-Gamma
        counts = (rng.poisson(lam) + 1).astype(np.float32)
        indices.append(cols.astype(np.int32))
        data.append(counts)
        indptr.append(total + np.cumsum(k))
        total += int(k.sum())
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n_cells, n_genes)
    )
    X.has_sorted_indices = True
    n_counts = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
    obs = pd.DataFrame(
        {
            "n_counts": n_counts,
            "cell_type": pd.Categorical(np.asarray(CELL_TYPES)[rng.integers(0, len(CELL_TYPES), n_cells)]),
        },
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    genes, ens = gene_names(n_genes), ensembl_ids(n_genes)
    var = pd.DataFrame({"ensembl_id": ens}, index=genes)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    paths["h5ad"].parent.mkdir(parents=True, exist_ok=True)
    tmp = paths["h5ad"].with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    adata[: min(N_WARMUP, n_cells)].copy().write_h5ad(paths["warmup"])
    token = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: 4 + i for i, g in enumerate(ens)}}
    median = {g: float(m) for g, m in zip(ens, rng.lognormal(0.5, 0.8, n_genes))}
    mapping = {g: g for g in ens}
    for key, obj in (("gf_token", token), ("gf_median", median), ("gf_mapping", mapping)):
        with open(paths[key], "wb") as f:
            pickle.dump(obj, f, protocol=4)
    with open(paths["scgpt_vocab"], "w") as f:
        json.dump({g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}, f)
    tmp.rename(paths["h5ad"])  # last: the cache is complete once the .h5ad exists
    print(
        f"built {paths['h5ad'].name}: {n_cells:,} × {n_genes:,}, {X.nnz:,} nonzeros "
        f"({X.nnz / n_cells:,.0f}/cell), {paths['h5ad'].stat().st_size / 1e9:.2f} GB, "
        f"{time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )


# ===================================================================================== children
def _rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB.

    ``VmHWM`` (Linux) is the high-water mark of this process's own address space. It is what
    ``getrusage(RUSAGE_SELF).ru_maxrss`` reports too, except that at ``exec`` Linux folds the
    parent's peak into the child's ``ru_maxrss`` (the parent's address space is the one
    replaced), so a child of a large parent would report the parent's peak; ru_maxrss is the
    fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _quiet():
    import contextlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    return contextlib.redirect_stdout(io.StringIO())


def child_cellkit(spec: dict) -> dict:
    import pickle

    import anndata as ad
    import scanpy  # noqa: F401 -- imported before timing (the scgpt scheme normalises with it)

    import cellkit
    from cellkit import GeneVocab
    from cellkit.data.schemes.perturbgene import perturbgene_vocab

    paths = {k: Path(v) for k, v in spec["paths"].items()}
    scheme, options = spec["scheme"], dict(spec["options"])
    t0 = time.perf_counter()
    adata = ad.read_h5ad(paths["h5ad"])
    t_read = time.perf_counter() - t0
    kwargs: dict = {"progress": False}
    if scheme == "scgpt":
        vocab = GeneVocab.from_dict(
            json.loads(paths["scgpt_vocab"].read_text()),
            specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"},
        )
    elif scheme == "perturbgene":
        vocab = perturbgene_vocab({"cell_type": CELL_TYPES}, n_bins=len(options["bin_edges"]))
        kwargs["resources"] = {"genes": list(adata.var_names)}
    else:  # geneformer, teddy: Geneformer's dictionaries
        with open(paths["gf_token"], "rb") as f:
            token = pickle.load(f)
        with open(paths["gf_median"], "rb") as f:
            median = pickle.load(f)
        vocab = GeneVocab.from_dict(
            token, specials={"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"}
        )
        kwargs["resources"] = {"gene_median": median}
        if scheme == "geneformer":
            with open(paths["gf_mapping"], "rb") as f:
                kwargs["resources"]["ensembl_mapping"] = pickle.load(f)
            kwargs["obs_columns"] = ["cell_type"]  # Geneformer carries it too
        else:
            kwargs["gene_column"] = "ensembl_id"

    def call(data):
        return cellkit.tokenize(data, vocab, scheme=scheme, **kwargs, **options)

    call(adata[: min(N_WARMUP, adata.n_obs)].copy())  # warm-up
    base = _rss_gb()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    c0 = time.process_time()
    t0 = time.perf_counter()
    tokens = call(adata)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if profiler is not None:
        profiler.disable()
        _dump_profile(profiler, spec["profile"])
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "read_seconds": t_read,
        "cellkit_src": _source_fingerprint(Path(cellkit.__file__).parent),
        "cells": len(tokens),
        "tokens": int(tokens.n_tokens),
        "base_rss_gb": base,
        "peak_rss_gb": _rss_gb(),
    }


def _source_fingerprint(package: Path) -> str:
    """``<package dir> sha1:<hash of its .py files>``: which cellkit code a row measured."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return f"{package} sha1:{h.hexdigest()[:12]}"


def _git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %ci"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "cellkit"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[1::2]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _dump_profile(profiler, path: str) -> None:
    import io
    import pstats

    profiler.dump_stats(path + ".pstats")
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats("tottime").print_stats(15)
    Path(path + ".txt").write_text(buf.getvalue())


def child_scgpt_ref(spec: dict) -> dict:
    import contextlib
    import importlib.util
    import io
    import logging

    paths = {k: Path(v) for k, v in spec["paths"].items()}
    helpers = importlib.util.spec_from_file_location("scgpt_make_fixtures_helpers", spec["helpers"])
    mod = importlib.util.module_from_spec(helpers)
    with contextlib.redirect_stdout(io.StringIO()):
        helpers.loader.exec_module(mod)  # torchtext stand-in + datasets stub, then `import scgpt`
    import anndata as ad
    import scanpy  # noqa: F401
    import scgpt
    from scgpt.preprocess import Preprocessor
    from scgpt.tokenizer import GeneVocab, tokenize_and_pad_batch

    logging.getLogger("scGPT").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    adata = ad.read_h5ad(paths["h5ad"])
    t_read = time.perf_counter() - t0
    vocab = GeneVocab.from_file(paths["scgpt_vocab"])
    vocab.set_default_index(vocab["<pad>"])
    gene_ids = np.array(vocab(list(adata.var_names)), dtype=int)

    def call(a):
        np.random.seed(0)  # noqa: NPY002
        t = time.perf_counter()
        with _quiet():
            Preprocessor(**SCGPT_PP)(a, batch_key=None)
        t_pp = time.perf_counter() - t
        out = tokenize_and_pad_batch(a.layers["X_binned"], gene_ids, vocab=vocab, **SCGPT_TOK)
        return out, t_pp

    call(adata[: min(N_WARMUP, adata.n_obs)].copy())  # warm-up
    base = _rss_gb()
    c0 = time.process_time()
    t0 = time.perf_counter()
    out, t_pp = call(adata)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "read_seconds": t_read,
        "preprocessor_seconds": t_pp,
        "tokenize_seconds": seconds - t_pp,
        "cells": int(out["genes"].shape[0]),
        "tokens": int((out["genes"] != vocab["<pad>"]).sum()),
        "padded_shape": list(out["genes"].shape),
        "base_rss_gb": base,
        "peak_rss_gb": _rss_gb(),
        "scgpt": scgpt.__version__,
    }


def child_gf_ref(spec: dict) -> dict:
    import importlib.util

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = {k: Path(v) for k, v in spec["paths"].items()}
    helpers = importlib.util.spec_from_file_location("gf_make_tokens_helpers", spec["helpers"])
    mod = importlib.util.module_from_spec(helpers)
    helpers.loader.exec_module(mod)
    gfmod = mod.load_geneformer_tokenizer(Path(spec["src"]).resolve())  # checks the ff551ee blob
    import datasets

    datasets.disable_progress_bars()
    kwargs = dict(
        custom_attr_name_dict={"cell_type": "cell_type"},
        nproc=1,
        model_input_size=4096,
        special_token=True,
        collapse_gene_ids=True,
        model_version="V2",
        gene_median_file=paths["gf_median"],
        token_dictionary_file=paths["gf_token"],
        gene_mapping_file=paths["gf_mapping"],
    )

    def call(path):
        import contextlib
        import io

        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            tk = gfmod.TranscriptomeTokenizer(**kwargs)
            t = time.perf_counter()
            cells, meta = tk.tokenize_anndata(path)
            t_tok = time.perf_counter() - t
            rss_tok = _rss_gb()
            ds = tk.create_dataset(cells, meta, use_generator=False)
        return ds, t_tok, rss_tok

    call(paths["warmup"])  # warm-up
    base = _rss_gb()
    c0 = time.process_time()
    t0 = time.perf_counter()
    ds, t_tok, rss_tok = call(paths["h5ad"])
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "read_seconds": None,  # inside tokenize_anndata
        "tokenize_anndata_seconds": t_tok,
        "create_dataset_seconds": seconds - t_tok,
        "tokenize_anndata_peak_rss_gb": rss_tok,
        "cells": len(ds),
        "tokens": int(sum(ds["length"])),
        "base_rss_gb": base,
        "peak_rss_gb": _rss_gb(),
    }


def child_build(spec: dict) -> dict:
    paths = {k: Path(v) for k, v in spec["paths"].items()}
    build_inputs(paths, spec["cells"], spec["genes"], spec["nnz"], spec["seed"])
    return {"peak_rss_gb": _rss_gb()}


CHILDREN = {
    "cellkit": child_cellkit,
    "scgpt-ref": child_scgpt_ref,
    "gf-ref": child_gf_ref,
    "build": child_build,
}


# ===================================================================================== parent
def run_child(python: str, spec: dict, timeout: float | None, threads: int | None = None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, HF_DATASETS_CACHE=str(OUT_DIR / "hf-cache"), TQDM_DISABLE="1")
    if threads:
        for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out: still running after {timeout:.0f} s (killed)"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            res["child_wall_seconds"] = wall
            return res
    if proc.returncode in (-9, 137):
        why = "killed by SIGKILL (out of memory?)"
    else:
        why = f"exit status {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{why}: {' | '.join(tail)[-400:]}"}


def _pick_run(runs: list[dict], stat: str = "median") -> dict:
    """The median (or, with ``stat="best"``, the fastest) of a row's runs; peak RSS is the largest."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["seconds"])
    res = dict(ok[0] if stat == "best" else ok[len(ok) // 2])
    res["all_seconds"] = [round(r["seconds"], 3) for r in runs if "error" not in r]
    res["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
    return res


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def render(results: dict[str, dict], meta: dict) -> str:
    lines = [
        f"# tokenization throughput — {meta['cells']:,} cells × {meta['genes']:,} genes × "
        f"~{meta['nnz']:,} nonzeros/cell (in-memory AnnData, CSR float32)",
        "",
        f"{meta['date']} · {meta['machine']} · load average before/after {meta['load_before']} / "
        f"{meta['load_after']} (other processes were running: timings are indicative) · "
        f"numpy {meta['numpy']} · {meta.get('stat', 'median')} of {meta['repeats']} fresh process(es) per cellkit row "
        f"and of {meta.get('ref_repeats', 1)} per reference row · "
        + (
            f"{meta['threads']} thread(s) per child (NUMBA/OMP/BLAS_NUM_THREADS)"
            if meta["threads"]
            else "library default threads (cellkit's numba kernels use every core; the references run one thread)"
        ),
        "",
        "| implementation | cells/s | seconds | CPU (s) | read (s) | end-to-end (s) | base RSS (GB) "
        "| peak RSS (GB) | speed-up vs reference | end-to-end speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for key, res in results.items():
        label, kind, _, _, ref = ROWS[key]
        if "error" in res or "skipped" in res:
            msg = res.get("error") or res.get("skipped")
            lines.append(f"| {label} | – | – | – | – | – | – | – | {msg} | |")
            continue
        read = res.get("read_seconds")
        e2e = res["seconds"] + (read or 0.0)
        speed = e2e_speed = "–"
        ref_res = results.get(ref) if ref else None
        if ref_res and "seconds" in ref_res:
            ref_e2e = ref_res["seconds"] + (ref_res.get("read_seconds") or 0.0)
            speed = f"{ref_res['seconds'] / res['seconds']:.1f}×"
            e2e_speed = f"{ref_e2e / e2e:.1f}×"
            if ref == "gf-ref":
                speed += f" ({ref_res['tokenize_anndata_seconds'] / res['seconds']:.1f}× vs tokenize_anndata alone)"
            speed += f"; CPU time {ref_res['cpu_seconds'] / res['cpu_seconds']:.1f}×"
        elif ref and ref_res:
            speed = f"n/a ({ROWS[ref][0]}: {ref_res.get('error') or ref_res.get('skipped')})"
        lines.append(
            f"| {label} | {res['cells'] / res['seconds']:,.0f} | {res['seconds']:.2f} | {res['cpu_seconds']:.2f} | "
            f"{'incl.' if kind == 'gf-ref' else _fmt(read)} | {e2e:.2f} | {res['base_rss_gb']:.2f} | "
            f"{res['peak_rss_gb']:.2f} | {speed} | {e2e_speed} |"
        )
        if kind == "gf-ref":
            t = res["tokenize_anndata_seconds"]
            lines.append(
                f"| Geneformer tokenize_anndata alone (incl. read) | {res['cells'] / t:,.0f} | {t:.2f} | – | incl. | "
                f"{t:.2f} | {res['base_rss_gb']:.2f} | {res['tokenize_anndata_peak_rss_gb']:.2f} | – | – |"
            )
            notes.append(
                f"Geneformer: tokenize_anndata {t:.1f} s (reads the file itself; in memory), create_dataset "
                f"{res['create_dataset_seconds']:.1f} s; {res['cells']:,} cells, {res['tokens']:,} tokens."
            )
        if kind == "scgpt-ref":
            notes.append(
                f"scGPT {res.get('scgpt')}: Preprocessor {res['preprocessor_seconds']:.1f} s + tokenize_and_pad_batch "
                f"{res['tokenize_seconds']:.1f} s; output {res['padded_shape']} padded tensors "
                f"({res['tokens']:,} non-pad tokens)."
            )
        if kind == "cellkit" or len(res.get("all_seconds", [])) > 1:
            extra = (
                f" (runs: {res['all_seconds']} s; best {min(res['all_seconds']):.2f} s)"
                if len(res.get("all_seconds", [])) > 1
                else ""
            )
            if kind == "cellkit":
                notes.append(f"{label}: {res['cells']:,} cells, {res['tokens']:,} tokens{extra}.")
            else:
                notes.append(f"{label}: runs {res['all_seconds']} s.")
    lines += ["", *[f"- {n}" for n in notes]]
    lines += [
        "- seconds = wall time of the tokenization call alone (after reading the file and a 64-cell warm-up in the same "
        "process); read = `anndata.read_h5ad` into memory; end-to-end = read + call. CPU = process CPU time of the call (all threads; less sensitive "
        "to other load than wall time). Peak RSS = the child's "
        "own peak RSS (`VmHWM`; interpreter + libraries + in-memory AnnData + the call); base RSS = the same just before "
        "the timed call.",
        f"- Command: `{meta['command']}`",
        f"- Repository: {meta['git']}. cellkit code measured: {meta['cellkit_src']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000, help="mean nonzeros per cell (±20%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=OUT_DIR)
    p.add_argument("--only", default=None, help="comma-separated row keys (see --list)")
    p.add_argument("--list", action="store_true", help="list the row keys and exit")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per cellkit row")
    p.add_argument("--ref-repeats", type=int, default=1, help="fresh processes per reference row")
    p.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="which of a row's runs is reported: the median or the fastest (best suits a shared machine)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    p.add_argument("--python", default=sys.executable, help="interpreter with cellkit")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="NUMBA/OMP/BLAS threads in every child (default: library defaults)",
    )
    p.add_argument("--scgpt-python", default="/work/scratch/scgpt-ref/bin/python")
    p.add_argument("--geneformer-python", default="/work/scratch/gf-ref/bin/python")
    p.add_argument("--geneformer-src", default="/work/scratch/geneformer-ff551ee")
    p.add_argument("--profile", action="store_true", help="also cProfile the cellkit scgpt / geneformer runs")
    p.add_argument(
        "--profile-rows",
        default=",".join(PROFILED),
        help="comma-separated cellkit row keys to profile with --profile (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        res = CHILDREN[spec["kind"]](spec)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.list:
        for key, row in ROWS.items():
            print(f"{key:24s} {row[0]}")
        return
    keys = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        p.error(f"unknown row key(s) {unknown}; see --list")

    paths = input_paths(args.cells, args.genes, args.nnz, args.seed, args.workdir)
    sp_paths = {k: str(v) for k, v in paths.items()}
    if not all(p.exists() for p in paths.values()):  # built in a child: keeps this process small
        spec = {"kind": "build", "paths": sp_paths, "cells": args.cells, "genes": args.genes, "nnz": args.nnz}
        res = run_child(args.python, {**spec, "seed": args.seed}, timeout=None)
        if "error" in res:
            raise SystemExit(f"building the inputs failed: {res['error']}")
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    git_before = _git_state()
    results: dict[str, dict] = {}
    for key in keys:
        _, kind, scheme, options, _ = ROWS[key]
        spec = {"kind": kind, "paths": sp_paths, "scheme": scheme, "options": options}
        if kind == "cellkit":
            python, n = args.python, args.repeats
        elif kind == "scgpt-ref":
            python, n = args.scgpt_python, args.ref_repeats
            spec["helpers"] = str(SCGPT_HELPERS)
            if not Path(python).exists():
                results[key] = {"skipped": f"skipped: {python} not found"}
                continue
        else:
            python, n = args.geneformer_python, args.ref_repeats
            spec.update(helpers=str(GENEFORMER_HELPERS), src=args.geneformer_src)
            if (
                not Path(python).exists()
                or not (Path(args.geneformer_src) / "geneformer" / "tokenizer.py").exists()
            ):
                results[key] = {"skipped": f"skipped: {python} or {args.geneformer_src} not found"}
                continue
        runs = []
        for i in range(n):
            print(f"[{key}] run {i + 1}/{n} …", file=sys.stderr, flush=True)
            runs.append(run_child(python, spec, args.timeout, args.threads))
            r = runs[-1]
            done = r.get("error") or "{:.2f} s, peak {:.2f} GB".format(r["seconds"], r["peak_rss_gb"])
            print(f"[{key}]   {done}", file=sys.stderr, flush=True)
        results[key] = _pick_run(runs, args.stat)
    profiles = {}
    if args.profile:
        for key in [k.strip() for k in args.profile_rows.split(",") if k.strip()]:
            if key not in ROWS or ROWS[key][1] != "cellkit":
                p.error(f"--profile-rows: {key!r} is not a cellkit row (see --list)")
            _, kind, scheme, options, _ = ROWS[key]
            target = args.workdir / f"profile_{key}_{args.cells}x{args.genes}x{args.nnz}"
            spec = {
                "kind": kind,
                "paths": sp_paths,
                "scheme": scheme,
                "options": options,
                "profile": str(target),
            }
            print(f"[{key}] cProfile …", file=sys.stderr, flush=True)
            res = run_child(args.python, spec, args.timeout, args.threads)
            profiles[key] = (
                res.get("error")
                or f"{res['seconds']:.2f} s under cProfile\n\n"
                + Path(str(target) + ".txt").read_text().strip()
            )
    import importlib.metadata

    meta = {
        "cells": args.cells,
        "genes": args.genes,
        "nnz": args.nnz,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GB RAM, "
        f"{platform.machine()}, Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "numpy": importlib.metadata.version("numpy"),
        "repeats": args.repeats,
        "ref_repeats": args.ref_repeats,
        "stat": args.stat,
        "threads": args.threads,
        "command": "python benchmarks/tokenize_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    sources = sorted({r["cellkit_src"] for r in results.values() if "cellkit_src" in r})
    meta["git"] = (
        git_before
        if git_before == _git_state()
        else f"{git_before}, then {_git_state()} (changed during the run)"
    )
    meta["cellkit_src"] = (
        " / ".join(sources)
        + (" — WARNING: the rows measured different cellkit code" if len(sources) > 1 else "")
        if sources
        else "–"
    )
    text = render(results, meta)
    for key, prof in profiles.items():
        text += f"\n## cProfile: {ROWS[key][0]} (top 15 by tottime)\n\n```\n{prof}\n```\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    raw = (
        args.out.with_suffix(".json")
        if args.out is not None
        else args.workdir / f"tokenize_throughput_{args.cells}x{args.genes}x{args.nnz}.json"
    )
    raw.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
