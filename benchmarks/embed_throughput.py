"""Cell-embedding throughput on CPU: cellkit ``embed_cells`` vs scGPT 0.2.4's ``embed_data`` loop.

What it measures
----------------
One synthetic raw-count AnnData (built once and cached in ``--workdir``): ``--cells`` cells ×
``--genes`` genes, genes per cell drawn from a skewed (log-normal) distribution — median
``--median-genes``, clipped to ``[--min-genes, --max-genes]`` (default 1,000 in [500, 3,000]) —
genes picked with unequal detection rates, counts negative-binomial (Poisson–Gamma) + 1, CSR
float32. The model is scGPT's whole-human shape (12 layers × d_model 512, 8 heads, d_ff 512,
vocab ``--vocab-genes`` + ``<pad>``, ``<cls>``, ``<eoc>`` = 60,697 by default; the data's genes
are the first ``--genes`` of it): ``cellkit.presets.build_model(..., family="scgpt", seed=0)``,
written once with ``model.save(dir, format="scgpt")``; both implementations load that directory,
so they run the same weights. Rows (keys, see ``--list``):

* ``cellkit``: ``cellkit.load_model(dir)`` then ``cellkit.embed_cells(adata, model,
  batch_size=B, tokenize_options={"max_len": 1200}, device="cpu")`` — tokenizes (deterministic
  scGPT binning, cells over 1,200 tokens sampled), sorts the cells by length into batches
  (length bucketing), runs the encoder only (no vocabulary-sized head) with torch's SDPA
  attention, CLS pooling, L2-normalised: scGPT's ``embed_data`` semantics;
* ``cellkit-bf16``: the ``cellkit`` row's work (tokenize, length-sorted batches of ``B``, encoder
  only, CLS, L2-normalised) in ``precision="bf16"``: the batches run inside
  ``cellkit.core.precision.precision_context(model, cpu, resolve_precision("bf16", cpu))`` — what
  ``run_inference`` does once ``embed_cells(..., precision=)`` lands; until then this row calls the
  model directly (``cellkit.tokenize`` + ``inference_batches`` + ``Collator`` + ``model(...,
  heads=())``). On a CPU without bf16 units (AMX / AVX512-BF16) it runs fp32 (the row says so);
* ``cellkit-bf16-forced``: the same, bf16 even without bf16 units (emulated: shows why cellkit
  stays in fp32 there). ``--cpu-mode`` picks how bf16 runs on a CPU (default ``auto``: measured);
* ``cellkit-unsorted``: the same cellkit model and tokens, but batched the way scGPT batches —
  ``B`` consecutive cells in input order, padded to the batch's longest — to separate the gain of
  bucketing from the rest (``cellkit.tokenize`` + ``Collator`` + ``model(..., heads=())``);
* ``scgpt``: scGPT 0.2.4's ``embed_data`` path in its scratch env (``--scgpt-python``, after
  the torchtext stand-in of ``tests/fixtures/scgpt/make_fixtures.py``): the model built as
  ``embed_data`` builds it (``TransformerModel(..., do_mvc=True, use_fast_transformer=False)``,
  no flash-attn on CPU) and filled by ``scgpt.utils.load_pretrained`` (every tensor checked),
  then the timed call ``scgpt.tasks.cell_emb.get_batch_cell_embeddings(adata, "cls", model,
  vocab, max_length=1200, batch_size=B, ...)`` — it densifies ``adata.X``, runs a ``DataLoader``
  with ``num_workers=min(#CPUs, B)`` and scGPT's ``DataCollator`` (per-cell binning, random
  sampling above 1,200, padding to the batch's longest), ``model._encode(...)[:, 0, :]`` and
  L2-normalises.

Every run is a FRESH subprocess: read the ``.h5ad`` into memory, load the model, embed the first
2 cells (warm-up), then time the call on all cells (``time.perf_counter``). ``torch.set_num_threads
(--threads)`` in every child (default 1: on a shared 2-core machine one thread is the steadier
measurement; scGPT's DataLoader workers run besides it, as scGPT runs them). Peak RSS is the
child's own ``VmHWM`` (interpreter + libraries + model + data + the call); scGPT's DataLoader
workers are separate processes, their largest peak is reported apart (``RUSAGE_CHILDREN``).
``--repeats`` runs per row; the fastest is reported (on a shared machine the least disturbed).

Padding fraction = padded positions ÷ all positions the encoder computes on (``Σ batch × width``),
from the actual batches of each row. Agreement: on ``--check-cells`` cells with ≤ 1,199 genes
(so nobody samples) whose counts carry a small random jitter (no ties, so scGPT's random
tie-breaking in binning cannot differ either), both rows' embeddings must agree: cosine ≥ 0.9999
or max |Δ| ≤ 1e-4 (checked in the first run of each row).

How to run (from the repository root, with cellkit's environment)::

    python benchmarks/embed_throughput.py                          # 512 cells, batch 64, 3 repeats
    python benchmarks/embed_throughput.py --cells 128 --repeats 1  # quick

For the bf16 rows the table adds their speed vs the ``cellkit`` (fp32) row and the minimum cosine
of their embeddings to that row's on *all* cells (timed call, same tokens up to the sampling of
long cells, which is deterministic).

Options: ``--only cellkit,scgpt``, ``--list``, ``--cells``, ``--genes``, ``--vocab-genes``,
``--median-genes``, ``--min-genes``, ``--max-genes``, ``--batch-size``, ``--max-len``,
``--threads``, ``--repeats``, ``--check-cells``, ``--cpu-mode``, ``--timeout``, ``--python``,
``--scgpt-python``, ``--workdir``, ``--out PATH`` (also write the markdown; raw numbers go next
to it as ``.json``).

This file imports only the standard library and numpy at module level, so the scGPT interpreter
can run it as a child (``--child``).
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
N_WARMUP = 2
HUMAN = {"d_model": 512, "n_heads": 8, "n_layers": 12, "d_ff": 512}

# row key -> (label, kind)
ROWS: dict[str, tuple[str, str]] = {
    "cellkit": ("cellkit `embed_cells` (length-bucketed, encoder-only, sdpa)", "cellkit"),
    "cellkit-bf16": ("cellkit, precision='bf16' (length-bucketed, encoder-only, sdpa)", "cellkit"),
    "cellkit-bf16-forced": ("cellkit, bf16 forced even without bf16 units (emulated)", "cellkit"),
    "cellkit-unsorted": ("cellkit model, scGPT's batching (input order, pad to batch longest)", "cellkit"),
    "scgpt": ("scGPT 0.2.4 `get_batch_cell_embeddings` (`embed_data` path)", "scgpt"),
}


# ===================================================================================== inputs
def input_paths(spec: dict, workdir: Path) -> dict[str, str]:
    stem = (
        f"embed_{spec['cells']}x{spec['genes']}_g{spec['median_genes']}-{spec['min_genes']}-"
        f"{spec['max_genes']}_s{spec['seed']}"
    )
    return {
        "h5ad": str(workdir / f"{stem}.h5ad"),
        "check": str(workdir / f"{stem}.check{spec['check_cells']}.h5ad"),
        "model": str(workdir / f"embed_model_human_v{spec['vocab_genes']}_s0"),
    }


def gene_names(n: int) -> list[str]:
    return [f"G{i:05d}" for i in range(n)]


def make_counts(spec: dict):
    """Skewed genes-per-cell, unequal detection rates, NB counts (+1 so every picked gene is nonzero)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(spec["seed"])
    n_cells, n_genes = spec["cells"], spec["genes"]
    k = np.exp(rng.normal(np.log(spec["median_genes"]), 0.5, size=n_cells)).round().astype(np.int64)
    k = np.clip(k, spec["min_genes"], spec["max_genes"])
    log_pop = np.log(rng.lognormal(0.0, 1.0, n_genes))  # how often a gene is detected
    gene_mean = rng.lognormal(0.0, 1.0, n_genes)  # its level when detected
    indptr, indices, data = [0], [], []
    for n in k:  # Gumbel top-k = weighted sampling without replacement
        cols = np.sort(np.argpartition(-(log_pop + rng.gumbel(size=n_genes)), n - 1)[:n])
        lam = gene_mean[cols] * rng.lognormal(0.0, 0.3) * rng.gamma(2.0, 0.5, size=n)
        indices.append(cols.astype(np.int32))
        data.append((rng.poisson(lam) + 1).astype(np.float32))
        indptr.append(indptr[-1] + n)
    x = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=(n_cells, n_genes)
    )
    return x, rng


def child_build(spec: dict) -> dict:
    import anndata as ad
    import pandas as pd

    paths = spec["paths"]
    genes = gene_names(spec["genes"])
    x, rng = make_counts(spec)
    var = pd.DataFrame(index=genes)
    ad.AnnData(x, obs=pd.DataFrame(index=[f"cell{i:06d}" for i in range(x.shape[0])]), var=var).write_h5ad(
        paths["h5ad"]
    )
    # agreement cells: <= 1,199 genes (no sampling by anyone), jittered counts (no ties in binning)
    nnz = np.diff(x.indptr)
    rows = np.flatnonzero(nnz <= 1199)[: spec["check_cells"]]
    xc = x[rows].copy()
    xc.data = xc.data + rng.uniform(0.0, 0.5, size=xc.nnz).astype(np.float32)
    ad.AnnData(xc, obs=pd.DataFrame(index=[f"check{i:06d}" for i in rows]), var=var).write_h5ad(
        paths["check"]
    )
    if not Path(paths["model"], "best_model.pt").exists():
        from cellkit.presets import build_model

        model = build_model(gene_names(spec["vocab_genes"]), family="scgpt", seed=0, **HUMAN)
        model.save(paths["model"], format="scgpt")
    return {"peak_rss_gb": _rss_gb()}


# ===================================================================================== children
def _rss_gb() -> float:
    """Peak resident memory of this process so far (``VmHWM``; see tokenize_throughput.py), GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _padding(widths_and_sizes: list[tuple[int, int]], real_tokens: int) -> dict:
    computed = sum(w * b for w, b in widths_and_sizes)
    return {
        "computed_tokens": int(computed),
        "real_tokens": int(real_tokens),
        "padding": 1 - real_tokens / computed,
    }


def _source_fingerprint() -> str:
    import hashlib

    import cellkit

    package = Path(cellkit.__file__).parent
    h = hashlib.sha1()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return f"sha1:{h.hexdigest()[:12]}"


def child_cellkit(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import anndata as ad

    import cellkit
    from cellkit._inference import FORWARD_KEYS, inference_batches
    from cellkit.data.collate import Collator

    paths = spec["paths"]
    model = cellkit.load_model(paths["model"])
    model.eval()
    adata = ad.read_h5ad(paths["h5ad"])
    opts = {"max_len": spec["max_len"]}
    bs = spec["batch_size"]

    ran_as = "fp32"
    if spec["row"] == "cellkit":

        def call(a):
            cellkit.embed_cells(a, model, batch_size=bs, tokenize_options=opts, device="cpu", progress=False)
            return a.obsm["X_cellkit"]

    elif spec["row"].startswith("cellkit-bf16"):  # embed_cells' work, batches in precision_context
        from cellkit.core.precision import cpu_bf16_units, precision_context, resolve_precision

        cpu_dev = torch.device("cpu")
        prec = "bf16" if spec["row"] == "cellkit-bf16-forced" else resolve_precision("bf16", cpu_dev)

        @torch.inference_mode()
        def call(a):
            nonlocal ran_as
            tokens = cellkit.tokenize(a, model, progress=False, **opts)
            collate = Collator.for_tokens(tokens)
            out = np.empty((len(tokens), model.config.encoder.d_model), dtype=np.float32)
            with precision_context(model, cpu_dev, prec, cpu_mode=spec["cpu_mode"]) as how:
                for idx in inference_batches(tokens.lengths, bs):
                    batch = collate([{**tokens.cell(i), "index": i} for i in idx.tolist()])
                    res = model(**{k: batch[k] for k in FORWARD_KEYS if k in batch}, heads=())
                    emb = torch.nn.functional.normalize(res.cell_embedding.float(), p=2, dim=1)
                    out[idx] = emb.numpy()
            ran_as = how
            return out

    else:  # scGPT's batching with cellkit's model: input order, each batch padded to its longest

        @torch.inference_mode()
        def call(a):
            tokens = cellkit.tokenize(a, model, progress=False, **opts)
            collate = Collator.for_tokens(tokens)
            out = np.empty((len(tokens), model.config.encoder.d_model), dtype=np.float32)
            for start in range(0, len(tokens), bs):
                idx = range(start, min(start + bs, len(tokens)))
                batch = collate([{**tokens.cell(i), "index": i} for i in idx])
                res = model(**{k: batch[k] for k in FORWARD_KEYS if k in batch}, heads=())
                emb = torch.nn.functional.normalize(res.cell_embedding.float(), p=2, dim=1)
                out[start : start + len(idx)] = emb.numpy()
            return out

    call(adata[:N_WARMUP].copy())  # warm-up
    base = _rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    emb = call(adata)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_gb()
    # padding of the batches this row ran (tokenized again, outside the timing)
    lengths = cellkit.tokenize(adata, model, progress=False, **opts).lengths
    if spec["row"] != "cellkit-unsorted":
        groups = list(inference_batches(lengths, bs))
    else:
        groups = [np.arange(s, min(s + bs, len(lengths))) for s in range(0, len(lengths), bs)]
    pad = _padding([(int(lengths[g].max()), len(g)) for g in groups], lengths.sum())
    res = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cells": int(adata.n_obs),
        "base_rss_gb": base,
        "peak_rss_gb": peak,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cellkit_src": _source_fingerprint(),
        "params": sum(p.numel() for p in model.parameters()),
        "finite": bool(np.isfinite(emb).all()),
        "runs_as": ran_as,
        **pad,
    }
    if spec["row"].startswith("cellkit-bf16"):
        res["bf16_units"] = cpu_bf16_units() or "none"
    if spec.get("emb_out"):
        np.save(spec["emb_out"], np.asarray(emb, dtype=np.float32))
    if spec.get("check_out"):
        check = ad.read_h5ad(paths["check"])
        np.save(spec["check_out"], call(check))
    return res


def child_scgpt(spec: dict) -> dict:
    import contextlib
    import importlib.util
    import io
    import logging
    import warnings

    helpers = importlib.util.spec_from_file_location("scgpt_make_fixtures_helpers", spec["helpers"])
    mod = importlib.util.module_from_spec(helpers)
    with contextlib.redirect_stdout(io.StringIO()):
        helpers.loader.exec_module(mod)  # torchtext stand-in + datasets stub, then `import scgpt`
    import torch

    torch.set_num_threads(spec["threads"])
    import anndata as ad
    import scgpt
    from scgpt.model import TransformerModel
    from scgpt.tasks.cell_emb import get_batch_cell_embeddings
    from scgpt.tokenizer import GeneVocab
    from scgpt.utils import load_pretrained

    logging.getLogger("scGPT").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    paths = spec["paths"]
    model_dir = Path(paths["model"])
    # --- embed_data's model set-up, verbatim in substance (gene_col="index", device="cpu")
    vocab = GeneVocab.from_file(model_dir / "vocab.json")
    for s in ["<pad>", "<cls>", "<eoc>"]:
        if s not in vocab:
            vocab.append_token(s)
    model_configs = json.loads((model_dir / "args.json").read_text())
    vocab.set_default_index(vocab["<pad>"])
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=model_configs["embsize"],
        nhead=model_configs["nheads"],
        d_hid=model_configs["d_hid"],
        nlayers=model_configs["nlayers"],
        nlayers_cls=model_configs["n_layers_cls"],
        n_cls=1,
        vocab=vocab,
        dropout=model_configs["dropout"],
        pad_token=model_configs["pad_token"],
        pad_value=model_configs["pad_value"],
        do_mvc=True,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        use_fast_transformer=False,  # flash-attn does not exist on CPU
        fast_transformer_backend="flash",
        pre_norm=False,
    )
    ckpt = torch.load(model_dir / "best_model.pt", map_location="cpu")
    # load_pretrained drops mismatches silently: make sure every tensor _encode uses is filled
    # (it renames Wqkv -> in_proj_ without flash-attn; cls_decoder, unused here, stays random)
    renamed = {k.replace("Wqkv.", "in_proj_"): v for k, v in ckpt.items()}
    own = model.state_dict()
    used = [k for k in own if k.startswith(("encoder.", "value_encoder.", "transformer_encoder."))]
    missing = [k for k in used if k not in renamed or renamed[k].shape != own[k].shape]
    if missing:
        raise RuntimeError(f"checkpoint does not fill {missing[:5]} …")
    load_pretrained(model, ckpt, verbose=False)
    model.eval()

    def call(a):
        genes = a.var.index.tolist()
        gene_ids = np.array(vocab(genes), dtype=int)
        return get_batch_cell_embeddings(
            a,
            cell_embedding_mode="cls",
            model=model,
            vocab=vocab,
            max_length=spec["max_len"],
            batch_size=spec["batch_size"],
            model_configs=model_configs,
            gene_ids=gene_ids,
            use_batch_labels=False,
        )

    adata = ad.read_h5ad(paths["h5ad"])
    with contextlib.redirect_stderr(io.StringIO()):
        call(adata[:N_WARMUP].copy())  # warm-up
    base = _rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm
        emb = call(adata)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_gb()
    # padding of scGPT's batches: B consecutive cells, width min(longest incl. <cls>, max_length)
    lengths = np.minimum(np.diff(adata.X.indptr) + 1, spec["max_len"])
    bs = spec["batch_size"]
    groups = [lengths[s : s + bs] for s in range(0, len(lengths), bs)]
    pad = _padding([(int(g.max()), len(g)) for g in groups], lengths.sum())
    enc = model.transformer_encoder
    res = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cells": int(adata.n_obs),
        "base_rss_gb": base,
        "peak_rss_gb": peak,
        "workers_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2,
        "num_workers": min(len(os.sched_getaffinity(0)), bs),
        "nested_tensor_fast_path": bool(getattr(enc, "use_nested_tensor", False)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scgpt": scgpt.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "finite": bool(np.isfinite(emb).all()),
        **pad,
    }
    if spec.get("check_out"):
        check = ad.read_h5ad(paths["check"])
        with contextlib.redirect_stderr(io.StringIO()):
            np.save(spec["check_out"], call(check))
    return res


CHILDREN = {"build": child_build, "cellkit": child_cellkit, "scgpt": child_scgpt}


# ===================================================================================== parent
def run_child(python: str, spec: dict, timeout: float | None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, TQDM_DISABLE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out: still running after {timeout:.0f} s (killed)"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    why = (
        "killed by SIGKILL (out of memory?)"
        if proc.returncode in (-9, 137)
        else f"exit status {proc.returncode}"
    )
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{why}: {' | '.join(tail)[-400:]}"}


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    diff = float(np.abs(a - b).max())
    return {
        "cells": len(a),
        "min_cosine": float(cos.min()),
        "max_abs_diff": diff,
        "ok": bool(cos.min() >= 0.9999 or diff <= 1e-4),
    }


def render(results: dict[str, dict], meta: dict, checks: dict[str, dict]) -> str:
    ref = results.get("scgpt", {})
    lines = [
        f"# cell-embedding throughput — {meta['cells']:,} cells × {meta['genes']:,} genes, genes per cell "
        f"{meta['genes_per_cell']}; whole-human scGPT shape ({meta['params']}), max_len {meta['max_len']}, "
        f"batch {meta['batch_size']}",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']}, {meta['threads']} torch thread(s) per "
        f"process · CPU, fp32 unless the row says otherwise · best of {meta['repeats']} fresh process(es) per row · load average before/after "
        f"{meta['load_before']} / {meta['load_after']}",
        "",
        "| implementation | cells/s | seconds | CPU (s) | padding | peak RSS (GB) | speed-up vs scGPT (wall; CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results.get("cellkit", {})
    for key, res in results.items():
        label = ROWS[key][0]
        if key.startswith("cellkit-bf16") and "runs_as" in res:
            label += f" — runs as **{res['runs_as']}** (bf16 units: {res.get('bf16_units', '?')})"
        if "error" in res or "skipped" in res:
            lines.append(f"| {label} | – | – | – | – | – | {res.get('error') or res.get('skipped')} |")
            continue
        speed = "–"
        if "seconds" in ref and key != "scgpt":
            speed = (
                f"**{ref['seconds'] / res['seconds']:.2f}×** "
                f"(CPU time {ref['cpu_seconds'] / res['cpu_seconds']:.2f}×)"
            )
        rss = f"{res['peak_rss_gb']:.2f}"
        if key == "scgpt":
            rss += f" (+ {res['num_workers']} workers, each ≤ {res['workers_peak_rss_gb']:.2f})"
        lines.append(
            f"| {label} | {res['cells'] / res['seconds']:.2f} | {res['seconds']:.1f} | {res['cpu_seconds']:.1f} | "
            f"{res['padding']:.1%} | {rss} | {speed} |"
        )
    lines.append("")
    for key, res in results.items():
        if "all_seconds" in res:
            lines.append(
                f"- {key}: runs {res['all_seconds']} s; {res['real_tokens']:,} real tokens, "
                f"{res['computed_tokens']:,} positions computed"
                + (
                    f"; nested-tensor fast path in nn.TransformerEncoder: {res['nested_tensor_fast_path']}"
                    if key == "scgpt"
                    else ""
                )
            )
    for key, res in results.items():
        if key.startswith("cellkit-bf16") and "seconds" in res and "seconds" in base:
            line = (
                f"- {key} vs cellkit (fp32): **{base['seconds'] / res['seconds']:.2f}×** the speed (runs as "
                f"{res['runs_as']})"
            )
            if "all_cells_cosine" in res:
                line += (
                    f"; all {res['cells']} cells: min cosine {res['all_cells_cosine']:.6f}, "
                    f"max |Δ| {res['all_cells_max_abs_diff']:.2e}"
                )
            lines.append(line)
    for key, c in checks.items():
        if "error" in c:
            lines.append(f"- agreement {key} vs scgpt: {c['error']}")
        else:
            lines.append(
                f"- agreement {key} vs scgpt on {c['cells']} cells with ≤ 1,199 genes (jittered counts): "
                f"min cosine {c['min_cosine']:.7f}, max |Δ| {c['max_abs_diff']:.2e} → "
                f"{'OK' if c['ok'] else 'MISMATCH'}"
            )
    lines += [f"- Command: `{meta['command']}`", f"- cellkit code: {meta['git']} ({meta['cellkit_src']})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=512)
    p.add_argument(
        "--genes", type=int, default=20_000, help="genes in the data (the first of the vocabulary)"
    )
    p.add_argument("--vocab-genes", type=int, default=60_694, help="genes in the model's vocabulary")
    p.add_argument("--median-genes", type=int, default=1_000)
    p.add_argument("--min-genes", type=int, default=500)
    p.add_argument("--max-genes", type=int, default=3_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1200)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every child")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per row (fastest reported)")
    p.add_argument("--check-cells", type=int, default=32)
    p.add_argument("--cpu-mode", default="auto", help="bf16 rows on CPU: auto (measured), autocast or cast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated row keys (see --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--python", default=sys.executable, help="interpreter with cellkit")
    p.add_argument("--scgpt-python", default="/work/scratch/scgpt-ref/bin/python")
    p.add_argument("--workdir", type=Path, default=OUT_DIR)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return
    if args.list:
        for key, (label, _) in ROWS.items():
            print(f"{key:18s} {label}")
        return
    keys = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in ROWS]:
        p.error(f"unknown row key(s) {unknown}; see --list")

    data = {
        "cells": args.cells,
        "genes": args.genes,
        "vocab_genes": args.vocab_genes,
        "median_genes": args.median_genes,
        "min_genes": args.min_genes,
        "max_genes": args.max_genes,
        "check_cells": args.check_cells,
        "seed": args.seed,
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = input_paths(data, args.workdir)
    if (
        not all(Path(v).exists() for v in (paths["h5ad"], paths["check"]))
        or not Path(paths["model"], "best_model.pt").exists()
    ):
        print("building inputs …", file=sys.stderr, flush=True)
        res = run_child(args.python, {"kind": "build", "paths": paths, **data}, None)
        if "error" in res:
            raise SystemExit(f"building the inputs failed: {res['error']}")
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results: dict[str, dict] = {}
    check_files: dict[str, Path] = {}
    all_runs: dict[str, list[dict]] = {}
    for key in keys:
        python = args.python if ROWS[key][1] == "cellkit" else args.scgpt_python
        if Path(python).exists():
            all_runs[key] = []
        else:
            results[key] = {"skipped": f"not installed ({python} not found)"}
    for i in range(args.repeats):  # interleaved (row A, row B, …, row A, …): load changes hit every row
        for key, runs in all_runs.items():
            kind = ROWS[key][1]
            python = args.python if kind == "cellkit" else args.scgpt_python
            s = {
                "kind": kind,
                "row": key,
                "paths": paths,
                "batch_size": args.batch_size,
                "max_len": args.max_len,
                "threads": args.threads,
                "cpu_mode": args.cpu_mode,
                "helpers": str(SCGPT_HELPERS),
            }
            if key.startswith("cellkit"):  # every run's embeddings: bf16 rows are compared with fp32
                s["emb_out"] = str(args.workdir / f"embed_all_{key}_{i}.npy")
            if i == 0 and args.check_cells:
                check_files[key] = args.workdir / f"embed_check_{key}.npy"
                s["check_out"] = str(check_files[key])
            print(f"[{key}] run {i + 1}/{args.repeats} …", file=sys.stderr, flush=True)
            runs.append(run_child(python, s, args.timeout))
            r = runs[-1]
            msg = (
                r.get("error")
                or f"{r['seconds']:.1f} s, peak {r['peak_rss_gb']:.2f} GB, padding {r['padding']:.1%}"
            )
            print(f"[{key}]   {msg}", file=sys.stderr, flush=True)
    for key, runs in all_runs.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            results[key] = runs[-1] if runs else {"skipped": "no runs (--repeats 0: inputs built only)"}
            continue
        best = dict(min(ok, key=lambda r: r["seconds"]))
        best["all_seconds"] = [round(r["seconds"], 1) for r in ok]
        best["run_index"] = runs.index(min(ok, key=lambda r: r["seconds"]))
        best["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
        results[key] = best
    results = {k: results[k] for k in keys}
    if "run_index" in results.get("cellkit", {}):  # bf16 rows vs the fp32 row on every cell
        ref_all = np.load(args.workdir / f"embed_all_cellkit_{results['cellkit']['run_index']}.npy")
        for key, res in results.items():
            f = args.workdir / f"embed_all_{key}_{res.get('run_index')}.npy"
            if key.startswith("cellkit-bf16") and f.exists():
                c = agreement(np.load(f), ref_all)
                res["all_cells_cosine"], res["all_cells_max_abs_diff"] = c["min_cosine"], c["max_abs_diff"]
    checks = {}
    if "scgpt" in check_files and check_files["scgpt"].exists():
        ref_emb = np.load(check_files["scgpt"])
        for key, f in check_files.items():
            if key != "scgpt":
                checks[key] = (
                    agreement(np.load(f), ref_emb) if f.exists() else {"error": "no embeddings written"}
                )

    ok = [r for r in results.values() if "torch" in r]
    n_genes = None
    try:  # genes per cell of the data, for the summary
        import anndata as ad

        n_genes = np.diff(ad.read_h5ad(paths["h5ad"]).X.indptr)
    except ImportError:
        pass
    dist = (
        f"{n_genes.min()}–{n_genes.max()} (median {int(np.median(n_genes))}, mean {n_genes.mean():.0f}, "
        f"{(n_genes > args.max_len - 1).mean():.0%} above {args.max_len - 1} → sampled)"
        if n_genes is not None
        else "?"
    )
    cellkit_res = next((r for r in ok if "cellkit_src" in r), {})
    meta = {
        "cells": args.cells,
        "genes": args.genes,
        "genes_per_cell": dist,
        "params": f"{ok[0]['params'] / 1e6:.1f} M parameters incl. heads" if ok else "?",
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GB RAM, {platform.machine()}",
        "torch": ok[0]["torch"] if ok else "?",
        "threads": args.threads,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": "python benchmarks/embed_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": _git_head(),
        "cellkit_src": cellkit_res.get("cellkit_src", "–"),
    }
    text = render(results, meta, checks)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "results": results, "checks": checks}, indent=2)
        )


def _git_head() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
