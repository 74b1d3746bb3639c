"""similar_genes_bar / token_length_histogram / draw_into: what the studio's gene and data panels show."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import cellkit.viz as cv
from cellkit import DataError


def test_similar_genes_bar_puts_the_best_on_top():
    table = pd.DataFrame({"gene": ["MS4A1", "BLK", "BANK1"], "similarity": [0.9, 0.8, 0.7]})
    fig = cv.similar_genes_bar(table, gene="CD79A")
    bar = fig.data[0]
    assert bar.type == "bar" and bar.orientation == "h" and bar.name == "similarity"
    assert list(bar.y) == ["BANK1", "BLK", "MS4A1"]  # plotly draws y bottom-up: best on top
    np.testing.assert_allclose(bar.x, [0.7, 0.8, 0.9])
    assert fig.layout.title.text == "genes most similar to CD79A" and fig.layout.yaxis.type == "category"
    # every name keeps its row: the height grows with the genes
    many = pd.DataFrame({"gene": [f"G{i}" for i in range(100)], "similarity": np.linspace(1, 0, 100)})
    assert cv.similar_genes_bar(many).layout.height == 18 * 100 + 90


def test_similar_genes_bar_empty_and_wrong_tables():
    assert len(cv.similar_genes_bar(None).data[0].y) == 0
    with pytest.raises(DataError, match="similarity"):
        cv.similar_genes_bar(pd.DataFrame({"gene": ["A"]}))


def test_token_length_histogram_marks_the_limit():
    fig = cv.token_length_histogram([3, 5, 5, 8], max_length=8)
    assert fig.data[0].type == "histogram" and list(fig.data[0].x) == [3, 5, 5, 8]
    assert [s.x0 for s in fig.layout.shapes] == [8]
    assert cv.token_length_histogram([1, 2]).layout.shapes == ()


def test_draw_into_replaces_lines_and_notes_with_the_new_figure():
    live = go.FigureWidget(cv.token_length_histogram([1, 2, 3], max_length=3))
    assert len(live.layout.shapes) == 1
    cv.draw_into(live, cv.token_length_histogram([4, 5]))
    assert list(live.data[0].x) == [4, 5] and live.layout.shapes == () and live.layout.annotations == ()
    cv.draw_into(live, cv.token_length_histogram([4, 5], max_length=9))
    assert [s.x0 for s in live.layout.shapes] == [9]
