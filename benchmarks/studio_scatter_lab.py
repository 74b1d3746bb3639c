"""The embedding explorer at 100k cells, end to end in JupyterLab + Chromium (the real widget).

Where ``scatter_browser.py`` replays the figure's messages in a bare page, this runs the real
thing: a notebook builds a synthetic ``--n``-cell AnnData (``scatter_browser.synthetic``: 20
blobs on ``X_umap``, a 20-category ``cluster`` column, genes following the layout) and shows
``cellkit.widgets.EmbeddingPanel`` on it; a headless Chromium drives JupyterLab like a user and
times, with the kernel↔browser comm included:

1. **open**: Run All → the scatter drawn with all cells (kernel work + widget messages + WebGL);
2. **recolour** through the panel's own controls: "Colour by" → ``batch`` (4 traces), the gene box
   → ``GENE_A`` (one continuous trace), → ``GENE_B`` (colour array only), → back to ``cluster``;
   each timed from the user's action until the browser's plot holds the new traces (+ two frames).

Prints a markdown table. Usage::

    python benchmarks/studio_scatter_lab.py [--n 100000] [--repeats 2]

Needs ``playwright`` (pip) and Chromium at ``/usr/bin/chromium`` (never ``playwright install``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.widgets._browser import (  # noqa: E402
    ACTIVE,
    CHROMIUM_ARGS,
    JupyterLab,
    open_and_run_all,
    write_notebook,
)

DRAWN = """(want) => {
  const gd = document.querySelector(ACTIVE + ' .cellkit-embedding-plot.js-plotly-plot');
  if (!gd || !gd.data || !gd._fullLayout) return false;
  const n = gd.data.reduce((s, t) => s + (t.x ? t.x.length : 0), 0);
  if (n !== want.n || gd.data.length !== want.traces) return false;
  if (want.colorbar && !(gd.data[0].marker && gd.data[0].marker.colorbar)) return false;
  if (want.title && !(gd._fullLayout.title.text || '').includes(want.title)) return false;
  return true;
}""".replace("ACTIVE", repr(ACTIVE))


def settle(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root, home = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    write_notebook(
        root / "scatter.ipynb",
        [
            f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "from scatter_browser import synthetic\n"
            f"adata = synthetic({args.n})",
            "from cellkit.widgets import EmbeddingPanel, StudioState\n"
            "panel = EmbeddingPanel(StudioState(adata=adata, adata_name='synthetic'))\n"
            "panel.set_basis('X_umap'); panel.color_by('cluster')\n"
            "panel",
        ],
    )
    lab = JupyterLab(root, home)
    lab.start()
    rows: dict[str, list[float]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            t0 = time.perf_counter()
            open_and_run_all(page, lab, "scatter.ipynb", "bench")
            page.wait_for_function(DRAWN, arg={"n": args.n, "traces": 20})
            settle(page)
            rows["open: Run All → 20 traces drawn (incl. data build, kernel start excluded)"] = [
                time.perf_counter() - t0
            ]
            color = page.locator(f"{ACTIVE} .cellkit-color-by select")
            gene = page.locator(f"{ACTIVE} .cellkit-color-gene input")
            steps = [
                (
                    "recolour cluster → batch (4 traces)",
                    lambda: color.select_option(label="batch"),
                    {"traces": 4},
                ),
                (
                    "recolour batch → gene GENE_A (1 trace, colour bar)",
                    lambda: (gene.fill("GENE_A"), gene.press("Enter")),
                    {"traces": 1, "colorbar": True, "title": "GENE_A"},
                ),
                (
                    "recolour GENE_A → GENE_B (colour array only)",
                    lambda: (gene.fill("GENE_B"), gene.press("Enter")),
                    {"traces": 1, "colorbar": True, "title": "GENE_B"},
                ),
                (
                    "recolour GENE_B → cluster (20 traces)",
                    lambda: color.select_option(label="cluster"),
                    {"traces": 20},
                ),
            ]
            for _ in range(args.repeats):
                for name, action, want in steps:
                    t = time.perf_counter()
                    action()
                    page.wait_for_function(DRAWN, arg={"n": args.n, **want})
                    settle(page)
                    rows.setdefault(name, []).append(time.perf_counter() - t)
            page.screenshot(path=str(home / "scatter.png"))
            browser.close()
    finally:
        lab.shutdown_kernels()
        lab.stop()
    print(
        f"\n{args.n:,} cells, JupyterLab + headless Chromium (SwiftShader WebGL), {platform.machine()}, "
        f"median of {args.repeats}; screenshot {home / 'scatter.png'}\n"
    )
    print("| step | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
