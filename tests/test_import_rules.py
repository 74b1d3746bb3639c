"""Who may import whom (style.md §5), checked on the source (AST) and at run time (subprocess)."""

from __future__ import annotations

import ast
import importlib
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
    "genes": {"data", "_anndata"},  # cellkit.genes: the public face of gene identity (data.genes)
    "tasks": {"core", "data", "train", "model", "_inference", "_utils", "_anndata", "analysis"},
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
        "_utils",  # cellkit.Progress (the progress / cancel object of every long call), lazily
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
    "genes": {"ipywidgets", "plotly", "matplotlib"},
    "data": {"ipywidgets", "plotly"},
    "checkpoints": {"ipywidgets", "plotly", "matplotlib"},
    "viz": {"torch", "ipywidgets"},
}
WIDGET_ONLY = {"ipywidgets", "jupyterlab"}
#: the public modules cellkit/widgets may import from (full module paths: a panel is a view over
#: the documented API, so ``cellkit.data.sources`` or ``cellkit._errors`` are out even though their
#: packages are public); every imported name must be in the module's ``__all__``
WIDGETS_MAY_IMPORT = {
    "cellkit",
    "cellkit.viz",
    "cellkit.analysis",
    "cellkit.datasets",
    "cellkit.tasks",
    "cellkit.perturbation",
    "cellkit.model",
    "cellkit.data",
    "cellkit.train",
    "cellkit.presets",
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import in a file."""
    return [(mod, line) for mod, line, _ in _imported_names(path)]


def _imported_names(path: Path) -> list[tuple[str, int, tuple[str, ...]]]:
    """(absolute module name, line, names taken from it) for every import in a file.

    ``import a.b`` takes no names (the module itself); ``from a import b, c`` takes ``b``, ``c``.
    """
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
            found += [(a.name, node.lineno, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found += [(f"{mod}.{a.name}", node.lineno, ()) for a in node.names]
                    continue
            else:
                mod = node.module or ""
            found.append((mod, node.lineno, tuple(a.name for a in node.names)))
    return found


def _public_names(module: str) -> set[str]:
    """``__all__`` of a cellkit module."""
    return set(getattr(importlib.import_module(module), "__all__", ()))


def _widget_import_problems(path: Path) -> list[str]:
    """A widget module may take only public names of public modules (full paths, ``__all__``)."""
    bad = []
    for mod, line, names in _imported_names(path):
        if mod.split(".")[0] != "cellkit" or mod.startswith("cellkit.widgets"):
            continue
        if mod not in WIDGETS_MAY_IMPORT:
            bad.append(f"line {line}: imports {mod}, not a public module (see WIDGETS_MAY_IMPORT)")
            continue
        private = [n for n in names if n not in _public_names(mod) and n != "*"]
        # ``from cellkit import datasets`` names a public submodule, not an attribute
        private = [n for n in private if f"{mod}.{n}" not in WIDGETS_MAY_IMPORT | {"cellkit.widgets"}]
        if private:
            bad.append(f"line {line}: {mod}.{', '.join(private)} not in {mod}.__all__")
    return bad


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
            if pkg == "widgets":
                continue  # checked on full module paths and names below
            target = rest[0] if rest else "__init__"
            if target not in allowed:
                bad.append(f"line {line}: imports cellkit.{target}")
        elif top in BANNED.get(pkg, set()) or (top in WIDGET_ONLY and pkg != "widgets"):
            bad.append(f"line {line}: imports {top}")
    if pkg == "widgets":
        # the studio is a view over the public API: no core, loaders, heads or private modules
        bad += _widget_import_problems(path)
    assert not bad, f"{path.relative_to(PKG.parent)} breaks the import rules: " + "; ".join(bad)


def test_widget_rule_sees_full_paths_and_names(tmp_path):
    """The widget rule must catch what the first-component rule let through (issue 16)."""
    probe = PKG / "widgets" / "_probe_for_test.py"
    probe.write_text(
        "from cellkit.data.sources import select_rows\n"
        "from cellkit.perturbation import META_FILE\n"
        "from cellkit._errors import DataError\n"
        "from cellkit import ConfigError, datasets\n",
        encoding="utf-8",
    )
    try:
        bad = _widget_import_problems(probe)
    finally:
        probe.unlink()
    assert len(bad) == 3, bad
    assert any("cellkit.data.sources" in b for b in bad)
    assert any("META_FILE" in b for b in bad)
    assert any("cellkit._errors" in b for b in bad)


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
