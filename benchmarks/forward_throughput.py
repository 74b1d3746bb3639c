"""Forward throughput of the core: cells/s vs sequence length, ``sdpa`` vs ``explicit``.

Configs: ``tiny`` (2 layers × d=64) and ``human`` (scGPT whole-human shape: 12 layers × d=512,
8 heads, d_ff 512, vocab 60,697). Every cell in a batch has the full length (no padding), values
are random bins, fp32, eval mode, ``torch.inference_mode``. Prints a markdown table.

Usage::

    python benchmarks/forward_throughput.py                 # CPU, default grid
    python benchmarks/forward_throughput.py --device cuda --dtype bfloat16 --backends sdpa,explicit,flash
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cellkit import CellModel
from cellkit.data.synthetic import synthetic_batch, synthetic_vocab
from cellkit.presets import scgpt_config

CONFIGS = {
    "tiny": {"n_genes": 2000, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128},
    "human": {"n_genes": 60694, "d_model": 512, "n_heads": 8, "n_layers": 12, "d_ff": 512},
}


def bench(model, batch, backend, *, dtype, min_time):
    def run():
        with (
            torch.inference_mode(),
            torch.autocast(batch["gene_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            model(**batch, heads=(), attn_backend=backend)
        if batch["gene_ids"].is_cuda:
            torch.cuda.synchronize()

    run()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and n >= 2:
            return n * batch["gene_ids"].shape[0] / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,human")
    p.add_argument("--lengths", default="128,512,1200")
    p.add_argument("--backends", default="sdpa,explicit")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--min-time", type=float, default=2.0)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"# forward throughput — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}, {args.dtype}, batch {args.batch}\n"
    )
    backends = args.backends.split(",")
    print("| config | params | L | " + " | ".join(f"{b} cells/s" for b in backends) + " | sdpa speed-up |")
    print("|---|---|---|" + "---|" * len(backends) + "---|")
    for name in args.configs.split(","):
        spec = dict(CONFIGS[name])
        vocab = synthetic_vocab(spec.pop("n_genes"))
        torch.manual_seed(0)
        model = CellModel(scgpt_config(vocab, **spec, mvc=False), vocab).eval().to(args.device)
        for length in map(int, args.lengths.split(",")):
            batch = synthetic_batch(vocab, [length] * args.batch, seed=0)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            rates = [bench(model, batch, b, dtype=dtype, min_time=args.min_time) for b in backends]
            speed = (
                f"{rates[0] / rates[1]:.2f}×"
                if len(rates) > 1 and backends[:2] == ["sdpa", "explicit"]
                else "–"
            )
            print(
                f"| {name} | {model.num_parameters() / 1e6:.1f} M | {length} | "
                + " | ".join(f"{r:,.1f}" for r in rates)
                + f" | {speed} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
