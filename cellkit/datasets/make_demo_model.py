"""Train the demo model shipped in ``cellkit/datasets/demo_model/`` (with cellkit itself).

Run ``python -m cellkit.datasets.make_demo_model [--out DIR] [--seed 0]``. It pretrains a small
scGPT-style model from scratch on all 700 cells of scanpy's ``pbmc68k_reduced`` (ships with
scanpy, no download) with self-supervision only — masked value regression (``gep``) and masked
value prediction from the cell embedding (``mvc``) — so no cell-type label is seen and a later
fine-tune/test split does not leak. On a 2-core CPU it takes a few minutes and, for a fixed seed,
gives the same weights every time.

This is a demo for exercising the kit (tokenize, embed, fine-tune, predict, widgets) offline,
not a foundation model: it knows 765 genes and has seen 700 cells.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path
from typing import Any

#: architecture of the demo model (scGPT family; see :func:`cellkit.presets.scgpt_config`)
ARCH: dict[str, Any] = {
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
    "d_ff": 128,
    "dropout": 0.1,
    "mvc": True,
    "n_bins": 51,
}
#: pretraining recipe (arguments of :func:`cellkit.pretrain`)
PRETRAIN: dict[str, Any] = {
    "objectives": {"gep": 1.0, "mvc": 1.0},
    "mask_ratio": 0.4,
    "epochs": 30,
    "lr": 3e-3,
    "batch_size": 16,
    "val_size": 0.05,
    "schedule": "cosine",
    "warmup_steps": 40,
    "weight_decay": 0.01,
    "bucket_by_length": True,
}
#: pooling of the cell embedding (``"mean"`` over genes: informative from the start on few cells)
POOLING = "mean"
#: how the demo data are tokenized: ``.raw`` already holds log1p CP10k values
TOKENIZE_OPTIONS: dict[str, Any] = {"normalize_total": None}
DEFAULT_OUT = Path(__file__).resolve().parent / "demo_model"


def train(seed: int = 0, *, epochs: int | None = None, progress: bool = False) -> Any:
    """Pretrain the demo model and return it (not saved)."""
    import torch

    from ..presets import build_model
    from ..tasks import pretrain
    from . import pbmc_demo

    adata = pbmc_demo()
    genes = list(adata.raw.var_names)
    model = build_model(genes, family="scgpt", seed=seed, **ARCH)
    model.config.pooling = POOLING
    opts = dict(PRETRAIN)
    if epochs is not None:
        opts["epochs"] = epochs
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = pretrain(
        adata,
        model,
        use_raw=True,
        tokenize_options=TOKENIZE_OPTIONS,
        seed=seed,
        device="cpu",
        progress=progress,
        **opts,
    )
    wall = time.perf_counter() - start
    last = result.history.epoch_records[-1] if result.history.epoch_records else {}
    model.config.input.update({"use_raw": True, "normalize_total": None, "log1p": False})
    model.config.metadata = {
        "name": "cellkit demo model",
        "what": (
            "A demo for exercising cellkit offline, NOT a foundation model: a small scGPT-style model "
            "pretrained from scratch by cellkit on the 700 cells / 765 genes of scanpy's pbmc68k_reduced."
        ),
        "trained_by": "cellkit.datasets.make_demo_model",
        "command": f"python -m cellkit.datasets.make_demo_model --seed {seed}",
        "data": "scanpy.datasets.pbmc68k_reduced() .raw (log1p CP10k, 700 cells x 765 genes)",
        "labels_seen": False,
        "tokenize": {"use_raw": True, **TOKENIZE_OPTIONS},
        "architecture": dict(ARCH, pooling=POOLING),
        "pretrain": {k: v for k, v in opts.items()},
        "seed": seed,
        "date": _dt.date.today().isoformat(),
        "final_losses": {k: round(float(v), 3) for k, v in last.items() if "loss" in k},
        "train_seconds": round(wall, 1),
    }
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory to write (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = train(args.seed, epochs=args.epochs, progress=args.progress)
    path = model.save(args.out)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    print(f"saved {path} ({size / 1e6:.2f} MB); {model.config.metadata['final_losses']}")


if __name__ == "__main__":
    main()
