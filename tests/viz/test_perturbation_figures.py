"""cellkit.viz perturbation figures: in-silico shift bars and violins, predicted expression changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellkit.viz as cv
from cellkit import DataError


def _summary(null: bool, goal: bool) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"perturbation": ["A", "B+C"], "mean_shift": [0.1, 0.3], "n_cells": [5, 7]},
    )
    frame["null_mean"] = [0.05, np.nan] if null else np.nan
    frame["null_std"] = [0.01, np.nan] if null else np.nan
    if goal:
        frame["goal_shift"] = [0.02, -0.01]
    return frame


def test_shift_bars_with_null_and_goal():
    fig = cv.perturbation_shifts(_summary(null=True, goal=True))
    assert [t.name for t in fig.data] == ["mean shift", "null mean ± std (random genes)", "shift toward goal"]
    assert list(fig.data[0].x) == ["A", "B+C"] and list(fig.data[0].y) == [0.1, 0.3]
    assert list(fig.data[0].customdata) == [5, 7]
    assert list(fig.data[1].y) == [0.05, None]  # NaN is a gap, not a zero
    assert list(fig.data[1].error_y.array) == [0.01, 0.0]
    assert [t.name for t in cv.perturbation_shifts(_summary(null=False, goal=False)).data] == ["mean shift"]
    with pytest.raises(DataError, match="mean_shift"):
        cv.perturbation_shifts(pd.DataFrame({"perturbation": ["A"]}))


def test_cell_violins_show_counted_cells_only():
    cells = pd.DataFrame(
        {
            "perturbation": ["A", "A", "A", "B"],
            "cell": ["c0", "c1", "c2", "c0"],
            "counted": [True, False, True, False],
            "shift": [0.1, 0.0, 0.2, 0.0],
        }
    )
    fig = cv.perturbation_cells(cells)
    assert [t.name for t in fig.data] == ["A", "B"]
    assert list(fig.data[0].y) == [0.1, 0.2] and list(fig.data[0].text) == ["c0", "c2"]
    assert len(fig.data[1].y) == 0
    assert cv.perturbation_cells(cells, max_points=1).data[0].points is False


def test_response_bars_show_the_top_genes_and_observed_changes():
    genes = [f"G{i}" for i in range(5)]
    changes = pd.DataFrame(
        {
            "perturbation": ["X"] * 5 + ["Y"] * 5,
            "gene": genes * 2,
            "predicted_change": [0.1, -0.9, 0.3, 0.0, 0.2, 0.0, 0.1, 0.0, 0.5, 0.0],
            "observed_change": [0.2, -1.0, 0.1, 0.0, 0.1] + [np.nan] * 5,
        }
    )
    fig = cv.perturbation_response(changes, top_k=3)
    assert [t.name for t in fig.data] == ["X", "Y", "X observed"]  # Y has no observed cells
    assert list(fig.data[0].x) == ["G1", "G3", "G2"]  # largest |change| over both perturbations
    assert list(fig.data[0].y) == [-0.9, 0.0, 0.3] and list(fig.data[2].y) == [-1.0, 0.0, 0.1]
    assert "top 3 genes" in fig.layout.title.text
    with pytest.raises(DataError, match="top_k"):
        cv.perturbation_response(changes, top_k=0)
