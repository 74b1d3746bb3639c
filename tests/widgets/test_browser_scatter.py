"""The Embeddings panel at 200k cells in a real browser: jupyter-scatter in JupyterLab + Chromium.

One notebook shows :class:`cellkit.widgets.EmbeddingPanel` on a synthetic 200,000-cell AnnData
(above the 100k threshold, so jupyter-scatter draws it); the tests run in order on that page:
every point reaches the GPU and is drawn, the panel's colour controls recolour it, and a lasso
drawn with the mouse becomes the panel's selection (its count computed in the kernel), which
"Save selection" stores. WebGL calls are counted by a page init script (Chromium here has no GPU:
SwiftShader). Screenshots go to ``$CELLKIT_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import itertools
import re

import pytest

from ._browser import (
    ACTIVE,
    ROOT,
    artifacts_dir,
    lab_with_notebook,
    notebook_page,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

N = 200_000
NOTEBOOK = "scatter_under_test.ipynb"
CELLS = [
    f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    "import anndata as ad, numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    f"n = {N}; centres = rng.uniform(-10, 10, size=(8, 2)); cluster = rng.integers(0, 8, size=n)\n"
    "xy = (centres[cluster] + rng.normal(size=(n, 2))).astype(np.float32)\n"
    "adata = ad.AnnData(np.maximum(xy, 0), obs=pd.DataFrame({'cluster': pd.Categorical([f'c{c}' for c in cluster])},\n"
    "    index=[f'cell{i}' for i in range(n)]), var=pd.DataFrame(index=['GENE_A', 'GENE_B']))\n"
    "adata.obsm['X_umap'] = xy",
    "from cellkit.widgets import EmbeddingPanel, StudioState\n"
    "panel = EmbeddingPanel(StudioState(adata=adata, adata_name='adata'))\n"
    "assert panel.backend == 'jscatter', panel.backend\n"
    "panel",
]

#: records WebGL texture uploads (regl-scatterplot keeps the points in one texture) and draws
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
      C.prototype[name] = function (...a) {
        window.__gl.draws.push(performance.now());
        if (window.__gl.draws.length > 1000) window.__gl.draws.splice(0, 500);
        return f.apply(this, a);
      };
    }
  }
})();"""

#: all points uploaded after ``since`` and a frame drawn after that; the legend shows ``want``
GL_DRAWN = """(want) => {
  const g = window.__gl; if (!g) return false;
  const up = g.uploads.filter(u => u.t >= want.since && u.texels >= want.n);
  if (!up.length || !g.draws.some(d => d > up[up.length - 1].t)) return false;
  const root = document.querySelector(ACTIVE + ' .cellkit-embedding-gl');
  if (!root || !root.querySelector('canvas')) return false;
  const legend = root.querySelector('.legend');
  if (want.legend && !(legend && legend.textContent.includes(want.legend))) return false;
  if (want.entries && root.querySelectorAll('.legend-entry').length !== want.entries) return false;
  return true;
}""".replace("ACTIVE", repr(ACTIVE))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_with_notebook(tmp_path_factory, NOTEBOOK, CELLS, name="scatter-lab", modules=('jscatter',)) as server:
        yield server


@pytest.fixture(scope="module")
def page(lab):
    def drawn(pg):
        pg.wait_for_function(GL_DRAWN, arg={"n": N, "since": 0, "entries": 8})

    with notebook_page(
        lab,
        NOTEBOOK,
        "scatter",
        height=1100,
        timeout_ms=120_000,
        ready=drawn,
        failure_shot="fail-scatter-open.png",
        init_script=GL_SPY,
        idle_timeout=240,
    ) as pg:
        pg.locator(f"{ACTIVE} .cellkit-embedding-gl").scroll_into_view_if_needed()
        yield pg


@pytest.fixture(autouse=True)
def _remember_page(request, page):
    request.node._cellkit_page = page


def _text(page, css: str) -> str:
    return page.locator(f"{ACTIVE} {css}").first.inner_text()


def _shot(page, name: str) -> None:
    page.locator(f"{ACTIVE} .cellkit-embedding-panel").screenshot(
        path=str(artifacts_dir() / f"scatter-{name}.png")
    )


def test_every_point_drawn_with_jscatter(page):
    assert page.locator(f"{ACTIVE} :text('Error displaying widget')").count() == 0
    # plotly's figure is not shown
    assert page.locator(f"{ACTIVE} .cellkit-embedding-plot:visible").count() == 0
    assert "200,000 cells" in _text(page, ".cellkit-message")
    assert "X_umap — cluster" in _text(page, ".cellkit-embedding-gl-title")
    legend = page.locator(f"{ACTIVE} .cellkit-embedding-gl .legend-value").all_inner_texts()
    assert legend == [f"c{i}" for i in range(8)]
    _shot(page, "0-open")


def test_recolour_through_the_panel_controls(page):
    gene = page.locator(f"{ACTIVE} .cellkit-color-gene input")
    since = page.evaluate("() => performance.now()")
    gene.fill("GENE_A")
    gene.press("Enter")
    page.wait_for_function(GL_DRAWN, arg={"n": N, "since": since, "legend": "GENE_A"})
    _wait_text(page, ".cellkit-message", "Coloured by GENE_A")  # the message may follow the redraw
    assert "Coloured by GENE_A (a colour scale)" in _text(page, ".cellkit-message")
    _shot(page, "1-gene")
    since = page.evaluate("() => performance.now()")
    page.locator(f"{ACTIVE} .cellkit-color-by select").select_option(label="cluster")
    page.wait_for_function(GL_DRAWN, arg={"n": N, "since": since, "entries": 8})
    _wait_text(page, ".cellkit-embedding-gl-title", "cluster")
    assert "X_umap — cluster" in _text(page, ".cellkit-embedding-gl-title")
    legend = _text(page, ".cellkit-embedding-gl .legend")
    assert "cluster" in legend and "GENE_A" not in legend  # no stale colour-scale label


def _wait_text(page, selector: str, text: str) -> None:
    """Wait until the active notebook's ``selector`` contains ``text`` (a kernel reply can trail the drawing)."""
    page.wait_for_function(
        "([sel, t]) => ((document.querySelector(sel) || {}).textContent || '').includes(t)",
        arg=[f"{ACTIVE} {selector}", text],
    )


def _lasso(page, points: list[tuple[float, float]], steps: int = 4) -> None:
    """A real mouse drag through ``points`` (paced, so the lasso records each step)."""
    page.mouse.move(*points[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        for k in range(1, steps + 1):
            page.mouse.move(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
            page.wait_for_timeout(15)
    page.mouse.up()


def _count(page) -> int:
    page.wait_for_function(
        "(sel) => /[0-9][0-9,]* cells selected/.test((document.querySelector(sel) || {}).textContent || '')",
        arg=f"{ACTIVE} .cellkit-selection-count",
    )
    return int(
        re.search(r"([\d,]+) cells selected", _text(page, ".cellkit-selection-count"))[1].replace(",", "")
    )


def test_lasso_with_the_mouse_becomes_a_saved_selection(page):
    assert "No cells selected" in _text(page, ".cellkit-selection-count")
    box = page.locator(f"{ACTIVE} .cellkit-embedding-gl canvas").first.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.1
    x1, y1 = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.9
    _lasso(page, [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    n = _count(page)  # the label is the kernel's count of the pending cells
    assert 0 < n < N
    _shot(page, "2-lasso")
    page.locator(f"{ACTIVE} button.jupyter-button:has-text('Save selection')").click()
    page.wait_for_function(
        "(want) => (document.querySelector(want.sel) || {}).textContent.includes(want.text)",
        arg={"sel": f"{ACTIVE} .cellkit-message", "text": f"Saved selection “lasso_1” ({n:,} cells)"},
    )
    assert page.locator(f"{ACTIVE} .cellkit-selection-name input").input_value() == "lasso_2"
    # a second, smaller lasso inside the first replaces the pending selection
    canvas = page.locator(f"{ACTIVE} .cellkit-embedding-gl canvas").first
    canvas.scroll_into_view_if_needed()
    moved = canvas.bounding_box()  # clicking Save may have scrolled the page
    dy = moved["y"] - box["y"]
    y0, y1 = y0 + dy, y1 + dy
    xm = (x0 + x1) / 2
    _lasso(page, [(x0, y0), (xm, y0), (xm, y1), (x0, y1), (x0, y0)])
    page.wait_for_function(
        "(want) => !(document.querySelector(want.sel) || {}).textContent.includes(want.text)",
        arg={"sel": f"{ACTIVE} .cellkit-selection-count", "text": f"{n:,} cells selected"},
    )
    assert 0 < _count(page) < n
    page.locator(f"{ACTIVE} button.jupyter-button:has-text('Clear selection')").click()
    page.wait_for_function(
        "(sel) => (document.querySelector(sel) || {}).textContent.includes('No cells selected')",
        arg=f"{ACTIVE} .cellkit-selection-count",
    )
