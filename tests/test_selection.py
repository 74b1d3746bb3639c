"""cellkit.data.select_cells / parse_query: one cell selection, a query grammar that runs no code.

Benign queries must select exactly what ``obs.query`` selects; crafted ones must be refused with a
``DataError`` before anything runs (checked with a marker file that a successful injection would
create), through the Python API, the studio state and the CLI ``--cells``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellkit
from cellkit import DataError
from cellkit.cli import main
from cellkit.data import CellQuery, parse_query, select_cells
from cellkit.data.selection import MAX_QUERY_CHARS, MAX_QUERY_DEPTH

from .test_finetune import make_adata, make_model

N = 60


@pytest.fixture(scope="module")
def obs() -> pd.DataFrame:
    r = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "label": pd.Categorical(r.choice(["B", "T", "NK", "CD14+ Monocyte"], N)),
            "n_genes": r.integers(100, 2000, N),
            "pct_mt": np.where(r.random(N) < 0.2, np.nan, r.random(N)),
            "batch": r.choice(["b1", "b2"], N).astype(object),
            "is_doublet": r.random(N) < 0.3,
            "cell type": r.choice(["x", "y"], N),
            "leiden": pd.Categorical(r.choice(["0", "1", "2"], N)),
            "grade": pd.Categorical(
                r.choice(["lo", "mid", "hi"], N), categories=["lo", "mid", "hi"], ordered=True
            ),
            "score": pd.array(np.where(r.random(N) < 0.3, None, r.integers(0, 5, N)), dtype="Int64"),
            "total": r.normal(1000, 300, N),
        },
        index=[f"cell{i}" for i in range(N)],
    )
    frame.index.name = "barcode"
    return frame


BENIGN = [
    "label == 'B'",
    'label != "B"',
    "n_genes > 500",
    "n_genes >= 500 and label == 'T'",
    "pct_mt < 0.5",
    "pct_mt != 0.5",  # NaN satisfies != (as in pandas)
    "pct_mt >= 0.1 or n_genes < 300",
    "label in ['B', 'T']",
    "label not in ['B', 'T']",
    "label.isin(['NK'])",
    "batch.isin(('b1',))",
    "is_doublet",
    "not is_doublet",
    "~is_doublet",
    "~(n_genes > 1000)",
    "(n_genes > 1000) & (pct_mt > .2)",
    "n_genes > 1000 & pct_mt > .2",  # & binds like `and`, as in DataFrame.query
    "n_genes > 1900 | label == 'NK'",
    "500 < n_genes <= 1500",
    "`cell type` == 'x'",
    "batch == 'b1' or batch == 'b2' and is_doublet",
    "label == ['B', 'NK']",
    "label != ['B']",
    "index == 'cell3'",
    "barcode in ['cell1', 'cell5', 'cell59']",
    "grade > 'lo'",
    "n_genes < -1",
    "total > -1e3",
    "n_genes == 1e3",
    "is_doublet == True",
    "is_doublet != False",
    "score > 2",
    "score != 2",
    "leiden == '1'",
    "total > n_genes",
    "label == 'not a label'",
    "not (label == 'B' or is_doublet)",
    "batch < 'b2'",
    "(label == 'B') and ((n_genes > 300) or (total < 900))",
    "label == 'CD14+ Monocyte'",
]


@pytest.mark.parametrize("query", BENIGN)
def test_benign_queries_select_what_obs_query_selects(obs, query):
    expected = obs.index.get_indexer(obs.query(query).index)
    got = select_cells(obs, query)
    np.testing.assert_array_equal(got, np.sort(expected))
    np.testing.assert_array_equal(parse_query(query).mask(obs), np.isin(np.arange(N), expected))


def _crafted(marker) -> list[str]:
    touch = f"touch {marker}"
    return [
        f"@pd.io.common.os.system('{touch}') == 0",
        f"label == @pd.io.common.os.system('{touch}')",
        f"pd.io.common.os.system('{touch}') == 0",
        f"__import__('os').system('{touch}') == 0",
        f"label.__class__.__init__.__globals__['os'].system('{touch}')",
        "().__class__.__bases__[0].__subclasses__()",
        f"label == (lambda: __import__('os').system('{touch}'))()",
        f"label in [__import__('os').system('{touch}') for _ in [1]]",
        f"label == f\"{{__import__('os').system('{touch}')}}\"",
        f"(x := __import__('os').system('{touch}')) == 1",
        "label[0] == 'B'",
        f"label.isin(__import__('os').system('{touch}'))",
        f"label.isin(['B'], other=__import__('os').system('{touch}'))",
        "label.str.contains('B')",
        f"exec('import os; os.system(\"{touch}\")') == None",
        f"open('{marker}', 'w') == 1",
        "globals() == 1",
        "label == {'B'}",
        "label == {'B': 1}",
        "n_genes + 1 > 3",
        "n_genes * 10**10**10 > 1",
        "label if is_doublet else batch",
        "label is None",
        "label == b'B'",
        "n_genes == 1j",
        "n_genes == ...",
        "__builtins__ == 1",
        "`label`.__class__ == 1",
        "(" * (MAX_QUERY_DEPTH + 1) + "is_doublet" + ")" * (MAX_QUERY_DEPTH + 1),
        "(" * 5000 + "is_doublet" + ")" * 5000,
        "not " * 800 + "is_doublet",
        "~" * (MAX_QUERY_CHARS - 20) + "is_doublet",
        "label == '" + "x" * 1_000_000 + "'",
        " or ".join(["is_doublet"] * 1000),
        "n_genes > 1" + "0" * 5000,
        "label ==",
        "`unclosed == 1",
        "",
    ]


def test_crafted_queries_are_refused_and_run_nothing(obs, tmp_path):
    marker = tmp_path / "MARKER"
    queries = _crafted(marker)
    assert len(queries) >= 12
    for query in queries:
        with pytest.raises(DataError, match="Cannot evaluate the cell query") as info:
            select_cells(obs, query)
        message = str(info.value)
        assert len(message) < 2000, "the refusal quotes the query shortened"
        assert not marker.exists(), query
    # the refusal of a construct outside the grammar says what is allowed
    with pytest.raises(DataError, match=r"col\.isin\(\[\.\.\.\]\).*backticks"):
        parse_query(f"@pd.io.common.os.system('touch {marker}') == 0")
    with pytest.raises(DataError, match="@"):
        parse_query("label == @value")


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("bulk_labels == 'B'", r"'bulk_labels' is not an obs column.*available columns: 'label', 'n_genes'"),
        ("label == CD14", r"'CD14' is not an obs column\. If 'CD14' is a value, quote it: label == 'CD14'"),
        ("leiden == 1", r"column 'leiden' holds text, so compare it with a quoted string: leiden == '1'"),
        ("label in ['B', 3]", "holds text"),
        ("n_genes == 'many'", "holds numbers"),
        ("label < 'B'", "unordered categorical"),
        ("n_genes", "not True/False"),
        ("1 == 1", "compares two values"),
        ("label in batch", "literal list"),
        ("n_genes < [1, 2]", "list can only be used"),
        ("True", "lone True/False"),
    ],
)
def test_query_errors_explain_the_fix(obs, query, match):
    with pytest.raises(DataError, match=match):
        select_cells(obs, query)


def test_parse_query_reports_columns_and_is_reusable(obs):
    q = parse_query("`cell type` == 'x' and n_genes > 500 or label.isin(['B']) and n_genes < 2000")
    assert isinstance(q, CellQuery)
    assert q.columns == ("cell type", "n_genes", "label")
    np.testing.assert_array_equal(select_cells(obs, q), np.flatnonzero(q.mask(obs)))
    assert q.mask(obs.iloc[:10]).shape == (10,)


def test_selection_inputs_and_order(obs):
    names = list(obs.index)
    assert select_cells(obs, None).tolist() == list(range(N))
    mask = np.zeros(N, bool)
    mask[[7, 3]] = True
    assert select_cells(obs, mask).tolist() == [3, 7]
    assert select_cells(obs, pd.Series(mask)).tolist() == [3, 7]
    nullable = pd.array([True, None, *([False] * (N - 2))], dtype="boolean")
    assert select_cells(obs, pd.Series(nullable)).tolist() == [0]  # missing counts as False
    # sorted (default): obs order, each cell once; input: as given, repeats kept
    assert select_cells(obs, [9, 2, 9, -1]).tolist() == [2, 9, N - 1]
    assert select_cells(obs, [9, 2, 9, -1], order="input").tolist() == [9, 2, 9, N - 1]
    assert select_cells(obs, [names[5], names[1]]).tolist() == [1, 5]
    assert select_cells(obs, np.array([names[5], names[1]]), order="input").tolist() == [5, 1]
    assert select_cells(obs, []).tolist() == []
    assert select_cells(obs, "label == 'none'").tolist() == []
    assert select_cells(obs, np.int64(4)).tolist() == [4]
    # a bare index of names stands for a table without columns
    assert select_cells(obs.index, [names[2]]).tolist() == [2]
    with pytest.raises(DataError, match="obs has no columns"):
        select_cells(obs.index, "label == 'B'")
    # named selections (the studio's) come before the query reading
    sel = {"lasso 1": [names[4], names[0]], "mono": "label == 'CD14+ Monocyte'"}
    assert select_cells(obs, "lasso 1", selections=sel).tolist() == [0, 4]
    assert select_cells(obs, "lasso 1", selections=sel, order="input").tolist() == [4, 0]
    np.testing.assert_array_equal(
        select_cells(obs, "mono", selections=sel), select_cells(obs, "label == 'CD14+ Monocyte'")
    )
    assert len(select_cells(obs, "n_genes > 0", selections=sel)) == N
    with pytest.raises(DataError, match=r"No selection named 'lasso 2' \(known: 'lasso 1', 'mono'\)"):
        select_cells(obs, "lasso 2", selections=sel)


@pytest.mark.parametrize(
    ("cells", "match"),
    [
        (np.zeros(3, bool), f"boolean mask needs {N} entries"),
        ([N], rf"positions must be in \[0, {N}\)"),
        ([-N - 1], rf"positions must be in \[0, {N}\)"),
        ([1.0, 2.0], "integers, not floats"),
        (["nope", "cell1"], r"1 selected cell names are not in the data.*'nope'"),
        (np.zeros((2, 2), int), "one-dimensional"),
        (420, rf"positions must be in \[0, {N}\)"),
    ],
)
def test_bad_selections(obs, cells, match):
    with pytest.raises(DataError, match=match):
        select_cells(obs, cells)


def test_duplicate_obs_names_are_explained():
    obs = pd.DataFrame({"a": [1, 2, 3]}, index=["x", "x", "y"])
    assert select_cells(obs, "a > 1").tolist() == [1, 2]  # masks need no unique names
    with pytest.raises(DataError, match="obs_names_make_unique"):
        select_cells(obs, ["y"])


def test_order_option_is_checked(obs):
    with pytest.raises(DataError, match="order must be"):
        select_cells(obs, None, order="random")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- through the kit
ATTACK = "@pd.io.common.os.system('touch {marker}') == 0"


def test_public_api_refuses_crafted_queries(tmp_path):
    from cellkit.analysis import embed_cells
    from cellkit.analysis.attention import gene_attention
    from cellkit.widgets import StudioState

    marker = tmp_path / "MARKER"
    attacks = [ATTACK.format(marker=marker), f"__import__('os').system('touch {marker}') == 0"]
    adata = make_adata(n_per_class=4)
    before = adata.copy()
    model = make_model()
    state = StudioState()
    state.adata = adata
    calls = [
        lambda q: cellkit.tokenize(adata, model, cells=q, progress=False),
        lambda q: embed_cells(adata, model, cells=q, progress=False),
        lambda q: gene_attention(adata, model, cells=q),
        lambda q: cellkit.finetune(adata, model, label_key="cell_type", cells=q, epochs=1, progress=False),
        lambda q: state.add_selection("x", q),
    ]
    for call in calls:
        for q in attacks:
            with pytest.raises(DataError, match="Cannot evaluate the cell query"):
                call(q)
            assert not marker.exists()
    assert state.selections == {}
    assert before.obs.equals(adata.obs) and set(adata.obsm) == set(before.obsm)
    # the same entry points accept the grammar
    toks = cellkit.tokenize(adata, model, cells="cell_type == 'type1' and batch == 'b1'", progress=False)
    mask = ((adata.obs["cell_type"] == "type1") & (adata.obs["batch"] == "b1")).to_numpy()
    assert list(toks.obs_names) == list(adata.obs_names[mask])
    names = state.add_selection("t1", "cell_type == 'type1'")
    assert list(names) == list(adata.obs_names[adata.obs["cell_type"] == "type1"])
    assert list(state.resolve_cells("t1")) == list(names)


def test_cli_cells_refuses_crafted_queries(tmp_path, capsys):
    data = tmp_path / "cells.h5ad"
    make_adata(n_per_class=4).write_h5ad(data)
    model_dir = tmp_path / "model"
    make_model().save(model_dir)
    marker = tmp_path / "MARKER"
    for query in (ATTACK.format(marker=marker), f"cell_type.__class__.__init__.__globals__ == '{marker}'"):
        args = ["finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "cell_type"]
        code = main([*args, "--cells", query, "--epochs", "1", "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Cannot evaluate the cell query" in err and "Traceback" not in err
        assert not marker.exists()
        assert not (tmp_path / "out").exists()
