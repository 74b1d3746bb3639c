"""Who may import whom (style.md §5), checked on the source (AST) and at run time (subprocess)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cellkit"

LEAVES = {"_errors", "_version"}
#: package (first component under cellkit) -> cellkit packages it may import
ALLOWED: dict[str, set[str]] = {
    "_errors": set(),
    "_version": set(),
    "_utils": set(),
    "_anndata": set(),  # the AnnData contract (unique names, no silent overwrite)
    "core": {"_utils"},
    "data": {"_utils", "_anndata"},
    "heads": {"core", "_utils"},
    "checkpoints": {"core", "heads", "data", "_utils"},
    "model": {"core", "heads", "data", "checkpoints", "_utils"},
    "presets": {"core", "data", "model", "checkpoints", "_utils"},
    "train": {"core", "_utils"},
    "_inference": {"core", "data", "train", "model", "_utils"},
    "analysis": {"core", "data", "heads", "model", "_inference", "_utils", "_anndata"},
    "tasks": {"core", "data", "train", "model", "_inference", "_utils", "_anndata"},
    "perturbation": {"core", "data", "train", "model", "presets", "_inference", "_utils", "_anndata"},
    "datasets": {"model", "data", "presets", "tasks", "_utils"},
    "viz": {"_utils"},
    "cli": {
        "core",
        "heads",
        "data",
        "checkpoints",
        "model",
        "presets",
        "train",
        "tasks",
        "datasets",
        "analysis",
        "viz",
        "_utils",
    },
    "__main__": {"cli"},
    "__init__": {
        "core",
        "data",
        "model",
        "heads",
        "checkpoints",
        "train",
        "tasks",
        "perturbation",
        "presets",
        "datasets",
        "analysis",
        "viz",
        "widgets",
    },
    "widgets": set(),  # checked against WIDGETS_MAY_IMPORT
}
#: third-party modules a package must never import
BANNED: dict[str, set[str]] = {
    "core": {
        "anndata",
        "pandas",
        "scanpy",
        "ipywidgets",
        "plotly",
        "matplotlib",
        "transformers",
        "safetensors",
        "h5py",
        "umap",
        "sklearn",
    },
    "heads": {"anndata", "pandas", "scanpy", "ipywidgets", "plotly", "matplotlib"},
    "train": {"anndata", "scanpy", "ipywidgets", "plotly", "matplotlib"},
    "tasks": {"ipywidgets", "plotly", "matplotlib"},
    "perturbation": {"ipywidgets", "plotly", "matplotlib"},
    "_inference": {"anndata", "scanpy", "ipywidgets", "plotly", "matplotlib"},
    "analysis": {"ipywidgets", "plotly", "matplotlib"},
    "data": {"ipywidgets", "plotly"},
    "checkpoints": {"ipywidgets", "plotly", "matplotlib"},
    "viz": {"torch", "ipywidgets"},
}
WIDGET_ONLY = {"ipywidgets", "jupyterlab"}
#: what cellkit/widgets may import from cellkit: public packages only
WIDGETS_MAY_IMPORT = {
    "__init__",
    "viz",
    "analysis",
    "datasets",
    "tasks",
    "perturbation",
    "model",
    "data",
    "train",
    "presets",
    "widgets",
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        here = parts
    else:
        here = parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
    return found


def _sources():
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PKG)))
def test_import_rules(path):
    pkg = _package_of(path)
    assert pkg in ALLOWED, f"{pkg} has no row in the import-rule table; add one in tests/test_import_rules.py"
    allowed = ALLOWED[pkg] | LEAVES | {pkg}
    bad = []
    for mod, line in _imports(path):
        top, *rest = mod.split(".")
        if top == "cellkit":
            target = rest[0] if rest else "__init__"
            if pkg == "widgets":
                # the studio is a view over the public API: no core, loaders, heads or private modules
                ok = target in WIDGETS_MAY_IMPORT | LEAVES
            else:
                ok = target in allowed
            if not ok:
                bad.append(f"line {line}: imports cellkit.{target}")
        elif top in BANNED.get(pkg, set()) or (top in WIDGET_ONLY and pkg != "widgets"):
            bad.append(f"line {line}: imports {top}")
    assert not bad, f"{path.relative_to(PKG.parent)} breaks the import rules: " + "; ".join(bad)


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.split(".")[0] for m in out.split()}


HEAVY = {
    "scanpy",
    "umap",
    "plotly",
    "ipywidgets",
    "jupyterlab",
    "matplotlib",
    "sklearn",
    "numba",
}


def test_import_cellkit_is_light():
    loaded = _loaded_after("import cellkit")
    assert not (loaded & (HEAVY | {"torch", "anndata", "pandas"})), loaded & (
        HEAVY | {"torch", "anndata", "pandas"}
    )


def test_core_and_model_do_not_load_analysis_or_ui_modules():
    loaded = _loaded_after("import cellkit.core, cellkit.model, cellkit.heads")
    assert not (loaded & (HEAVY | {"anndata", "pandas", "transformers"}))
