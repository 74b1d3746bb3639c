"""Run by tests/train/test_ddp.py under torchrun (gloo, CPU) or as a single process.

Usage: python ddp_worker.py OUT_DIR
Writes OUT_DIR/weights-rank{r}.safetensors, OUT_DIR/seen-rank{r}.json, OUT_DIR/history-rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from _tiny import TinyCells, collator, tiny_model

from cellkit.train.distributed import init_distributed
from cellkit.train.trainer import Trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo")
    model = tiny_model(dropout=0.0)
    seen: list[int] = []
    base = collator(model)

    def collate(items):
        seen.extend(int(it["index"]) for it in items)
        return base(items)

    trainer = Trainer(
        model, ["cls"], epochs=2, batch_size=8, lr=3e-3, seed=5, progress=False, checkpoint_dir=out / "ckpt"
    )
    result = trainer.fit(
        TinyCells(32, seed=0), TinyCells(10, seed=1), collate_fn=collate, val_collate_fn=base
    )
    r = info.rank
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"weights-rank{r}.safetensors")
    )
    (out / f"seen-rank{r}.json").write_text(json.dumps(seen))
    (out / f"history-rank{r}.json").write_text(json.dumps(result.history.to_dict()))
    if info.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
