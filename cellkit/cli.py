"""Command-line entry point: ``cellkit <command>`` (also ``python -m cellkit``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ._errors import CellkitError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .data.synthetic import synthetic_batch, synthetic_vocab
    from .model import CellModel, load_model
    from .presets import scgpt_config

    torch.manual_seed(args.seed)
    vocab = synthetic_vocab(args.genes)
    cfg = scgpt_config(
        vocab, d_model=args.d_model, n_heads=4, n_layers=args.layers, d_ff=args.d_model * 2, dropout=0.1
    )
    model = CellModel(cfg, vocab).eval()
    print(f"built   {model!r}")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cellkit-demo-"))
    model.save(out_dir)
    reloaded = load_model(out_dir)
    files = ", ".join(f"{p.name} ({p.stat().st_size / 1e3:.0f} kB)" for p in sorted(out_dir.iterdir()))
    print(f"saved   {out_dir}: {files}")

    lengths = torch.randint(
        16, args.max_len + 1, (args.cells,), generator=torch.Generator().manual_seed(args.seed)
    ).tolist()
    batch = synthetic_batch(vocab, lengths, seed=args.seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        a = model(**batch, heads=())
        t_sdpa = time.perf_counter() - t0
        b = reloaded(**batch, heads=())
        t0 = time.perf_counter()
        e = model(**batch, heads=(), attn_backend="explicit", output_attentions=True)
        t_explicit = time.perf_counter() - t0
    same = torch.equal(a.cell_embedding, b.cell_embedding)
    keep = ~batch["padding_mask"]
    diff = (a.last_hidden_state - e.last_hidden_state)[keep].abs().max().item()
    rows = e.attentions[-1].sum(-1)
    emb = torch.nn.functional.normalize(a.cell_embedding, dim=1)
    print(f"reload  cell embeddings bit-for-bit identical after save/load: {same}")
    print(
        f"embed   {len(lengths)} synthetic cells, {min(lengths)}–{max(lengths)} tokens → cell embeddings {tuple(emb.shape)}"
    )
    print(
        f"speed   sdpa {len(lengths) / t_sdpa:,.0f} cells/s, explicit {len(lengths) / t_explicit:,.0f} cells/s (CPU, fp32)"
    )
    print(
        f"check   sdpa vs explicit max |Δ| = {diff:.1e}; attention rows sum to 1 within {(rows - 1).abs().max().item():.1e}"
    )
    print(f"cosine  mean pairwise similarity of cells: {(emb @ emb.T).mean().item():.3f}")
    return 0 if same and diff < 1e-5 else 1


def _info(args: argparse.Namespace) -> int:
    from .model import load_model

    model = load_model(args.path)
    print(repr(model))
    report = model.load_report
    if report is not None:
        print(report.summary())
    c = model.config.encoder
    print(
        f"architecture: d_model {c.d_model}, heads {c.n_heads}, layers {c.n_layers}, d_ff {c.d_ff}, "
        f"{c.activation}, {c.norm_scheme}-norm, values: {c.value_encoder}, pooling: {model.config.pooling}"
    )
    print(f"vocabulary: {len(model.vocab):,} tokens; specials {model.vocab.specials}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cellkit`` command line."""
    parser = argparse.ArgumentParser(prog="cellkit", description="Single-cell foundation-model kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small model, save, reload and embed synthetic cells")
    demo.add_argument("--out", help="directory to save the demo model (default: a temporary directory)")
    demo.add_argument("--cells", type=int, default=256)
    demo.add_argument("--genes", type=int, default=2000)
    demo.add_argument("--max-len", type=int, default=256)
    demo.add_argument("--d-model", type=int, default=64)
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="describe a model directory (cellkit, scGPT or Geneformer)")
    info.add_argument("path")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CellkitError as exc:
        print(f"cellkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
