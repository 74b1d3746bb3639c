"""The API reference (docs/): every public name is documented, listed and rendered with -W.

The build runs Sphinx (autodoc + autosummary + numpydoc) the way README.md says, with warnings as
errors, into a temporary directory so the checkout's ``docs/`` stays untouched.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import cellkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# the subpackages the reference documents (each through the names in its __all__)
SUBPACKAGES = [
    "cellkit.analysis",
    "cellkit.genes",
    "cellkit.viz",
    "cellkit.perturbation",
    "cellkit.data",
    "cellkit.train",
    "cellkit.presets",
    "cellkit.checkpoints",
    "cellkit.datasets",
    "cellkit.widgets",
]


def _public(modname: str) -> list[tuple[str, object]]:
    module = importlib.import_module(modname)
    return [(name, getattr(module, name)) for name in module.__all__]


def _own_doc(obj: object) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return (doc or "").strip()


@pytest.mark.parametrize("modname", ["cellkit", *SUBPACKAGES])
def test_every_public_function_and_class_has_a_docstring(modname):
    missing = [
        name
        for name, obj in _public(modname)
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and not _own_doc(obj)
    ]
    assert missing == [], f"{modname}: public names without a docstring: {missing}"


def test_api_page_lists_every_top_level_name_and_subpackage():
    api = (DOCS / "api.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^ {3}([\w.]+)\s*$", api, flags=re.MULTILINE))
    assert set(cellkit.__all__) - listed == set()
    assert set(SUBPACKAGES) - listed == set()


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "generated", "*.png"))
    out = tmp_path / "html"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(src), str(out)],
        capture_output=True, text=True, env=env, timeout=540, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"

    # every top-level name: listed on the API page, linked to its own rendered page
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in cellkit.__all__:
        page = f"generated/cellkit.{name}.html"
        assert f'href="{page}' in api, f"cellkit.{name} is not linked from api.html"
        assert (out / page).is_file(), page
    # every subpackage: linked from the API page; every name in its __all__ has a page linked from it
    for modname in SUBPACKAGES:
        assert f'href="generated/{modname}.html' in api, modname
        module_page = (out / "generated" / f"{modname}.html").read_text(encoding="utf-8")
        for name, _ in _public(modname):
            page = f"{modname}.{name}.html"
            assert f'href="{page}' in module_page, f"{modname}.{name} is not linked from its module page"
            assert (out / "generated" / page).is_file(), page
    # the object inventory (what search and cross-references use) holds every top-level name:
    # four header lines, then zlib-compressed "name domain:role priority uri dispname" lines
    header, _, body = (out / "objects.inv").read_bytes().partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2")
    documented = {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}
    assert {f"cellkit.{name}" for name in cellkit.__all__} - documented == set()
