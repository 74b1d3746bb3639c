"""One AnnData convention for every public function (issue 16 §2).

Modelled on scanpy's signature-convention test: walk the public API and check, for every public
function that takes an AnnData first,

1. the AnnData is the first parameter and is called ``adata`` (exceptions below, each with a reason);
2. only the data / model come positionally — every option after them is keyword-only;
3. ``layer`` is always an AnnData layer (a ``str``) and ``hidden_layer`` always a transformer layer
   (an ``int``); no ``data_layer``;
4. a function writes into the AnnData only under ``key_added``: writers return ``None`` (or a new
   AnnData with ``copy=True``) and take ``copy`` / ``overwrite``; functions that return a table
   store it in ``uns`` only when ``key_added`` is given (default ``None``);
5. the same thing has the same name across tokenize / finetune / embed / predict / analysis;
6. a numpy docstring whose "Parameters" section names every parameter.

Every module of the package starts with ``from __future__ import annotations``.

The one entry a writer adds besides its ``key_added`` names is ``uns["cellkit"]`` (see
:mod:`cellkit._anndata`): cellkit's record of the keys it wrote, which the overwrite protection reads
("never silently replace an entry cellkit did not write"). It is allowed below, and nothing else is.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest

import cellkit
from cellkit._anndata import REGISTRY_KEY

from .test_finetune import make_adata, make_model

# ============================================================================ the public API
#: modules whose public names are walked (cellkit.viz is included: it takes AnnData too)
MODULES = (
    "cellkit",
    "cellkit.analysis",
    "cellkit.perturbation",
    "cellkit.tasks",
    "cellkit.data.tokenize",
    "cellkit.viz",
)
#: first-parameter names that mean "an AnnData" even where the annotation does not say so
ADATA_NAMES = ("adata", "query")


def _public_functions() -> dict[str, Callable[..., Any]]:
    """``{qualified name: function}``, one entry per function object (re-exports collapsed)."""
    seen: dict[int, str] = {}
    out: dict[str, Callable[..., Any]] = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name)
            if not inspect.isfunction(obj) or id(obj) in seen:
                continue
            seen[id(obj)] = name
            out[f"{obj.__module__}.{name}"] = obj
    return out


def _takes_adata(fn: Callable[..., Any]) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    first = params[0]
    return "AnnData" in str(first.annotation) or first.name in ADATA_NAMES


PUBLIC = _public_functions()
ADATA_FUNCTIONS = {name: fn for name, fn in PUBLIC.items() if _takes_adata(fn)}


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def test_the_walk_finds_the_api():
    """Guard against an empty or partial walk (a renamed module would silently test nothing)."""
    found = {_short(n) for n in ADATA_FUNCTIONS}
    for must in (
        "tokenize",
        "finetune",
        "pretrain",
        "predict",
        "embed_cells",
        "umap",
        "transfer_labels",
        "embedding_metrics",
        "score_programs",
        "contextual_gene_embeddings",
        "attention_maps",
        "gene_attention",
        "attention_difference",
        "in_silico_perturb",
        "fit_perturbation_model",
        "evaluate_perturbation",
        "embedding",
    ):
        assert must in found, f"{must} is not walked"


# ============================================================================ 1. the AnnData first
#: functions whose first AnnData-typed parameter is not called ``adata``, and why
FIRST_NAME_EXCEPTIONS = {
    # a mapping between two AnnData objects: both are data, named for their roles (scanpy's ingest
    # has the same shape: adata, adata_ref)
    "transfer_labels": "query",
    # compares the observed screen with a predicted table; ``adata_true`` says which is which
    "evaluate_perturbation": "adata_true",
    # reads a stored result: the first argument is a gene_attention table, or an AnnData that
    # holds one in uns[key]
    "top_influenced_genes": "attention",
    # cellkit.viz draws arrays / tables first (an AnnData is one accepted container): figures,
    # not AnnData methods
    "embedding": "data",
    "static_embedding": "data",
    "embedding_selection": "data",
    "program_heatmap": "scores",
}


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_adata_is_the_first_parameter(name):
    first = next(iter(inspect.signature(ADATA_FUNCTIONS[name]).parameters))
    expected = FIRST_NAME_EXCEPTIONS.get(_short(name), "adata")
    assert first == expected, f"{name}: first parameter is {first!r}, the convention says {expected!r}"


# ============================================================================ 2. options keyword-only
#: parameters that may come positionally: the data and the model (in this order); anything else
#: is an option and keyword-only
POSITIONAL = ("adata", "model")
#: functions with other positional parameters, and why
POSITIONAL_EXCEPTIONS = {
    # two AnnData objects, both data
    "transfer_labels": ("query", "reference"),
    # the observed screen and the predicted table are the two inputs being compared
    "evaluate_perturbation": ("adata_true", "predicted"),
    # the program -> genes mapping is the subject of the call (scanpy's score_genes(adata, gene_list))
    "score_programs": ("adata", "programs"),
    # the key gene is what the question is about ("which genes attend to GENE?")
    "top_influenced_genes": ("attention", "gene"),
    # viz: the data being drawn (and for the heatmap its rows / grouping) come first
    "embedding": ("data",),
    "static_embedding": ("data",),
    # the shape drawn on the figure is what the question is about ("which cells are in it?")
    "embedding_selection": ("data", "selector"),
    "program_heatmap": ("scores", "programs", "groupby"),
}


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_options_are_keyword_only(name):
    allowed = POSITIONAL_EXCEPTIONS.get(_short(name), POSITIONAL)
    params = inspect.signature(ADATA_FUNCTIONS[name]).parameters.values()
    positional = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert positional == list(allowed[: len(positional)]), (
        f"{name}: {positional} may be passed positionally; only {list(allowed)} may — make the rest "
        "keyword-only (put them after `*`)."
    )


# ============================================================================ 3. layer vs hidden_layer
#: parameter names that are retired: the old spelling of a meaning that has one name now
RETIRED = {"data_layer": "layer (the AnnData layer)"}


def _doc_entry(fn: Callable[..., Any], param: str) -> str:
    return _parameters_section(fn).get(param, "")


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_layer_is_an_anndata_layer_and_hidden_layer_a_transformer_layer(name):
    fn = ADATA_FUNCTIONS[name]
    params = inspect.signature(fn).parameters
    for old, new in RETIRED.items():
        assert old not in params, f"{name} has {old}=; the convention's name is {new}"
    if "layer" in params:
        ann = str(params["layer"].annotation)
        assert "str" in ann and "int" not in ann, f"{name}: layer must be an AnnData layer name, got {ann}"
        doc = _doc_entry(fn, "layer").lower()
        assert "transformer" not in doc, f"{name}: the docstring of layer speaks of the transformer layer"
    if "hidden_layer" in params:
        ann = str(params["hidden_layer"].annotation)
        assert "int" in ann and "str" not in ann, f"{name}: hidden_layer must be a layer index, got {ann}"


# ============================================================================ 4. writes only under key_added
#: functions that write results into the AnnData: return None, or a new AnnData with copy=True
WRITERS = {"embed_cells", "predict", "transfer_labels", "umap", "score_programs"}
#: functions that return a table and store it in ``uns[key_added]`` only when asked
TABLE_STORERS = {"gene_attention", "in_silico_perturb"}


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_key_added_copy_and_return_type(name):
    short = _short(name)
    params = inspect.signature(ADATA_FUNCTIONS[name]).parameters
    ret = str(inspect.signature(ADATA_FUNCTIONS[name]).return_annotation)
    if "key_added" in params or "copy" in params:
        assert short in WRITERS | TABLE_STORERS, (
            f"{name} writes into the AnnData: classify it in WRITERS or TABLE_STORERS of this test"
        )
    if short in WRITERS:
        for p in ("key_added", "copy", "overwrite"):
            assert p in params, f"writer {name} lacks {p}="
        assert params["copy"].default is False
        assert ret.replace(" ", "") in ("AnnData|None", "None|AnnData"), f"{name} returns {ret}"
    if short in TABLE_STORERS:
        assert "key_added" in params and "overwrite" in params
        assert params["key_added"].default is None, (
            f"{name} stores into uns by default (key_added={params['key_added'].default!r}); nothing lands "
            "in uns unless asked"
        )
        assert "copy" not in params, f"{name} returns its table; storing it needs no copy of the AnnData"
        assert "AnnData" not in ret, f"{name} returns {ret}: one return type, the table (or result object)"


def _keys(a: ad.AnnData) -> set[tuple[str, str]]:
    out = set()
    for attr in ("obs", "var"):
        out |= {(attr, str(k)) for k in getattr(a, attr).columns}
    for attr in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        out |= {(attr, str(k)) for k in getattr(a, attr)}
    return out


@pytest.fixture(scope="module")
def model() -> cellkit.CellModel:
    return make_model().eval()


@pytest.fixture(scope="module")
def clf_model() -> cellkit.CellModel:
    m = make_model()
    m.add_head("classifier", n_classes=3, labels=["type0", "type1", "type2"])
    return m.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def _tiny() -> ad.AnnData:
    a = make_adata(n_per_class=4)
    a.obsm["X_cellkit"] = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    return a


#: writer -> call(adata, model, classifier, key_added=..., copy=...)
WRITER_CALLS: dict[str, Callable[..., Any]] = {
    "embed_cells": lambda a, m, c, **kw: cellkit.embed_cells(a, m, progress=False, **kw),
    "predict": lambda a, m, c, **kw: cellkit.predict(a, c, progress=False, **kw),
    "transfer_labels": lambda a, m, c, **kw: cellkit.transfer_labels(
        a, _tiny(), label_key="cell_type", n_neighbors=3, **kw
    ),
    "score_programs": lambda a, m, c, **kw: cellkit.analysis.score_programs(
        a, {"P0": ["G1", "G2", "G3"]}, use_raw=False, **kw
    ),
}


def _check_written_only_under(before: set, after: set, key: str, name: str) -> None:
    new = after - before
    stray = sorted(
        (attr, k) for attr, k in new if not k.startswith(key) and not (attr == "uns" and k == REGISTRY_KEY)
    )
    assert not stray, f"{name} wrote {stray} outside key_added={key!r}"
    assert new, f"{name} wrote nothing"


@pytest.mark.parametrize("name", sorted(WRITER_CALLS))
def test_writers_return_none_and_write_only_under_key_added(name, model, clf_model):
    run = WRITER_CALLS[name]
    a = _tiny()
    before = _keys(a)
    assert run(a, model, clf_model, key_added="mine") is None
    _check_written_only_under(before, _keys(a), "mine", name)
    # copy=True: a new AnnData with the results, the caller's untouched
    b = _tiny()
    out = run(b, model, clf_model, key_added="mine", copy=True)
    assert isinstance(out, ad.AnnData) and out is not b
    assert _keys(b) == before
    _check_written_only_under(before, _keys(out), "mine", name)


TABLE_CALLS: dict[str, Callable[..., Any]] = {
    "gene_attention": lambda a, m, **kw: cellkit.analysis.gene_attention(a, m, cells=[0, 1, 2], **kw),
    "in_silico_perturb": lambda a, m, **kw: (
        cellkit.analysis.in_silico_perturb(a, m, genes=["G1"], cells=[0, 1, 2], progress=False, **kw).summary
    ),
}


@pytest.mark.parametrize("name", sorted(TABLE_CALLS))
def test_tables_land_in_uns_only_when_asked(name, model):
    run = TABLE_CALLS[name]
    a = _tiny()
    before = _keys(a)
    table = run(a, model)
    assert table is not None and len(table)
    assert _keys(a) == before, f"{name} wrote into the AnnData without key_added"
    run(a, model, key_added="mine")
    assert _keys(a) - before == {("uns", "mine"), ("uns", REGISTRY_KEY)}


# ============================================================================ 5. same names for the same things
#: a name for an idea -> spellings that must not appear as parameters of an AnnData function
SYNONYMS = {
    "batch_size": ("bs", "batchsize", "n_batch"),
    # progress=True / False / a cellkit.Progress (which carries the callback and the cancel)
    "progress": (
        "verbose",
        "show_progress",
        "progress_bar",
        "progress_callback",
        "on_progress",
        "cancel_event",
    ),
    "cells": ("cell_mask", "subset", "obs_mask", "select"),
    "use_raw": ("raw",),
    "gene_column": ("gene_symbols", "var_names_column", "gene_key"),
    "tokenize_options": ("tokenizer_options", "tokenize_kwargs", "tokenizer_kwargs"),
    "device": ("dev", "torch_device"),
    "hidden_layer": ("emb_layer", "layer_index", "transformer_layer"),
    "chunk_size": ("chunksize", "chunk"),
    "copy_model": ("inplace_model",),
}
#: viz.embedding names the var column of gene symbols after scanpy's plotting (``gene_symbols``):
#: it colours by a symbol, it does not tokenize
SYNONYM_EXCEPTIONS = {
    ("embedding", "gene_symbols"),
    ("static_embedding", "gene_symbols"),
    ("embedding_selection", "gene_symbols"),
    ("embedding_colors", "gene_symbols"),
}


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_same_names_for_the_same_things(name):
    params = set(inspect.signature(ADATA_FUNCTIONS[name]).parameters)
    for canonical, others in SYNONYMS.items():
        for other in others:
            if (_short(name), other) in SYNONYM_EXCEPTIONS:
                continue
            assert other not in params, f"{name} calls {canonical!r} {other!r}"


def test_shared_options_have_the_same_types():
    """An option shared by several AnnData functions means one thing: same annotation everywhere.

    ``hidden_layer`` is left out on purpose: it is always a transformer layer index, but embeddings
    default to ``None`` (the model's own embedding layer, e.g. Geneformer's second-to-last) while the
    attention functions analyse one concrete layer (``-1`` = the last).
    """
    by_param: dict[str, dict[str, str]] = {}
    for name, fn in ADATA_FUNCTIONS.items():
        if _short(name) in FIRST_NAME_EXCEPTIONS and _short(name) not in ("transfer_labels",):
            continue
        for p in inspect.signature(fn).parameters.values():
            by_param.setdefault(p.name, {})[name] = str(p.annotation)
    for name in TRAINING_PROGRESS:  # see TRAINING_PROGRESS: a bar there, not a cellkit.Progress
        by_param.get("progress", {}).pop(name, None)
    for param in ("cells", "layer", "use_raw", "gene_column", "tokenize_options", "progress", "batch_size"):
        anns = set(by_param.get(param, {}).values())
        if param == "batch_size":  # see BATCH_SIZE_ANNOTATIONS
            assert anns <= BATCH_SIZE_ANNOTATIONS, f"batch_size is annotated differently: {by_param[param]}"
            continue
        assert len(anns) <= 1, f"{param} is annotated differently: {by_param[param]}"


#: ``batch_size="auto"`` (halve after out-of-memory; ``cellkit._inference.AutoBatchSize``) is offered by
#: inference calls (``int | str``); a training batch size is a hyperparameter (``int``)
BATCH_SIZE_ANNOTATIONS = {"int", "int | str"}


#: training functions whose ``progress`` is only the tqdm bar: they report to a UI through
#: ``callbacks=`` (live events) and stop through ``stop_event=`` (with a checkpoint, returning the
#: partial result), which the live training view uses; a cellkit.Progress would be a second way
TRAINING_PROGRESS = {
    "cellkit.tasks.finetune",
    "cellkit.tasks.pretrain",
    "cellkit.perturbation.fit_perturbation_model",
}
#: the long AnnData-facing calls a widget runs: each reports progress and can be cancelled
LONG_CALLS = (
    "tokenize",
    "embed_cells",
    "predict",
    "contextual_gene_embeddings",
    "attention_maps",
    "gene_attention",
    "attention_difference",
    "in_silico_perturb",
)


@pytest.mark.parametrize("short", LONG_CALLS)
def test_long_calls_take_one_progress_option(short):
    """``progress: bool | Progress = True`` on every long call (one way to follow and cancel it)."""
    (name,) = [n for n in ADATA_FUNCTIONS if _short(n) == short]
    params = inspect.signature(ADATA_FUNCTIONS[name]).parameters
    assert "progress" in params, f"{name} is a long call without progress="
    assert str(params["progress"].annotation) == "bool | Progress", name
    assert params["progress"].default is True
    doc = _doc_entry(ADATA_FUNCTIONS[name], "progress")
    assert "Progress" in doc, f"{name}: the docstring of progress does not mention cellkit.Progress"


# ============================================================================ 6. docstrings
_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\s*$", re.MULTILINE)


def _parameters_section(fn: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: its text}`` from the numpy "Parameters" section (``a, b`` lines name both)."""
    doc = inspect.getdoc(fn) or ""
    heads = list(_SECTION.finditer(doc))
    out: dict[str, str] = {}
    for i, h in enumerate(heads):
        if h.group(1).strip() != "Parameters":
            continue
        end = heads[i + 1].start() if i + 1 < len(heads) else len(doc)
        names: list[str] = []
        for line in doc[h.end() : end].splitlines():
            if not line.strip():
                continue
            if not line.startswith((" ", "\t")):
                names = [
                    n.strip().lstrip("*").split(" : ")[0].strip() for n in line.split(" : ")[0].split(",")
                ]
                for n in names:
                    out[n] = ""
            else:
                for n in names:
                    out[n] += " " + line.strip()
    return out


@pytest.mark.parametrize("name", sorted(ADATA_FUNCTIONS))
def test_docstring_lists_every_parameter(name):
    fn = ADATA_FUNCTIONS[name]
    documented = _parameters_section(fn)
    assert documented, f"{name} has no numpy 'Parameters' section"
    params = [p.name for p in inspect.signature(fn).parameters.values()]
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: the docstring's Parameters section does not list {missing}"
    extra = [d for d in documented if d not in params]
    assert not extra, f"{name}: the docstring documents {extra}, which are not parameters"


# ============================================================================ future annotations
PACKAGE = Path(cellkit.__file__).parent


def _modules() -> Iterator[Path]:
    yield from sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_has_future_annotations(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if not tree.body:  # an empty __init__ has nothing to annotate
        return
    found = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )
    assert found, f"{path.relative_to(PACKAGE)} lacks `from __future__ import annotations`"
