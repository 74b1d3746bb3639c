"""Forward throughput of the core: cells/s vs sequence length, ``sdpa`` vs ``explicit``.

Configs: ``tiny`` (2 layers × d=64) and ``human`` (scGPT whole-human shape: 12 layers × d=512,
8 heads, d_ff 512, vocab 60,697). Every cell in a batch has the full length (no padding), values
are random bins, eval mode, ``torch.inference_mode``. Prints a markdown table.

Precisions (``--precisions``, default ``fp32``): each runs inside
``cellkit.core.precision.precision_context(model, device, resolve_precision(p, device))`` around
all its timed forwards (as ``run_inference`` does around its batches). ``bf16`` on a CPU without
bf16 units (AMX / AVX512-BF16) therefore runs fp32 — the "runs as" column says so; ``--force``
skips that check to show what emulated bf16 would cost. For every precision but fp32 the table
gives the speed vs the fp32 row and the minimum cosine of the cell embeddings vs fp32 (sdpa).

Usage::

    python benchmarks/forward_throughput.py                 # CPU, default grid, fp32
    python benchmarks/forward_throughput.py --configs human --lengths 1200 --batch 4 --backends sdpa \
        --precisions fp32,bf16                              # the issue-18 CPU bf16 row
    python benchmarks/forward_throughput.py --device cuda --precisions fp32,bf16 --backends sdpa,explicit,flash
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cellkit import CellModel
from cellkit.core.precision import cpu_bf16_units, precision_context, resolve_precision
from cellkit.data.synthetic import synthetic_batch, synthetic_vocab
from cellkit.presets import scgpt_config

CONFIGS = {
    "tiny": {"n_genes": 2000, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128},
    "human": {"n_genes": 60694, "d_model": 512, "n_heads": 8, "n_layers": 12, "d_ff": 512},
}


def bench(model, batch, backend, *, min_time):
    """cells/s of ``model`` on ``batch`` (best of the timed loop) and the last cell embeddings (float32)."""

    def run():
        with torch.inference_mode():
            out = model(**batch, heads=(), attn_backend=backend).cell_embedding.float()
        if batch["gene_ids"].is_cuda:
            torch.cuda.synchronize()
        return out

    emb = run()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and n >= 2:
            return n * batch["gene_ids"].shape[0] / elapsed, emb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,human")
    p.add_argument("--lengths", default="128,512,1200")
    p.add_argument("--backends", default="sdpa,explicit")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16, fp16 (CUDA)")
    p.add_argument("--force", action="store_true", help="run bf16 even on a CPU without bf16 units")
    p.add_argument("--cpu-mode", default="auto", help="bf16 on CPU: auto, autocast or cast")
    p.add_argument("--min-time", type=float, default=2.0)
    args = p.parse_args()
    dev = torch.device(args.device)
    precisions = args.precisions.split(",")
    units = cpu_bf16_units() if dev.type == "cpu" else None
    print(
        f"# forward throughput — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
        + (f" (bf16 units: {units or 'none'})" if dev.type == "cpu" else "")
        + f", batch {args.batch}\n"
    )
    backends = args.backends.split(",")
    print(
        "| config | params | L | precision (runs as) | "
        + " | ".join(f"{b} cells/s" for b in backends)
        + " | sdpa speed-up | vs fp32 | min cosine vs fp32 |"
    )
    print("|---|---|---|---|" + "---|" * len(backends) + "---|---|---|")
    for name in args.configs.split(","):
        spec = dict(CONFIGS[name])
        vocab = synthetic_vocab(spec.pop("n_genes"))
        torch.manual_seed(0)
        model = CellModel(scgpt_config(vocab, **spec, mvc=False), vocab).eval().to(args.device)
        for length in map(int, args.lengths.split(",")):
            batch = synthetic_batch(vocab, [length] * args.batch, seed=0)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            base = None  # (rate of the first backend, its embeddings) in fp32
            for prec in precisions:
                ran = prec if args.force and prec != "fp32" else resolve_precision(prec, dev)
                with precision_context(model, dev, ran, cpu_mode=args.cpu_mode) as how:
                    res = [bench(model, batch, b, min_time=args.min_time) for b in backends]
                rates = [r for r, _ in res]
                if prec == "fp32":
                    base = res[0]
                speed = (
                    f"{rates[0] / rates[1]:.2f}×"
                    if len(rates) > 1 and backends[:2] == ["sdpa", "explicit"]
                    else "–"
                )
                vs, cos = "–", "–"
                if base is not None and prec != "fp32":
                    vs = f"{rates[0] / base[0]:.2f}×"
                    c = torch.nn.functional.cosine_similarity(res[0][1], base[1]).min()
                    cos = f"{c.item():.6f}"
                label = f"{prec} ({how if how != 'fp32' or prec == 'fp32' else 'fp32: no bf16 units'})"
                print(
                    f"| {name} | {model.num_parameters() / 1e6:.1f} M | {length} | {label} | "
                    + " | ".join(f"{r:,.2f}" for r in rates)
                    + f" | {speed} | {vs} | {cos} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
