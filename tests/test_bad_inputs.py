"""Bad inputs over the public API and the CLI (issue 15): one table, one contract.

Every case must

* raise a :class:`cellkit.CellkitError` subclass (the CLI: exit code != 0, a ``cellkit: error:`` or
  argparse usage line, no traceback) whose message says what was wrong *and* how to fix it
  (each case's ``match`` names both parts);
* leave the caller's AnnData deep-equal to what it was;
* leave no half-written file (no ``.tmp-`` / ``.old-`` directory, outputs absent or unchanged);
* run nothing from its input: no crafted query, pickle, checkpoint or manifest creates the marker file.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import cellkit
from cellkit import CellkitError, CheckpointError, ConfigError, DataError, VocabError
from cellkit.analysis import embed_cells, transfer_labels
from cellkit.cli import main as cli_main

from .test_anndata_contract import assert_adata_equal, rich_adata, with_duplicates
from .test_finetune import make_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Observation names are not unique:UserWarning"),
    # torch notes the crafted best_model.pt's pickle protocol before refusing it
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


# ============================================================================ context
@dataclass
class Ctx:
    """What a case may use; ``adata`` is the caller's object whose state is checked afterwards."""

    tmp: Path
    marker: Path
    adata: ad.AnnData
    model: cellkit.CellModel
    clf: cellkit.CellModel
    model_dir: Path  # a saved cellkit model (a copy per case; cases may damage it)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def touch(self) -> str:
        """A shell command whose only effect is the marker file."""
        return f"touch {self.marker}"


class _Evil:
    """A pickle payload that would create the marker file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(ctx: Ctx) -> bytes:
    return pickle.dumps(_Evil(ctx.marker), protocol=4)


def _clf_model() -> cellkit.CellModel:
    m = make_model()
    m.add_head("classifier", n_classes=3, labels=["type0", "type1", "type2"])
    return m.eval()


# ---------------------------------------------------------------------------- damaged files
def _edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _config(ctx: Ctx) -> Path:
    return ctx.model_dir / "config.json"


def _set_model_field(key: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["model"]["encoder"][key] = value

    return edit


def _nan_weights(ctx: Ctx) -> None:
    f = ctx.model_dir / "model.safetensors"
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "cellkit"})


def _scgpt_dir(ctx: Ctx) -> Path:
    """An scGPT directory made by cellkit's own exporter (the model gains <eoc> for it)."""
    from cellkit import GeneVocab

    genes = [t for t in ctx.model.vocab.tokens if not ctx.model.vocab.is_special(t)]
    vocab = GeneVocab(
        [*genes, "<pad>", "<cls>", "<eoc>"], specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}
    )
    from cellkit.presets import scgpt_config

    m = cellkit.CellModel(scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, n_bins=11), vocab)
    return m.save(ctx.tmp / "scgpt_model", format="scgpt")


def _shards(ctx: Ctx) -> Path:
    out = ctx.tmp / "shards"
    cellkit.tokenize(ctx.adata.copy(), ctx.model, output=out, progress=False)
    return out


def _manifest(path: Path) -> Path:
    return path / "manifest.json"


# ============================================================================ the cases
@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    match: str  # regex over the message: what was wrong … how to fix it
    setup: Callable[[Ctx], None] | None = None


def _tok(ctx: Ctx, **kw: Any) -> Any:
    return cellkit.tokenize(ctx.adata, ctx.model, progress=False, **kw)


def _embed(ctx: Ctx, **kw: Any) -> Any:
    return embed_cells(ctx.adata, ctx.model, progress=False, **kw)


def _ft(ctx: Ctx, **kw: Any) -> Any:
    opts = {"label_key": "cell_type", "epochs": 1, "copy_model": True, "progress": False, **kw}
    return cellkit.finetune(ctx.adata, ctx.model, **opts)


def _dup(ctx: Ctx) -> None:
    with_duplicates(ctx.adata)


def _nan_x(ctx: Ctx) -> None:
    ctx.adata.X = ctx.adata.X.copy()
    ctx.adata.X.data[0] = np.nan


def _nan_rep(ctx: Ctx) -> None:
    ctx.adata.obsm["X_cellkit"] = np.full_like(ctx.adata.obsm["X_cellkit"], np.nan)


def _inf_rep(ctx: Ctx) -> None:
    ctx.adata.obsm["X_cellkit"] = ctx.adata.obsm["X_cellkit"].copy()
    ctx.adata.obsm["X_cellkit"][3, 2] = np.inf


def _no_raw(ctx: Ctx) -> None:
    del ctx.adata.raw


QUERY_WORDS = r"(query|allowed|comparisons|column)"

CASES: list[Case] = [
    # ------------------------------------------------------------------ cell selection: data, never code
    Case(
        "tokenize: @-reference query runs nothing",
        lambda c: _tok(c, cells=f"@pd.io.common.os.system('{c.touch}') == 0"),
        DataError,
        QUERY_WORDS,
    ),
    Case(
        "embed_cells: __import__ query runs nothing",
        lambda c: _embed(c, key_added="X_new", cells=f"__import__('os').system('{c.touch}') == 0"),
        DataError,
        QUERY_WORDS,
    ),
    Case(
        "finetune: method-call query refused",
        lambda c: _ft(c, cells="cell_type.str.contains('type')"),
        DataError,
        QUERY_WORDS,
    ),
    Case(
        "predict: lambda in a query refused",
        lambda c: cellkit.predict(c.adata, c.clf, cells="(lambda: 1)() == 1", progress=False),
        DataError,
        QUERY_WORDS,
    ),
    Case(
        "tokenize: unknown column names the columns",
        lambda c: _tok(c, cells="tissue == 'blood'"),
        DataError,
        r"tissue.*(cell_type|batch)",
    ),
    Case(
        "tokenize: unquoted value suggests quotes",
        lambda c: _tok(c, cells="cell_type == type0"),
        DataError,
        r"type0.*quot",
    ),
    Case("tokenize: empty mask", lambda c: _tok(c, cells=np.zeros(c.adata.n_obs, bool)), DataError, r"(?i)no cells|empty"),
    Case(
        "tokenize: mask of the wrong length",
        lambda c: _tok(c, cells=np.ones(c.adata.n_obs + 1, bool)),
        DataError,
        rf"{24}.*{25}|{25}.*{24}",
    ),
    Case(
        "embed_cells: positions out of range",
        lambda c: _embed(c, key_added="X_new", cells=[0, 10**6]),
        DataError,
        r"position",
    ),
    Case(
        "embed_cells: unknown cell names",
        lambda c: _embed(c, key_added="X_new", cells=["cell0", "no_such_cell"]),
        DataError,
        r"no_such_cell",
    ),
    # ------------------------------------------------------------------ the caller's AnnData
    Case("tokenize: duplicate obs_names", _tok, DataError, r"obs_names_make_unique\(\)", _dup),
    Case(
        "embed_cells: duplicate obs_names",
        lambda c: _embed(c, key_added="X_new"),
        DataError,
        r"obs_names_make_unique\(\)",
        _dup,
    ),
    Case("finetune: duplicate obs_names", _ft, DataError, r"obs_names_make_unique\(\)", _dup),
    Case(
        "predict: would overwrite the true labels",
        lambda c: cellkit.predict(c.adata, c.clf, key_added="cell_type", progress=False),
        DataError,
        r"cell_type.*(key_added|overwrite=True)",
    ),
    Case(
        "embed_cells: would replace another method's embedding",
        lambda c: _embed(c, key_added="X_pca"),
        DataError,
        r"X_pca.*(key_added|overwrite=True)",
    ),
    Case(
        "embed_cells: non-finite expression values",
        lambda c: _embed(c, key_added="X_new"),
        DataError,
        r"(?i)(non-finite|nan)",
        _nan_x,
    ),
    Case(
        "transfer_labels: all-NaN embedding",
        lambda c: transfer_labels(c.adata, rich_adata(), label_key="cell_type", key_added="t"),
        DataError,
        r"(?i)nan",
        _nan_rep,
    ),
    Case(
        "transfer_labels: infinite embedding value",
        lambda c: transfer_labels(rich_adata(), c.adata, label_key="cell_type", key_added="t"),
        DataError,
        r"(?i)(inf|non-finite)",
        _inf_rep,
    ),
    Case("finetune: label column missing", lambda c: _ft(c, label_key="celltype"), DataError, r"celltype.*cell_type"),
    Case("tokenize: layer missing", lambda c: _tok(c, layer="spliced"), DataError, r"spliced.*counts"),
    Case("tokenize: use_raw without .raw", lambda c: _tok(c, use_raw=True), DataError, r"raw.*layer", _no_raw),
    Case(
        "tokenize: no gene in the vocabulary",
        lambda c: cellkit.tokenize(c.adata, make_model([f"X{i}" for i in range(30)]), progress=False),
        DataError,
        r"(?i)none of .*gene_column",
    ),
    Case(
        "embed_cells: hidden layer out of range",
        lambda c: _embed(c, key_added="X_new", hidden_layer=99),
        CellkitError,
        r"99.*layer",
    ),
    # ------------------------------------------------------------------ outputs checked before work
    Case(
        "finetune: checkpoint_dir is a file",
        lambda c: _ft(c, checkpoint_dir=str(c.tmp / "afile")),
        CellkitError,
        r"afile",
        lambda c: (c.tmp / "afile").write_text("keep me"),
    ),
    Case(
        "finetune: checkpoint_dir below a file",
        lambda c: _ft(c, checkpoint_dir=str(c.tmp / "afile" / "ckpt")),
        CellkitError,
        r"afile",
        lambda c: (c.tmp / "afile").write_text("keep me"),
    ),
    Case(
        "tokenize: output is a file",
        lambda c: _tok(c, output=c.tmp / "afile"),
        CellkitError,
        r"afile",
        lambda c: (c.tmp / "afile").write_text("keep me"),
    ),
    Case(
        "save: path is a file",
        lambda c: c.model.save(c.tmp / "afile"),
        CellkitError,
        r"afile.*director",
        lambda c: (c.tmp / "afile").write_text("keep me"),
    ),
    Case(
        "save: a directory that is not a model",
        lambda c: c.model.save(c.tmp / "mydata"),
        CellkitError,
        r"mydata",
        lambda c: ((c.tmp / "mydata").mkdir(), (c.tmp / "mydata" / "notes.txt").write_text("mine")),
    ),
    Case(
        "save scgpt: vocabulary scGPT's loaders would not accept",
        lambda c: c.model.save(c.tmp / "as_scgpt", format="scgpt"),
        CellkitError,
        r"<eoc>",
    ),
    Case("save: unknown format", lambda c: c.model.save(c.tmp / "m", format="onnx"), ConfigError, r"onnx.*cellkit"),
    # ------------------------------------------------------------------ files are data, bounded by their size
    Case(
        "load: vocabulary id far beyond the entry count",
        lambda c: cellkit.load_model(c.model_dir),
        CellkitError,
        r"vocab\.json",
        lambda c: _edit_json(c.model_dir / "vocab.json", lambda d: d.__setitem__("G0", 10**9)),
    ),
    Case(
        "load: deeply nested vocab.json",
        lambda c: cellkit.load_model(c.model_dir),
        CellkitError,
        r"vocab\.json.*(nest|deep)",
        lambda c: (c.model_dir / "vocab.json").write_text("[" * 100_000 + "]" * 100_000),
    ),
    Case(
        "load: config.json is not JSON",
        lambda c: cellkit.load_model(c.model_dir),
        CellkitError,
        r"config\.json",
        lambda c: _config(c).write_text("{'model': 1"),
    ),
    Case(
        "load: config.json field of the wrong type",
        lambda c: cellkit.load_model(c.model_dir),
        CellkitError,
        r"config\.json.*d_model",
        lambda c: _edit_json(_config(c), _set_model_field("d_model", "wide")),
    ),
    Case(
        "load: config.json without its model section",
        lambda c: cellkit.load_model(c.model_dir),
        CellkitError,
        r"config\.json.*model",
        lambda c: _edit_json(_config(c), lambda d: d.pop("model")),
    ),
    Case(
        "load: NaN weights",
        lambda c: cellkit.load_model(c.model_dir),
        CheckpointError,
        r"(?i)(nan|non-finite).*",
        _nan_weights,
    ),
    Case(
        "load scgpt: best_model.pt that would run code",
        lambda c: cellkit.load_model(c.extra["scgpt"]),
        CheckpointError,
        r"weights_only",
        lambda c: (
            c.extra.__setitem__("scgpt", _scgpt_dir(c)),
            (c.extra["scgpt"] / "best_model.pt").write_bytes(_evil_pickle(c)),
        ),
    ),
    Case(
        "load scgpt: args.json with a non-number layer count",
        lambda c: cellkit.load_model(c.extra["scgpt"]),
        CellkitError,
        r"args\.json.*nlayers",
        lambda c: (
            c.extra.__setitem__("scgpt", _scgpt_dir(c)),
            _edit_json(c.extra["scgpt"] / "args.json", lambda d: d.__setitem__("nlayers", "two")),
        ),
    ),
    Case(
        "pickle: a Geneformer dictionary that would run code",
        lambda c: __import__("cellkit.checkpoints.safe_pickle", fromlist=["x"]).safe_load_pickle(c.extra["pkl"]),
        CellkitError,
        r"(?i)(refus|not allowed|forbidden).*",
        lambda c: (
            c.extra.__setitem__("pkl", c.tmp / "token_dictionary.pkl"),
            c.extra["pkl"].write_bytes(_evil_pickle(c)),
        ),
    ),
    Case(
        "shards: manifest names a file outside the directory",
        lambda c: cellkit.open_shards(c.extra["shards"]),
        CellkitError,
        r"manifest\.json",
        lambda c: (
            c.extra.__setitem__("shards", _shards(c)),
            _edit_json(
                _manifest(c.extra["shards"]),
                lambda d: d["shards"][0].__setitem__("name", "../../escape"),
            ),
        ),
    ),
    Case(
        "shards: manifest cell count disagrees with the arrays",
        lambda c: cellkit.open_shards(c.extra["shards"]).to_memory(),
        CellkitError,
        r"manifest\.json|cells",
        lambda c: (
            c.extra.__setitem__("shards", _shards(c)),
            _edit_json(_manifest(c.extra["shards"]), lambda d: d["shards"][0].__setitem__("n_cells", 3)),
        ),
    ),
    Case(
        "shards: a directory without a manifest",
        lambda c: cellkit.open_shards(c.tmp),
        CellkitError,
        r"manifest",
    ),
    Case(
        "resume: latest points outside the checkpoint root",
        lambda c: _ft(c, checkpoint_dir=str(c.tmp / "ckpt"), resume=True),
        CellkitError,
        r"ckpt",
        lambda c: ((c.tmp / "ckpt").mkdir(), (c.tmp / "ckpt" / "latest").write_text("../../etc\n")),
    ),
    Case(
        "vocabulary: duplicate token",
        lambda c: cellkit.GeneVocab(["A", "B", "A", "<pad>"], specials={"pad": "<pad>"}),
        VocabError,
        r"'A'",
    ),
]

CLI_CASES: list[tuple[str, Callable[[Ctx], list[str]], str, Callable[[Ctx], None] | None]] = [
    (
        "cli finetune: objective weight that is not a number",
        lambda c: ["finetune", "--model", str(c.model_dir), "--data", c.extra["h5ad"], "--label-key",
                   "cell_type", "--objectives", "cls,gep=abc"],
        r"abc",
        None,
    ),
    (
        "cli finetune: crafted --cells runs nothing",
        lambda c: ["finetune", "--model", str(c.model_dir), "--data", c.extra["h5ad"], "--label-key",
                   "cell_type", "--cells", f"@pd.io.common.os.system('{c.touch}') == 0", "--epochs", "1"],
        QUERY_WORDS,
        None,
    ),
    (
        "cli finetune: --out is a file",
        lambda c: ["finetune", "--model", str(c.model_dir), "--data", c.extra["h5ad"], "--label-key",
                   "cell_type", "--out", str(c.tmp / "afile"), "--epochs", "1"],
        r"afile",
        lambda c: (c.tmp / "afile").write_text("keep me"),
    ),
    (
        "cli info: damaged config.json",
        lambda c: ["info", str(c.model_dir)],
        r"config\.json",
        lambda c: _config(c).write_text("[1, 2"),
    ),
    (
        "cli pretrain: missing data file",
        lambda c: ["pretrain", "--data", str(c.tmp / "missing.h5ad"), "--epochs", "1"],
        r"missing\.h5ad",
        None,
    ),
]


def test_the_table_is_large_enough():
    assert len(CASES) + len(CLI_CASES) >= 40


# ============================================================================ the runner
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return make_model().save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def ctx(tmp_path, saved_model) -> Ctx:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(saved_model, model_dir)
    return Ctx(
        tmp=tmp_path,
        marker=tmp_path / "MARKER",
        adata=rich_adata(),
        model=make_model().eval(),
        clf=_clf_model(),
        model_dir=model_dir,
    )


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file under ``root`` with its bytes (directories as None)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def _no_litter(before: dict[str, bytes | None], root: Path) -> None:
    after = _tree(root)
    half = [k for k in after if re.search(r"\.(tmp|old)-", k)]
    assert not half, f"half-written files left behind: {half}"
    changed = [k for k in before if before[k] is not None and after.get(k) != before[k]]
    assert not changed, f"files changed by a failing call: {changed}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx):
    if case.setup is not None:
        case.setup(ctx)
    reference = ctx.adata.copy()
    before = _tree(ctx.tmp)
    with pytest.raises(case.error) as info:
        case.call(ctx)
    assert isinstance(info.value, CellkitError), f"{type(info.value).__name__} is not a CellkitError"
    message = str(info.value)
    assert re.search(case.match, message, flags=re.S), message
    assert len(message) >= 30, f"too terse to act on: {message!r}"
    assert "Traceback" not in message
    assert_adata_equal(ctx.adata, reference)
    assert not ctx.marker.exists(), "the input ran code"
    _no_litter(before, ctx.tmp)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(case, ctx: Ctx):
    _, argv, match, setup = case
    h5ad = ctx.tmp / "cells.h5ad"
    ctx.adata.write_h5ad(h5ad)
    ctx.extra["h5ad"] = str(h5ad)
    if setup is not None:
        setup(ctx)
    before = _tree(ctx.tmp)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = cli_main(argv(ctx))
        except SystemExit as e:  # argparse usage errors
            code = e.code
    text = err.getvalue()
    assert code not in (0, None), text
    assert "Traceback" not in text, text
    assert re.search(r"(cellkit: error:|error:)", text), text
    assert re.search(match, text, flags=re.S), text
    assert not ctx.marker.exists(), "the input ran code"
    _no_litter(before, ctx.tmp)
