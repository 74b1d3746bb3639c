"""The embedding explorer's scatter at 100k cells in a real browser (headless Chromium, WebGL).

Builds a synthetic AnnData (``--n`` cells in 20 Gaussian blobs on a 2-D "UMAP", a 20-category
``cluster`` column, a 4-category ``batch`` column shown on hover, and genes whose expression
follows the layout), makes :class:`cellkit.widgets.EmbeddingPanel`'s figure and measures:

1. **render**: the panel's figure (coloured by ``cluster``: 20 ``Scattergl`` traces) drawn by
   ``Plotly.newPlot`` in headless Chromium until two animation frames after the plot resolved
   (the WebGL canvas is drawn; a screenshot checks that points are visible);
2. **recolour**: ``cluster → GENE_A → GENE_B → cluster``. Each step runs the panel's own
   ``color_by`` in Python, records the messages its ``FigureWidget`` sends to the browser
   (``deleteTraces`` / ``addTraces`` / ``update``), and replays exactly those in the page (the
   calls plotly's widget front end makes, numeric arrays as typed arrays like the widget's binary
   buffers), timed until drawn. ``GENE_A → GENE_B`` is the colour-only path (one array);
3. **box selection**: a mouse drag over part of the plot → ``plotly_selected`` in the page → the
   same points handed to the panel through ``FigureWidget._js2py_pointsCallback`` (what the
   widget's front end sends) → cells selected in Python.

No Jupyter server is involved: the kernel↔browser transport (comm messages) is not timed; the
message sizes are reported instead (JSON part + binary buffers, as plotly's widget sends them).
Prints a markdown table.

Usage::

    python benchmarks/scatter_browser.py [--n 100000] [--repeats 3] [--out DIR]

Needs ``playwright`` (pip package) and Chromium at ``/usr/bin/chromium`` (never ``playwright install``).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
BASE_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic"]
#: tried in order until WebGL is available
GL_ARGS = ([], ["--use-gl=swiftshader"], ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"])

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<script src="plotly.min.js"></script></head>
<body style="margin:0"><div id="plot" style="width:1000px;height:700px"></div>
<script>
// numeric arrays arrive as {dtype, bdata} (base64): make typed arrays, as the widget's binary buffers do
const TYPES = {f4: Float32Array, f8: Float64Array, i1: Int8Array, i2: Int16Array, i4: Int32Array,
               u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, float32: Float32Array, float64: Float64Array,
               int8: Int8Array, int16: Int16Array, int32: Int32Array, uint8: Uint8Array, uint16: Uint16Array,
               uint32: Uint32Array};
function decode(v) {
  if (Array.isArray(v)) return v.map(decode);
  if (v && typeof v === "object") {
    if (typeof v.bdata === "string" && v.dtype && TYPES[v.dtype]) {
      const bin = atob(v.bdata); const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      return new TYPES[v.dtype](bytes.buffer);
    }
    const out = {}; for (const k in v) out[k] = decode(v[k]); return out;
  }
  return v;
}
const frames = (n) => new Promise(res => { const step = k => k ? requestAnimationFrame(() => step(k - 1)) : res(); step(n); });
window.render = async (figJson) => {
  const fig = decode(JSON.parse(figJson));
  const gd = document.getElementById("plot");
  const t0 = performance.now();
  await Plotly.newPlot(gd, fig.data, fig.layout, {responsive: false});
  await frames(2);
  const t1 = performance.now();
  gd.on("plotly_selected", ev => { window.__sel = {n: ev ? ev.points.length : 0, t: performance.now(),
      points: ev ? ev.points.map(p => [p.curveNumber, p.pointNumber]) : []}; });
  return {ms: t1 - t0, traces: gd.data.length, canvases: gd.querySelectorAll("canvas").length,
          points: gd._fullData.reduce((s, t) => s + (t._length || 0), 0)};
};
window.replay = async (msgsJson) => {
  const msgs = decode(JSON.parse(msgsJson));
  const gd = document.getElementById("plot");
  const t0 = performance.now();
  for (const m of msgs) {
    if (m.kind === "deleteTraces") await Plotly.deleteTraces(gd, m.inds);
    else if (m.kind === "addTraces") await Plotly.addTraces(gd, m.traces);
    else if (m.kind === "update") await Plotly.update(gd, m.style, m.layout, m.inds);
    else if (m.kind === "restyle") await Plotly.restyle(gd, m.style, m.inds);
    else if (m.kind === "relayout") await Plotly.relayout(gd, m.layout);
  }
  await frames(2);
  const t1 = performance.now();
  return {ms: t1 - t0, traces: gd.data.length,
          points: gd._fullData.reduce((s, t) => s + (t._length || 0), 0)};
};
</script></body></html>
"""


def synthetic(n: int, n_genes: int = 50, seed: int = 0):
    """``n`` cells in 20 blobs (``obsm['X_umap']``), ``obs['cluster']`` (20), ``obs['batch']`` (4), genes."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    k = 20
    centres = rng.uniform(-15, 15, size=(k, 2))
    cluster = rng.integers(0, k, size=n)
    xy = (centres[cluster] + rng.normal(scale=1.2, size=(n, 2))).astype(np.float32)
    genes = [f"GENE_{chr(65 + i % 26)}{'' if i < 26 else i // 26}" for i in range(n_genes)]
    loadings = rng.normal(size=(2, n_genes)).astype(np.float32)
    x = np.maximum(xy @ loadings / 10 + rng.normal(scale=0.5, size=(n, n_genes)).astype(np.float32), 0)
    obs = pd.DataFrame(
        {
            "cluster": pd.Categorical([f"c{c:02d}" for c in cluster]),
            "batch": pd.Categorical(rng.choice(["b1", "b2", "b3", "b4"], size=n)),
            "n_counts": rng.gamma(5, 400, size=n).astype(np.float32),
        },
        index=[f"cell{i:07d}" for i in range(n)],
    )
    adata = ad.AnnData(x.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["X_umap"] = xy
    return adata


def record(fig):
    """Patch ``fig`` so that every message it sends to the front end is also recorded."""
    log: list[dict] = []

    def wrap(name, build):
        orig = getattr(fig, name)

        def wrapper(*args, **kwargs):
            a = inspect.signature(orig).bind(*args, **kwargs).arguments
            log.append(build(a))
            return orig(*args, **kwargs)

        setattr(fig, name, wrapper)

    wrap("_send_deleteTraces_msg", lambda a: {"kind": "deleteTraces", "inds": list(a["delete_inds"])})
    wrap("_send_addTraces_msg", lambda a: {"kind": "addTraces", "traces": a["new_traces_data"]})
    wrap(
        "_send_update_msg",
        lambda a: {
            "kind": "update",
            "style": a["restyle_data"],
            "layout": a["relayout_data"],
            "inds": a.get("trace_indexes"),
        },
    )
    wrap("_send_relayout_msg", lambda a: {"kind": "relayout", "layout": a["layout_data"]})
    wrap(
        "_send_restyle_msg",
        lambda a: {"kind": "restyle", "style": a["restyle_data"], "inds": a.get("trace_indexes")},
    )
    return log


def to_json(obj) -> tuple[str, float]:
    """``obj`` as JSON for the page, and the size in MB of the widget message carrying it.

    As plotly's widget serializer (``plotly.serializers._py_to_js``): 1-D numeric arrays other than
    int64 travel as binary buffers (here base64 typed-array specs that the page turns into typed
    arrays), everything else as JSON. The size counts the JSON part plus the raw buffer bytes.
    """
    binary = [0, 0]  # raw bytes, base64 characters

    def enc(v):
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [enc(x) for x in v]
        if isinstance(v, np.ndarray):
            if v.ndim == 1 and v.dtype.kind in "uif" and v.dtype not in (np.int64, np.uint64):
                data = base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")
                binary[0] += v.nbytes
                binary[1] += len(data)
                return {"dtype": v.dtype.str[1:], "bdata": data}
            return enc(v.tolist())
        if isinstance(v, np.generic):
            return v.item()
        return v

    text = json.dumps(enc(obj), separators=(",", ":"))
    return text, (len(text) - binary[1] + binary[0]) / 1e6


def launch(p):
    """Chromium with WebGL: the first flag set under which ``getContext('webgl')`` works."""
    tried = []
    for extra in GL_ARGS:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BASE_ARGS + extra)
        page = browser.new_page()
        info = page.evaluate(
            """() => { const c = document.createElement('canvas'); const gl = c.getContext('webgl');
            if (!gl) return null; const d = gl.getExtension('WEBGL_debug_renderer_info');
            return d ? gl.getParameter(d.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER); }"""
        )
        page.close()
        tried.append((extra, info))
        if info:
            return browser, extra, info, tried
        browser.close()
    raise SystemExit(f"no WebGL in headless Chromium with any of {GL_ARGS}: {tried}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="cells")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the recolour cycle (median reported)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "_out" / "scatter_browser"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import plotly.graph_objects as go
    from playwright.sync_api import sync_playwright
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    from cellkit.widgets import EmbeddingPanel, StudioState

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    adata = synthetic(args.n)
    t_data = time.perf_counter() - t

    t = time.perf_counter()
    go.FigureWidget()  # the process's first FigureWidget loads plotly's templates (a one-off cost)
    t_first_widget = time.perf_counter() - t
    t = time.perf_counter()
    panel = EmbeddingPanel(StudioState(adata=adata, adata_name="synthetic"))
    t_panel = time.perf_counter() - t
    assert panel.color_key == "cluster", panel.message_text
    assert len(panel.figure.data) == 20, panel.message_text
    fig_json, fig_mb = to_json(
        {
            "data": [t.to_plotly_json() for t in panel.figure.data],
            "layout": panel.figure.layout.to_plotly_json(),
        }
    )
    log = record(panel.figure)

    steps = [("cluster → GENE_A", "GENE_A"), ("GENE_A → GENE_B", "GENE_B"), ("GENE_B → cluster", "cluster")]
    work = Path(tempfile.mkdtemp(prefix="cellkit-scatter-"))
    (work / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    (work / "page.html").write_text(PAGE, encoding="utf-8")

    rows = []
    with sync_playwright() as pw:
        browser, gl_flags, renderer, tried = launch(pw)
        page = browser.new_page(viewport={"width": 1040, "height": 760})
        page.set_default_timeout(180_000)
        t = time.perf_counter()
        page.goto((work / "page.html").as_uri())
        page.wait_for_function("() => typeof Plotly !== 'undefined' && typeof window.render === 'function'")
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        res = page.evaluate("(j) => window.render(j)", fig_json)
        t_render_wall = time.perf_counter() - t
        shot = out / "render.png"
        page.locator("#plot").screenshot(path=str(shot))
        drawn = _coloured_fraction(shot)
        rows.append(
            {
                "step": "render (20 categories)",
                "python_s": t_panel,
                "browser_s": res["ms"] / 1000,
                "wall_s": t_render_wall,
                "mb": fig_mb,
                "traces": res["traces"],
                "points": res["points"],
            }
        )
        assert res["points"] == args.n, res

        timings: dict[str, list] = {s: [] for s, _ in steps}
        for rep in range(args.repeats):
            for label, key in steps:
                log.clear()
                t = time.perf_counter()
                panel.color_by(key)
                py = time.perf_counter() - t
                assert panel.last_error is None, panel.message_text
                msgs, msgs_mb = to_json(log)
                t = time.perf_counter()
                r = page.evaluate("(j) => window.replay(j)", msgs)
                wall = time.perf_counter() - t
                assert r["points"] == args.n, r
                timings[label].append(
                    (py, r["ms"] / 1000, wall, msgs_mb, r["traces"], [m["kind"] for m in log])
                )
                if rep == 0:
                    page.locator("#plot").screenshot(path=str(out / f"recolour_{key}.png"))
        for label, _ in steps:
            ts = timings[label]
            rows.append(
                {
                    "step": f"recolour {label}",
                    "python_s": statistics.median(x[0] for x in ts),
                    "browser_s": statistics.median(x[1] for x in ts),
                    "wall_s": statistics.median(x[2] for x in ts),
                    "mb": ts[0][3],
                    "traces": ts[0][4],
                    "points": args.n,
                    "msgs": "+".join(ts[0][5]),
                }
            )

        # box selection by mouse drag over the left half of the plot area
        box = page.evaluate(
            """() => { const gd = document.getElementById('plot'); const l = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            return {x0: r.left + l.margin.l + 2, y0: r.top + l.margin.t + 2,
                    x1: r.left + l.margin.l + l._size.w * 0.5, y1: r.top + l.margin.t + l._size.h - 2}; }"""
        )
        page.evaluate("() => { window.__sel = null; return Plotly.relayout('plot', {dragmode: 'select'}); }")
        page.mouse.move(box["x0"], box["y0"])
        page.mouse.down()
        page.mouse.move(box["x1"], box["y1"], steps=8)
        t_up = page.evaluate("() => performance.now()")
        page.mouse.up()
        page.wait_for_function("() => window.__sel !== null")
        sel = page.evaluate("() => window.__sel")
        event = {
            "event_type": "plotly_selected",
            "points": {
                "trace_indexes": [c for c, _ in sel["points"]],
                "point_indexes": [i for _, i in sel["points"]],
                "xs": [0.0] * len(sel["points"]),
                "ys": [0.0] * len(sel["points"]),
            },
            "selector": {"type": "box", "selector_state": {"xrange": [-1e9, 1e9], "yrange": [-1e9, 1e9]}},
        }
        t = time.perf_counter()
        panel.figure._js2py_pointsCallback = event
        t_sel_py = time.perf_counter() - t
        assert len(panel.pending) == sel["n"], (len(panel.pending), sel["n"])
        rows.append(
            {
                "step": f"box selection ({sel['n']:,} cells)",
                "python_s": t_sel_py,
                "browser_s": (sel["t"] - t_up) / 1000,
                "wall_s": float("nan"),
                "mb": to_json(event)[1],
                "traces": len(panel.figure.data),
                "points": args.n,
            }
        )
        browser.close()

    import playwright

    version = getattr(playwright, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("playwright")
    print(f"## Embedding scatter in headless Chromium ({args.n:,} cells)\n")
    print(
        f"plotly.js {get_plotlyjs_version()}, playwright {version}, Chromium flags "
        f"`{' '.join(BASE_ARGS + gl_flags)}`, WebGL renderer: {renderer}; {os.cpu_count()} CPU cores; "
        f"synthetic data built in {t_data:.1f} s; first FigureWidget of the process {t_first_widget:.1f} s "
        f"(one-off, not in the table); page + plotly.js load {t_load:.2f} s; "
        f"render screenshot: {drawn:.1%} of the plot area coloured; median of {args.repeats} recolour cycles.\n"
    )
    for flags, info in tried:
        print(f"- WebGL with extra flags `{' '.join(flags) or '(none)'}`: {info or 'unavailable'}")
    print()
    print(
        "| step | traces | python s (panel) | browser s (until drawn) | evaluate wall s | message MB | messages |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wall = "–" if r["wall_s"] != r["wall_s"] else f"{r['wall_s']:.2f}"
        print(
            f"| {r['step']} | {r['traces']} | {r['python_s']:.2f} | {r['browser_s']:.2f} | {wall} | "
            f"{r['mb']:.2f} | {r.get('msgs', 'newPlot' if r['step'].startswith('render') else 'plotly_selected')} |"
        )
    print(f"\nScreenshots: {out}")


def _coloured_fraction(png: Path) -> float:
    """Fraction of non-white, non-grey pixels in a screenshot (points drawn ⇒ well above 0)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return float("nan")
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    spread = a.max(axis=2) - a.min(axis=2)
    return float((spread > 30).mean())


if __name__ == "__main__":
    main()
