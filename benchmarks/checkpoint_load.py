"""Load time and peak memory of a whole-human-shaped scGPT checkpoint through ``cellkit.load_model``.

The checkpoint is rebuilt from the golden-fixture weight rule (512 dim, 8 heads, d_hid 512,
12 layers, vocab 60,697, MVC, flag_encoder; ≈ 205 MB ``best_model.pt``, as released) in a temporary
directory, then each measurement runs in a fresh subprocess so peak RSS is the load's own.
Prints a markdown table.

Usage::

    python benchmarks/checkpoint_load.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import cellkit, cellkit.model
t0 = time.perf_counter()
model = cellkit.load_model(sys.argv[1])
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del model
model = cellkit.load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "again": t2 - t1, "peak_mb": peak / 1024, "base_mb": base / 1024,
                  "params": model.num_parameters(), "tensors": len(model.load_report.mapped)}))
"""

TORCH_ONLY = r"""
import json, resource, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
sd = torch.load(sys.argv[1] + "/best_model.pt", map_location="cpu", weights_only=True)
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_mb": base / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", help="directory for the rebuilt checkpoint (default: a temporary one)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.checkpoints.scgpt_fixtures import build_checkpoint

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cellkit-human-"))
    if not (tmp / "best_model.pt").exists():
        build_checkpoint("human", tmp, check_hashes=False)
    size = (tmp / "best_model.pt").stat().st_size / 1e6

    def run(code: str) -> list[dict]:
        out = []
        for _ in range(args.repeats):
            r = subprocess.run(
                [sys.executable, "-c", code, str(tmp)], capture_output=True, text=True, check=True
            )
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        return out

    rows = {"torch.load(weights_only=True) alone": run(TORCH_ONLY), "cellkit.load_model": run(CHILD)}
    print(
        f"# whole-human scGPT checkpoint load — best_model.pt {size:.0f} MB, {args.repeats} runs (median)\n"
    )
    print(
        "| step | seconds (first in process) | seconds (again) | peak RSS (MB) | RSS after `import torch` (MB) | peak − base (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        med = lambda k, rs=rs: sorted(r.get(k, float("nan")) for r in rs)[len(rs) // 2]  # noqa: E731
        print(
            f"| {name} | {med('seconds'):.2f} | {med('again'):.2f} | {med('peak_mb'):.0f} | {med('base_mb'):.0f} | "
            f"{med('peak_mb') - med('base_mb'):.0f} |"
        )
    print(
        f"\nparameters: {rows['cellkit.load_model'][0]['params']:,}; tensors mapped: {rows['cellkit.load_model'][0]['tensors']}"
    )


if __name__ == "__main__":
    main()
