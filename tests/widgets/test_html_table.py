"""html_table: every column once, one header row (issue 17: tables showed a duplicated index)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ipywidgets")

from cellkit.widgets._base import html_table


def _header(html: str) -> list[list[str]]:
    head = re.search(r"<thead>(.*?)</thead>", html, flags=re.S).group(1)
    return [
        re.findall(r"<th[^>]*>(.*?)</th>", row, flags=re.S) for row in re.findall(r"<tr.*?</tr>", head, re.S)
    ]


def _first_cells(html: str) -> list[str]:
    body = re.search(r"<tbody>(.*?)</tbody>", html, flags=re.S).group(1)
    return [
        re.search(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S).group(1)
        for row in re.findall(r"<tr.*?</tr>", body, re.S)
    ]


def test_range_index_is_not_shown_beside_a_rank_column():
    top = pd.DataFrame({"rank": [1, 2, 3], "gene": ["A", "B", "C"], "score": [0.3, 0.2, 0.1]})
    html = html_table(top)
    assert _header(html) == [["rank", "gene", "score"]]
    assert _first_cells(html) == ["1", "2", "3"]
    assert "<th>0</th>" not in html


def test_positional_index_of_a_subset_is_not_shown():
    table = pd.DataFrame({"perturbation": list("ab" * 4), "gene": list("wxyzwxyz")})
    top = table.groupby("perturbation", sort=False).head(2)  # index 0, 1, 2, 3 of the original rows
    assert _header(html_table(top)) == [["perturbation", "gene"]]


def test_index_named_like_a_column_shows_once():
    top = pd.DataFrame({"rank": [1, 2], "gene": ["A", "B"]}).set_index("rank", drop=False)
    html = html_table(top)
    assert _header(html) == [["rank", "gene"]]


def test_named_index_is_one_header_row():
    report = pd.DataFrame(
        {"precision": [0.5, 1.0], "support": [2, 1]}, index=pd.Index(["B", "T"], name="class")
    )
    html = html_table(report)
    assert _header(html) == [["class", "precision", "support"]]
    assert _first_cells(html) == ["B", "T"]
    ranked = pd.DataFrame({"gene": ["A", "B"]}, index=pd.Index([1, 2], name="rank"))
    assert _header(html_table(ranked)) == [["rank", "gene"]]


def test_unnamed_label_index_stays_and_column_axis_name_is_dropped():
    cm = pd.DataFrame(np.eye(2, dtype=int), index=["B", "T"], columns=pd.Index(["B", "T"], name="predicted"))
    html = html_table(cm)
    assert _header(html) == [["", "B", "T"]]
    assert _first_cells(html) == ["B", "T"]


def test_missing_values_read_as_a_dash_not_nan():
    import numpy as np
    import pandas as pd

    from cellkit.widgets._base import html_table

    out = html_table(pd.DataFrame({"gene": ["LYZ"], "z": [np.nan], "p": [np.nan], "shift": [6.4e-7]}))
    assert "NaN" not in out and out.count("<td>–</td>") == 2 and "6.4e-07" in out
