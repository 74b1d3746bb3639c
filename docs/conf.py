"""Sphinx configuration: the cellkit API reference, rendered from the numpy-style docstrings.

Build it with ``python -m sphinx -b html docs docs/_build/html`` (CI builds it with ``-W`` through
``tests/test_docs.py``). The build is offline: no intersphinx, no remote assets.
"""

from __future__ import annotations

import sys
from pathlib import Path

# document the checkout this file lives in, installed or not
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "cellkit" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

import cellkit  # noqa: E402

project = "cellkit"
author = "cellkit developers"
copyright = "cellkit developers"
release = cellkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# one page per public name; module pages list exactly the names in the module's __all__
autosummary_generate = True
autosummary_ignore_module_all = False
autosummary_imported_members = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# class pages document their members with autodoc (``:members:`` in the class template);
# numpydoc's own member tables would list every method a second time
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

html_theme = "furo"
html_title = f"cellkit {release}"
html_static_path: list[str] = []

# Re-exported names make some unqualified type hints ambiguous: ``TokenizedCells`` in a signature is
# both ``cellkit.TokenizedCells`` and ``cellkit.data.TokenizedCells`` (the same class, documented
# under each public name). Sphinx links the first and warns "more than one target found"; that
# warning (``ref.python``) says nothing about the docstrings, so it is off. Missing references stay
# silent because ``nitpicky`` is off.
suppress_warnings = ["ref.python"]


def _keep_first_alias(app: object) -> None:
    """Register each class's defining path (``:canonical:``) once, not once per public name.

    autodoc marks ``cellkit.GeneVocab`` and ``cellkit.data.GeneVocab`` with the same canonical name
    ``cellkit.data.vocab.GeneVocab``; Sphinx's Python domain reports the second alias as a
    "duplicate object description" although both pages document one class under two public names.
    A real duplicate (two non-alias descriptions of one name) still warns.
    """
    from sphinx.domains.python import PythonDomain

    note_object = PythonDomain.note_object
    if getattr(note_object, "_cellkit_keep_first_alias", False):
        return

    def patched(self, name, objtype, node_id, aliased=False, location=None):  # type: ignore[no-untyped-def]
        other = self.objects.get(name)
        if aliased and other is not None and other.aliased:
            return
        note_object(self, name, objtype, node_id, aliased=aliased, location=location)

    patched._cellkit_keep_first_alias = True  # type: ignore[attr-defined]
    PythonDomain.note_object = patched  # type: ignore[method-assign]


def setup(app: object) -> dict[str, bool]:
    _keep_first_alias(app)
    return {"parallel_read_safe": True}
