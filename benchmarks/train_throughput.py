"""Training throughput (cells/s, tokens/s) of cellkit vs scGPT 0.2.4's own training step.

What it measures
----------------
One optimizer step of scGPT-style fine-tuning (cell-type annotation, as in scGPT's
``Tutorial_Annotation``: GEP = masked-value MSE + CLS = cell-type cross-entropy; no MVC, ECS, CCE,
DAB) on one fixed synthetic batch, for two configs:

* ``tiny``: d_model 64, 2 layers, 4 heads, d_ff 128, vocab 2,003 (2,000 genes + ``<pad>``,
  ``<cls>``, ``<eoc>``);
* ``human``: scGPT's whole-human shape, 12 layers × d_model 512, 8 heads, d_ff 512, vocab 60,697.

Both with dropout 0.2, a continuous value encoder, CLS pooling, the expression decoder and a
3-layer classifier of ``--classes`` classes (scGPT: ``nlayers_cls=3``, ``n_cls``), no MVC head.

The batch (built with numpy from ``--seed``, identical for every implementation): ``--batch`` cells
× ``--length`` tokens including ``<cls>`` (every cell at full length unless ``--min-len`` is
smaller: then lengths are uniform in ``[min_len, length]`` and the rest is padding, pad id
``<pad>``, pad value -2); random distinct genes; values = integer bins 1…50 as float; 40 % of each
cell's gene positions masked (input value -1, scGPT's ``mask_value``; the target keeps the bin);
``<cls>`` value -2; random labels in ``[0, classes)``.

Implementations (row keys, see ``--list``):

* ``cellkit-trainer``: :class:`cellkit.train.Trainer` on an in-memory iterable dataset that yields
  the same collated batch (``objectives=[MaskedValueMSE(), Classification()]``, Adam, lr 1e-4,
  eps 1e-8, ``max_grad_norm=1.0``, ``progress=False``, ``max_steps`` = warm-up + timed steps);
  each optimizer step is timed by a ``step_end`` callback, so the time includes everything the
  trainer does per step (loss bookkeeping, history, RNG snapshot);
* ``cellkit-bare`` / ``cellkit-bare-explicit``: a bare loop on :class:`cellkit.CellModel`
  (``model(gene_ids, values, padding_mask, heads=("expression", "classifier"), attn_backend=...)``,
  the two objectives, ``zero_grad``, ``backward``, ``clip_grad_norm_(1.0)``, ``Adam.step``), with
  the default ``sdpa`` attention and with ``explicit`` (materialised ``(B, H, L, L)`` probabilities);
* ``scgpt``: scGPT 0.2.4 ``TransformerModel`` (``use_fast_transformer=False``, ``pre_norm=False``,
  ``input_emb_style="continuous"``, ``cell_emb_style="cls"``, ``do_mvc=False``), its tutorial's
  training step: ``model(src, values, src_key_padding_mask, CLS=True, CCE=False, MVC=False,
  ECS=False)``, ``scgpt.loss.masked_mse_loss(mlm_output, target, mask) + CrossEntropyLoss(cls_output,
  labels)``, ``zero_grad``, ``backward``, ``clip_grad_norm_(1.0)``, ``torch.optim.Adam(lr 1e-4,
  eps 1e-8)``. It runs in ``--scgpt-python`` (a scratch env with scGPT 0.2.4) after the torchtext
  stand-in of ``tests/fixtures/scgpt/make_fixtures.py`` is installed; without that interpreter the
  rows say "not installed".

Every (config, implementation) runs in a FRESH subprocess: build the model (``torch.manual_seed(0)``),
``--warmup`` steps, then ``--steps`` timed steps (``time.perf_counter``; on CUDA after
``torch.cuda.synchronize()``). ``--repeats`` fresh processes per row; the fastest is reported
(``--stat best``, the default on a shared machine) or the median. Peak RSS is the child's own
``VmHWM`` (interpreter + libraries + model + optimizer state + activations); on CUDA the peak
allocated GPU memory is reported too. Each child prints its parameter count: cellkit's and scGPT's
must agree for the same config (checked in the table).

Model FLOPs and MFU
-------------------
FLOPs per optimizer step are estimated as (forward + backward ≈ 3 × forward)::

    6 · N_tok · T  +  6 · N_cell · B  +  12 · n_layers · d_model · L · T

with ``T`` = tokens in the padded batch (``B · L``; the kernels compute on the padding too),
``N_tok`` = parameters applied to every token (all parameters except embedding tables, which
are look-ups, and the classifier), ``N_cell`` = the classifier's parameters (applied once per cell),
and ``12 · n_layers · d · L`` per token = the attention score and value products (``QKᵀ`` and
``PV``: 2 · 2 · L · d multiply-adds forward per layer, × 3 with the backward). Achieved FLOP/s =
that ÷ seconds/step; ``MFU`` = achieved ÷ ``--peak-tflops`` (the device's dense peak for the
dtype used, e.g. ~989 TFLOP/s bf16 for an H100 SXM), printed only when ``--peak-tflops`` is given.

How to run (from the repository root, with cellkit's environment)::

    python benchmarks/train_throughput.py                                  # CPU, both configs, all rows
    python benchmarks/train_throughput.py --configs tiny --repeats 1       # quick
    python benchmarks/train_throughput.py --device cuda --amp bf16 --peak-tflops 989 --batch 32 \\
        --length 1200 --steps 20                                           # GPU: bf16 throughput and MFU

Options: ``--only cellkit-bare,scgpt`` (row keys, see ``--list``), ``--configs tiny,human``,
``--batch``, ``--length``, ``--min-len``, ``--classes``, ``--warmup``, ``--steps`` (default 20 for
``tiny``, 5 for ``human``), ``--repeats``, ``--stat``, ``--threads`` (torch threads in every
child), ``--device``, ``--amp bf16``, ``--peak-tflops``, ``--timeout``, ``--python``,
``--scgpt-python``, ``--json PATH`` (raw numbers), ``--out PATH`` (the markdown too).

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
SCGPT_HELPERS = REPO / "tests" / "fixtures" / "scgpt" / "make_fixtures.py"

CONFIGS: dict[str, dict] = {
    "tiny": {"n_genes": 2000, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128, "steps": 20},
    "human": {"n_genes": 60694, "d_model": 512, "n_heads": 8, "n_layers": 12, "d_ff": 512, "steps": 5},
}
# row key -> (label, kind, options)
ROWS: dict[str, tuple[str, str, dict]] = {
    "cellkit-trainer": ("cellkit `Trainer` step (sdpa)", "cellkit", {"loop": "trainer", "backend": "sdpa"}),
    "cellkit-bare": ("cellkit bare step (sdpa)", "cellkit", {"loop": "bare", "backend": "sdpa"}),
    "cellkit-bare-explicit": (
        "cellkit bare step (explicit)",
        "cellkit",
        {"loop": "bare", "backend": "explicit"},
    ),
    "scgpt": ("scGPT 0.2.4 TransformerModel step", "scgpt", {}),
}
DROPOUT = 0.2
LR = 1e-4
EPS = 1e-8
MAX_GRAD_NORM = 1.0
MASK_RATIO = 0.4
MASK_VALUE = -1.0
PAD_VALUE = -2.0
N_BINS = 51


# ===================================================================================== inputs
def make_batch(n_genes: int, batch: int, length: int, min_len: int, classes: int, seed: int) -> dict:
    """The fixed synthetic batch as numpy arrays (ids in ``synthetic_vocab`` order: genes, then
    ``<pad>`` = n_genes, ``<cls>`` = n_genes + 1, ``<eoc>`` = n_genes + 2)."""
    rng = np.random.default_rng(seed)
    pad_id, cls_id = n_genes, n_genes + 1
    lengths = np.full(batch, length) if min_len >= length else rng.integers(min_len, length + 1, size=batch)
    ids = np.full((batch, length), pad_id, dtype=np.int64)
    target = np.full((batch, length), PAD_VALUE, dtype=np.float32)
    masked = np.zeros((batch, length), dtype=bool)
    for row, n in enumerate(lengths):
        k = int(n) - 1
        ids[row, 0], target[row, 0] = cls_id, PAD_VALUE
        ids[row, 1 : k + 1] = rng.choice(n_genes, size=k, replace=False)
        target[row, 1 : k + 1] = rng.integers(1, N_BINS, size=k)
        pos = 1 + rng.choice(k, size=round(MASK_RATIO * k), replace=False)
        masked[row, pos] = True
    values = np.where(masked, np.float32(MASK_VALUE), target).astype(np.float32)
    return {
        "gene_ids": ids,
        "values": values,
        "padding_mask": np.arange(length)[None, :] >= lengths[:, None],
        "target_values": target,
        "mlm_mask": masked,
        "labels": rng.integers(0, classes, size=batch).astype(np.int64),
    }


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


def _param_counts(model, classifier) -> dict:
    """Total parameters, embedding-table parameters and classifier parameters of a model."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    cls = sum(p.numel() for p in classifier.parameters())
    return {"params": total, "embedding_params": emb, "classifier_params": cls}


def _flops_per_step(counts: dict, spec: dict) -> float:
    b, length = spec["batch"], spec["length"]
    tokens = b * length
    n_tok = counts["params"] - counts["embedding_params"] - counts["classifier_params"]
    attn = 12 * spec["n_layers"] * spec["d_model"] * length * tokens
    return 6.0 * n_tok * tokens + 6.0 * counts["classifier_params"] * b + attn


def _setup_torch(spec: dict):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    amp = spec.get("amp")

    def autocast():
        import contextlib

        if not amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return torch, device, autocast, sync


def _time_loop(step, n_warmup: int, n_steps: int, sync) -> tuple[float, float, float]:
    """Run ``step`` warm-up + timed times; return (wall and CPU seconds of the timed steps, last loss)."""
    loss = None
    for _ in range(n_warmup):
        loss = step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        loss = step()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, float(loss)


def _result(spec: dict, seconds: float, cpu: float, counts: dict, torch, device, extra: dict) -> dict:
    res = {
        "seconds": seconds,
        "seconds_per_step": seconds / spec["steps"],
        "cpu_seconds_per_step": cpu / spec["steps"],
        "steps": spec["steps"],
        "cells": spec["batch"] * spec["steps"],
        "tokens": spec["real_tokens"] * spec["steps"],
        "flops_per_step": _flops_per_step(counts, spec),
        **counts,
        **extra,
        "peak_rss_gb": _rss_gb(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        res["gpu"] = torch.cuda.get_device_name(device)
    return res


def child_cellkit(spec: dict) -> dict:
    torch, device, autocast, sync = _setup_torch(spec)
    import cellkit
    from cellkit import CellModel
    from cellkit.data.synthetic import synthetic_vocab
    from cellkit.presets import scgpt_config
    from cellkit.train import Classification, MaskedValueMSE, Trainer

    vocab = synthetic_vocab(spec["n_genes"])
    assert (vocab.pad_id, vocab.cls_id) == (spec["n_genes"], spec["n_genes"] + 1), (
        vocab.pad_id,
        vocab.cls_id,
    )
    torch.manual_seed(0)
    cfg = scgpt_config(
        vocab,
        d_model=spec["d_model"],
        n_heads=spec["n_heads"],
        n_layers=spec["n_layers"],
        d_ff=spec["d_ff"],
        dropout=DROPOUT,
        mvc=False,
    )
    model = CellModel(cfg, vocab)
    model.add_head("classifier", n_classes=spec["classes"], n_layers=3)
    counts = _param_counts(model, model.heads["classifier"])
    model.to(device).train()
    arrays = make_batch(
        spec["n_genes"], spec["batch"], spec["length"], spec["min_len"], spec["classes"], spec["seed"]
    )
    batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    objectives = [MaskedValueMSE(), Classification()]
    backend = spec["options"]["backend"]
    n_warmup, n_steps = spec["warmup"], spec["steps"]

    if spec["options"]["loop"] == "trainer":
        stamps: list[tuple[float, float]] = []

        def on_event(event):
            if event.kind == "step_end":
                sync()
                stamps.append((time.perf_counter(), time.process_time()))

        class FixedBatches(torch.utils.data.IterableDataset):
            batch_size = spec["batch"]  # the trainer passes already-collated batches through

            def __iter__(self):
                for _ in range(n_warmup + n_steps):
                    yield dict(batch)

        trainer = Trainer(
            model,
            objectives,
            epochs=1,
            max_steps=n_warmup + n_steps,
            batch_size=spec["batch"],
            optimizer="adam",
            lr=LR,
            eps=EPS,
            max_grad_norm=MAX_GRAD_NORM,
            amp="bf16" if spec.get("amp") else None,
            device=spec["device"],
            attn_backend=backend,
            shuffle=False,
            monitor="train/loss",
            restore_best=False,
            progress=False,
            callbacks=[on_event],
        )
        result = trainer.fit(FixedBatches())
        assert len(stamps) == n_warmup + n_steps, (len(stamps), result.status)
        # from the end of the last warm-up step to the end of the last step
        seconds = stamps[-1][0] - stamps[n_warmup - 1][0]
        cpu = stamps[-1][1] - stamps[n_warmup - 1][1]
        loss = result.history.step_records[-1]["loss"]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=LR, eps=EPS)
        heads = ("expression", "classifier")
        inputs = {k: batch[k] for k in ("gene_ids", "values", "padding_mask")}

        def step():
            with autocast():
                out = model(**inputs, heads=heads, attn_backend=backend)
                loss = sum(o(out, batch).float() for o in objectives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            return loss.detach()

        seconds, cpu, loss = _time_loop(step, n_warmup, n_steps, sync)
    return _result(
        spec,
        seconds,
        cpu,
        counts,
        torch,
        device,
        {"loss": loss, "cellkit": getattr(cellkit, "__version__", "?"), "cellkit_src": _source_fingerprint()},
    )


def _source_fingerprint() -> str:
    import hashlib

    import cellkit

    package = Path(cellkit.__file__).parent
    h = hashlib.sha1()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return f"{package} sha1:{h.hexdigest()[:12]}"


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
    torch, device, autocast, sync = _setup_torch(spec)
    import scgpt
    from scgpt.loss import masked_mse_loss
    from scgpt.model import TransformerModel

    logging.getLogger("scGPT").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    n = spec["n_genes"]
    vocab = {**{f"G{i:05d}": i for i in range(n)}, "<pad>": n, "<cls>": n + 1, "<eoc>": n + 2}
    torch.manual_seed(0)
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=spec["d_model"],
        nhead=spec["n_heads"],
        d_hid=spec["d_ff"],
        nlayers=spec["n_layers"],
        nlayers_cls=3,
        n_cls=spec["classes"],
        vocab=vocab,  # only vocab[pad_token] is read
        dropout=DROPOUT,
        pad_token="<pad>",
        pad_value=PAD_VALUE,
        do_mvc=False,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        input_emb_style="continuous",
        cell_emb_style="cls",
        explicit_zero_prob=False,
        use_fast_transformer=False,
        pre_norm=False,
    )
    counts = _param_counts(model, model.cls_decoder)
    model.to(device).train()
    arrays = make_batch(n, spec["batch"], spec["length"], spec["min_len"], spec["classes"], spec["seed"])
    b = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    opt = torch.optim.Adam(model.parameters(), lr=LR, eps=EPS)
    criterion_cls = torch.nn.CrossEntropyLoss()

    def step():
        with autocast():
            out = model(
                b["gene_ids"], b["values"], b["padding_mask"], CLS=True, CCE=False, MVC=False, ECS=False
            )
            loss = masked_mse_loss(out["mlm_output"], b["target_values"], b["mlm_mask"])
            loss = loss + criterion_cls(out["cls_output"], b["labels"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss.detach()

    seconds, cpu, loss = _time_loop(step, spec["warmup"], spec["steps"], sync)
    return _result(spec, seconds, cpu, counts, torch, device, {"loss": loss, "scgpt": scgpt.__version__})


CHILDREN = {"cellkit": child_cellkit, "scgpt": child_scgpt}


# ===================================================================================== parent
def run_child(python: str, spec: dict, timeout: float | None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{why}: {' | '.join(tail)[-400:]}"}


def _pick(runs: list[dict], stat: str) -> dict:
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["seconds_per_step"])
    if not ok:
        return runs[-1]
    res = dict(ok[0] if stat == "best" else ok[len(ok) // 2])
    res["all_seconds_per_step"] = [round(r["seconds_per_step"], 4) for r in ok]
    res["all_cpu_seconds_per_step"] = [round(r["cpu_seconds_per_step"], 4) for r in ok]
    res["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
    return res


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def render(results: dict, meta: dict) -> str:
    peak = meta.get("peak_tflops")
    head = (
        "| config | implementation | params | batch | L | cells/s | tokens/s | s/step | CPU s/step | model GFLOP/s | "
        + ("MFU | " if peak else "")
        + "peak RSS (GB) | "
        + ("peak GPU (GB) | " if meta["device"].startswith("cuda") else "")
        + "vs scGPT (wall; CPU) |"
    )
    lines = [
        f"# training throughput — {meta['device']}{' ' + meta['amp'] if meta['amp'] else ' fp32'}, "
        f"batch {meta['batch']} × L {meta['length']}"
        + (f" (lengths {meta['min_len']}–{meta['length']})" if meta["min_len"] < meta["length"] else "")
        + f", GEP + CLS, Adam, clip 1.0, dropout {DROPOUT}",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta.get('torch', '?')}, {meta.get('threads', '?')} "
        f"thread(s) · load average before/after {meta['load_before']} / {meta['load_after']} · "
        f"{meta['stat']} of {meta['repeats']} fresh process(es) per row, {meta['warmup']} warm-up step(s) each",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    notes = []
    for cfg_name, rows in results.items():
        ref = rows.get("scgpt", {})
        for key, res in rows.items():
            label = ROWS[key][0]
            if "error" in res or "skipped" in res:
                msg = res.get("skipped") or res.get("error")
                n_cols = head.count("|") - 1
                lines.append(f"| {cfg_name} | {label} | " + "– | " * (n_cols - 3) + f"{msg} |")
                continue
            sps = res["seconds_per_step"]
            cells, tokens = res["cells"] / res["seconds"], res["tokens"] / res["seconds"]
            gflops = res["flops_per_step"] / sps / 1e9
            ratio = "–"
            if key != "scgpt" and "seconds_per_step" in ref:
                ratio = (
                    f"{ref['seconds_per_step'] / sps:.2f}×; "
                    f"{ref['cpu_seconds_per_step'] / res['cpu_seconds_per_step']:.2f}×"
                )
            row = (
                f"| {cfg_name} | {label} | {_fmt_params(res['params'])} | {meta['batch']} | {meta['length']} | "
                f"{cells:,.2f} | {tokens:,.0f} | {sps:.3f} | {res['cpu_seconds_per_step']:.3f} | {gflops:,.1f} | "
            )
            if peak:
                row += f"{gflops / (peak * 1e3):.1%} | "
            row += f"{res['peak_rss_gb']:.2f} | "
            if meta["device"].startswith("cuda"):
                row += f"{res.get('peak_gpu_gb', 0):.2f} | "
            lines.append(row + f"{ratio} |")
            runs = res.get("all_seconds_per_step", [])
            notes.append(
                f"{cfg_name} / {label}: {res['params']:,} parameters ({res['embedding_params']:,} in embedding "
                f"tables, {res['classifier_params']:,} in the classifier); {res['flops_per_step'] / 1e9:,.1f} "
                f"GFLOP/step; s/step of the runs {runs}, CPU s/step {res.get('all_cpu_seconds_per_step', [])}; final loss {res['loss']:.4f}."
            )
        counts = {k: r["params"] for k, r in rows.items() if "params" in r}
        if "scgpt" in counts and len(counts) > 1:
            same = all(v == counts["scgpt"] for v in counts.values())
            notes.append(
                f"{cfg_name}: parameter counts "
                + ("MATCH" if same else "DIFFER")
                + f" (cellkit {next(v for k, v in counts.items() if k != 'scgpt'):,}, scGPT {counts['scgpt']:,})."
            )
    lines += ["", *[f"- {n}" for n in notes]]
    lines += [
        "- cells/s and tokens/s count the cells / non-padding tokens of the timed steps ÷ their wall time; s/step = "
        "wall time per optimizer step (forward, loss, backward, clipping, Adam); CPU s/step = the process's CPU time per step of the same run (all threads; steadier than wall time on a shared machine, but it includes OpenMP spin-waiting). model GFLOP/s = "
        "(6·N_tok·T + 6·N_cls·B + 12·n_layers·d·L·T) ÷ s/step (see the script's docstring)"
        + (f"; MFU against a peak of {peak} TFLOP/s" if peak else "")
        + ". vs scGPT = scGPT's s/step ÷ this row's, wall and CPU (>1: faster than scGPT). Peak RSS = the child's own VmHWM.",
        f"- Command: `{meta['command']}`",
        f"- Repository: {meta['git']}. cellkit code measured: {meta['cellkit_src']}.",
    ]
    return "\n".join(lines) + "\n"


def _git_state() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %ci"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,human", help="comma-separated: tiny, human")
    p.add_argument("--only", default=None, help="comma-separated row keys (see --list)")
    p.add_argument("--list", action="store_true", help="list the row keys and exit")
    p.add_argument("--batch", type=int, default=8, help="cells per step")
    p.add_argument("--length", type=int, default=512, help="tokens per cell incl. <cls> (padded length)")
    p.add_argument(
        "--min-len", type=int, default=None, help="shortest cell (default: every cell at --length)"
    )
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 20, human 5)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
    p.add_argument("--stat", choices=("best", "median"), default="best")
    p.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=("bf16",), default=None, help="autocast dtype (default fp32)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    p.add_argument("--python", default=sys.executable, help="interpreter with cellkit")
    p.add_argument("--scgpt-python", default="/work/scratch/scgpt-ref/bin/python")
    p.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return
    if args.list:
        for key, row in ROWS.items():
            print(f"{key:24s} {row[0]}")
        return
    keys = list(ROWS) if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [k for k in keys if k not in ROWS] + [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown row key(s) / config(s) {bad}; see --list")
    min_len = args.length if args.min_len is None else min(args.min_len, args.length)
    if args.warmup < 1 or (args.steps is not None and args.steps < 1):
        p.error("--warmup and --steps must be >= 1")
    if min_len < 2:
        p.error("--min-len must be >= 2 (<cls> and one gene)")
    lengths = make_batch(10 * args.length, args.batch, args.length, min_len, args.classes, args.seed)
    real_tokens = int((~lengths["padding_mask"]).sum())

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results: dict[str, dict] = {}
    for cfg_name in configs:
        cfg = dict(CONFIGS[cfg_name])
        steps = args.steps or cfg.pop("steps")
        cfg.pop("steps", None)
        if cfg["n_genes"] < args.length:
            p.error(f"--length {args.length} exceeds the {cfg['n_genes']} genes of config {cfg_name}")
        results[cfg_name] = {}
        for key in keys:
            _, kind, options = ROWS[key]
            spec = {
                "kind": kind,
                "options": options,
                **cfg,
                "batch": args.batch,
                "length": args.length,
                "min_len": min_len,
                "real_tokens": real_tokens,
                "classes": args.classes,
                "seed": args.seed,
                "warmup": args.warmup,
                "steps": steps,
                "threads": args.threads,
                "device": args.device,
                "amp": args.amp,
            }
            python = args.python
            if kind == "scgpt":
                python = args.scgpt_python
                spec["helpers"] = str(SCGPT_HELPERS)
                if not Path(python).exists():
                    results[cfg_name][key] = {"skipped": f"not installed ({python} not found)"}
                    continue
            runs = []
            for i in range(args.repeats):
                print(f"[{cfg_name} / {key}] run {i + 1}/{args.repeats} …", file=sys.stderr, flush=True)
                r = run_child(python, spec, args.timeout)
                runs.append(r)
                done = r.get("error") or f"{r['seconds_per_step']:.3f} s/step, peak {r['peak_rss_gb']:.2f} GB"
                print(f"[{cfg_name} / {key}]   {done}", file=sys.stderr, flush=True)
                if "error" in r and kind == "scgpt" and "No module named" in r["error"]:
                    r["skipped"] = f"not installed ({r.pop('error')})"
                    break
            results[cfg_name][key] = _pick(runs, args.stat)

    any_ok = [r for rows in results.values() for r in rows.values() if "torch" in r]
    sources = sorted({r["cellkit_src"] for r in any_ok if "cellkit_src" in r})
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GB RAM, "
        f"{platform.machine()}, Python {platform.python_version()}"
        + (f", {any_ok[0]['gpu']}" if any_ok and "gpu" in any_ok[0] else ""),
        "torch": any_ok[0]["torch"] if any_ok else "?",
        "threads": any_ok[0]["threads"] if any_ok else "?",
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "device": args.device,
        "amp": args.amp,
        "peak_tflops": args.peak_tflops,
        "batch": args.batch,
        "length": args.length,
        "min_len": min_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "stat": args.stat,
        "git": _git_state(),
        "cellkit_src": " / ".join(sources) or "–",
        "command": "python benchmarks/train_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = render(results, meta)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
