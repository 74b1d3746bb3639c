"""The embedding explorer at 100k–1M cells, end to end in JupyterLab + Chromium (the real widget).

Where ``scatter_browser.py`` replays the figure's messages in a bare page, this runs the real
thing: a notebook builds a synthetic ``--n``-cell AnnData (``scatter_browser.synthetic``: 20
blobs on ``X_umap``, a 20-category ``cluster`` column, genes following the layout) and shows
``cellkit.widgets.EmbeddingPanel`` on it; a headless Chromium drives JupyterLab like a user and
times, with the kernel↔browser comm included:

1. **open**: Run All → the scatter drawn with all cells (kernel work + widget messages + WebGL);
2. **recolour** through the panel's own controls: "Colour by" → ``batch`` (4 traces), the gene box
   → ``GENE_A`` (one continuous trace), → ``GENE_B`` (colour array only), → back to ``cluster``;
   each timed from the user's action until the browser's plot holds the new traces (+ two frames).

``--backend jscatter`` runs the same with the jupyter-scatter view (what the panel uses from 100k
cells on): **open** until the WebGL canvas has received all ``--n`` points and drawn them,
**recolour** through the same controls (``cluster → batch → GENE_A → GENE_B → cluster``), each
timed from the user's action until the browser has uploaded the new point data to the GPU and
drawn a frame (WebGL calls are counted by a page init script), then a **lasso**: a real mouse drag
over part of the plot, timed from releasing the mouse until the panel's label shows the count
the kernel computed, and **Save selection** until the panel says it saved them. Chromium here has
no GPU: WebGL runs on SwiftShader (software), so these are upper bounds for a laptop with a GPU.

Prints a markdown table. Usage::

    python benchmarks/studio_scatter_lab.py [--n 100000] [--repeats 2] [--backend plotly]
    python benchmarks/studio_scatter_lab.py --backend jscatter --n 1000000

Needs ``playwright`` (pip) and Chromium at ``/usr/bin/chromium`` (never ``playwright install``).
"""

from __future__ import annotations

import argparse
import itertools
import os
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
    parser.add_argument("--backend", choices=("plotly", "jscatter"), default="plotly")
    args = parser.parse_args()
    if args.backend == "jscatter":
        run_jscatter(args)
        return
    from playwright.sync_api import sync_playwright

    root, home = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    write_notebook(
        root / "scatter.ipynb",
        [
            f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]\n"
            "from scatter_browser import synthetic\n"
            f"adata = synthetic({args.n})",
            "from cellkit.widgets import EmbeddingPanel, StudioState\n"
            "panel = EmbeddingPanel(StudioState(adata=adata, adata_name='synthetic'), backend='plotly')\n"
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
        f"\n{args.n:,} cells, plotly view, JupyterLab + headless Chromium (SwiftShader WebGL), "
        f"{platform.machine()}, {os.cpu_count()} cores (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}), median of {args.repeats}; "
        f"screenshot {home / 'scatter.png'}\n"
    )
    print("| step | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


#: counts the WebGL uploads of large textures (regl-scatterplot keeps the points in one) and the draws
GL_SPY = """(() => {
  window.__gl = {uploads: [], draws: []};
  for (const C of [window.WebGLRenderingContext, window.WebGL2RenderingContext]) {
    if (!C) continue;
    const tex = C.prototype.texImage2D;
    C.prototype.texImage2D = function (...a) {
      if (a.length >= 9 && a[3] * a[4] >= 4096) window.__gl.uploads.push({t: performance.now(), texels: a[3] * a[4]});
      return tex.apply(this, a);
    };
    for (const name of ['drawArrays', 'drawElements']) {
      const f = C.prototype[name];
      C.prototype[name] = function (...a) { window.__gl.draws.push(performance.now()); if (window.__gl.draws.length > 1000) window.__gl.draws.splice(0, 500); return f.apply(this, a); };
    }
  }
})();"""

#: the points reached the GPU after ``since`` (an upload of >= n texels) and a frame was drawn after it
GL_DRAWN = """(want) => {
  const g = window.__gl; if (!g) return false;
  const up = g.uploads.filter(u => u.t >= want.since && u.texels >= want.n);
  if (!up.length) return false;
  const last = up[up.length - 1].t;
  if (!g.draws.some(d => d > last)) return false;
  const root = document.querySelector(ACTIVE + ' .cellkit-embedding-gl');
  if (!root || !root.querySelector('canvas')) return false;
  const legend = root.querySelector('.legend');
  const text = legend ? legend.textContent : '';
  if (want.legend && !text.includes(want.legend)) return false;
  if (want.entries && root.querySelectorAll('.legend-entry').length !== want.entries) return false;
  return true;
}""".replace("ACTIVE", repr(ACTIVE))


GL_STATE = """() => { const g = window.__gl || {uploads: [], draws: []};
  return {uploads: g.uploads.slice(-6), draws: g.draws.length,
          entries: document.querySelectorAll('.cellkit-embedding-gl .legend-entry').length,
          canvases: document.querySelectorAll('.cellkit-embedding-gl canvas').length}; }"""


def run_jscatter(args) -> None:
    """The jupyter-scatter view: open, recolour, lasso → selection in the kernel, save."""
    import json

    from playwright.sync_api import sync_playwright

    root, home = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    timings = root / "kernel_timings.json"
    write_notebook(
        root / "scatter.ipynb",
        [
            "import json, time\n"
            f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]\n"
            "from scatter_browser import synthetic\n"
            f"t = time.perf_counter(); adata = synthetic({args.n}); t_data = time.perf_counter() - t",
            "t = time.perf_counter(); import plotly.graph_objects as go; go.FigureWidget()\n"
            "t_figure = time.perf_counter() - t  # plotly's templates: a one-off of the process\n"
            "t = time.perf_counter(); import jscatter; t_import = time.perf_counter() - t\n"
            "from cellkit.widgets import EmbeddingPanel, StudioState\n"
            "t = time.perf_counter()\n"
            "panel = EmbeddingPanel(StudioState(adata=adata, adata_name='synthetic'), backend='jscatter')\n"
            "t_panel = time.perf_counter() - t\n"
            f"open({str(timings)!r}, 'w').write(json.dumps(dict(data=t_data, figure=t_figure, jscatter_import=t_import, "
            "panel=t_panel, backend=panel.backend, n_shown=panel.gl.meta['n_shown'])))\n"
            "panel",
        ],
    )
    lab = JupyterLab(root, home)
    lab.start()
    rows: dict[str, list[float]] = {}
    n = args.n
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(300_000)
            page.add_init_script(GL_SPY)
            renderer = page.evaluate(
                """() => { const gl = document.createElement('canvas').getContext('webgl');
                if (!gl) return 'no WebGL'; const d = gl.getExtension('WEBGL_debug_renderer_info');
                return d ? gl.getParameter(d.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER); }"""
            )
            t0 = time.perf_counter()
            open_and_run_all(page, lab, "scatter.ipynb", "bench")
            try:
                page.wait_for_function(GL_DRAWN, arg={"n": n, "since": 0, "entries": 20}, timeout=900_000)
            except Exception:
                page.screenshot(path=str(home / "scatter_jscatter_fail.png"))
                print(
                    "WebGL calls seen:",
                    page.evaluate(GL_STATE),
                    f"screenshot {home}/scatter_jscatter_fail.png",
                )
                raise
            settle(page)
            t_open = time.perf_counter() - t0
            kernel = json.loads(timings.read_text())
            assert kernel["backend"] == "jscatter", kernel
            assert kernel["n_shown"] == n, kernel
            rows["open: Run All → all points on the GPU and drawn (incl. data build)"] = [t_open]
            rows["  of which, in the kernel: synthetic data"] = [kernel["data"]]
            rows["  of which, in the kernel: first plotly FigureWidget (one-off)"] = [kernel["figure"]]
            rows["  of which, in the kernel: import jscatter (one-off)"] = [kernel["jscatter_import"]]
            rows["  of which, in the kernel: EmbeddingPanel (prepare + Scatter)"] = [kernel["panel"]]
            plot = page.locator(f"{ACTIVE} .cellkit-embedding-gl")
            plot.scroll_into_view_if_needed()
            color = page.locator(f"{ACTIVE} .cellkit-color-by select")
            gene = page.locator(f"{ACTIVE} .cellkit-color-gene input")
            steps = [
                (
                    "recolour cluster → batch (4 categories)",
                    lambda: color.select_option(label="batch"),
                    {"entries": 4},
                ),
                (
                    "recolour batch → gene GENE_A (colour scale)",
                    lambda: (gene.fill("GENE_A"), gene.press("Enter")),
                    {"legend": "GENE_A"},
                ),
                (
                    "recolour GENE_A → GENE_B",
                    lambda: (gene.fill("GENE_B"), gene.press("Enter")),
                    {"legend": "GENE_B"},
                ),
                (
                    "recolour GENE_B → cluster (20 categories)",
                    lambda: color.select_option(label="cluster"),
                    {"entries": 20},
                ),
            ]
            for _ in range(args.repeats):
                for name, action, want in steps:
                    since = page.evaluate("() => performance.now()")
                    t = time.perf_counter()
                    action()
                    page.wait_for_function(GL_DRAWN, arg={"n": n, "since": since, **want})
                    settle(page)
                    rows.setdefault(name, []).append(time.perf_counter() - t)
            # lasso: a real mouse drag around the left part of the plot (the view is in lasso mode)
            label = page.locator(f"{ACTIVE} .cellkit-selection-count")
            canvas = page.locator(f"{ACTIVE} .cellkit-embedding-gl canvas").first
            counts = []
            for rep in range(args.repeats):
                canvas.scroll_into_view_if_needed()
                box = canvas.bounding_box()  # again: clicking the buttons below may scroll the page
                cx, cy, r = (
                    box["x"] + box["width"] * 0.5,
                    box["y"] + box["height"] * 0.5,
                    box["height"] * 0.35,
                )
                shift = (-1) ** rep * 20
                corners = [
                    (cx - r + shift, cy - r),
                    (cx + shift, cy - r),
                    (cx + shift, cy + r),
                    (cx - r + shift, cy + r),
                ]
                t = time.perf_counter()
                lasso(page, [*corners, corners[0]])
                rows.setdefault("lasso drag: 16 mouse moves while the lasso is drawn", []).append(
                    time.perf_counter() - t
                )
                t = time.perf_counter()
                page.mouse.up()
                page.wait_for_function(
                    "(sel) => /[0-9][0-9,]* cells selected/.test((document.querySelector(sel) || {}).textContent || '')",
                    arg=f"{ACTIVE} .cellkit-selection-count",
                )
                rows.setdefault("lasso: mouse up → count from the kernel shown in the panel", []).append(
                    time.perf_counter() - t
                )
                count = int(label.inner_text().split(" cells")[0].replace(",", ""))
                counts.append(count)
                t = time.perf_counter()
                page.locator(f"{ACTIVE} button.jupyter-button:has-text('Save selection')").click()
                page.wait_for_function(
                    "(want) => (document.querySelector(want.sel) || {}).textContent.includes(want.text)",
                    arg={
                        "sel": f"{ACTIVE} .cellkit-message",
                        "text": f"selection “lasso_{rep + 1}” ({count:,} cells)",
                    },
                )
                rows.setdefault("Save selection → saved (named selection in the state)", []).append(
                    time.perf_counter() - t
                )
                t = time.perf_counter()
                page.locator(f"{ACTIVE} button.jupyter-button:has-text('Clear selection')").click()
                page.wait_for_function(
                    "(sel) => (document.querySelector(sel) || {}).textContent.includes('No cells selected')",
                    arg=f"{ACTIVE} .cellkit-selection-count",
                )
                rows.setdefault("Clear selection → cleared", []).append(time.perf_counter() - t)
            # zoom: mouse wheel over the plot, until the next frame is drawn (no kernel involved)
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            for rep in range(2 * args.repeats):
                since = page.evaluate("() => performance.now()")
                t = time.perf_counter()
                page.mouse.wheel(0, -240 if rep % 2 == 0 else 240)
                page.wait_for_function("(s) => window.__gl.draws.some(d => d > s)", arg=since)
                settle(page)
                rows.setdefault("zoom (mouse wheel) → frame drawn", []).append(time.perf_counter() - t)
            page.screenshot(path=str(home / "scatter_jscatter.png"))
            browser.close()
    finally:
        lab.shutdown_kernels()
        lab.stop()
    print(
        f"\n{n:,} cells, jupyter-scatter view, JupyterLab + headless Chromium (WebGL renderer: {renderer}), "
        f"{platform.machine()}, {os.cpu_count()} cores (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}); median of {args.repeats}; lasso selected "
        f"{', '.join(f'{c:,}' for c in counts)} cells; screenshot {home / 'scatter_jscatter.png'}\n"
    )
    print("| step | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


def lasso(page, points: list[tuple[float, float]], steps: int = 4) -> None:
    """Press the mouse at ``points[0]`` and move through the points (slowly enough for the lasso)."""
    page.mouse.move(*points[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        for k in range(1, steps + 1):
            page.mouse.move(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
            page.wait_for_timeout(15)


if __name__ == "__main__":
    main()
