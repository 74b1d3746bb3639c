"""cellkit.viz perturbation figures: in-silico shift bars and violins, predicted expression changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellkit.viz as cv
from cellkit import DataError
from cellkit.viz import _perturbation


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


def test_shift_bars_grey_when_not_distinguishable_from_the_null():
    summary = pd.DataFrame(
        {
            "perturbation": ["A", "B", "C"],
            "mean_shift": [3e-7, 1e-7, 5e-6],
            "n_cells": [10, 10, 10],
            "null_mean": [2e-7, 2e-7, 2e-7],
            "null_std": [1e-7, 1e-7, 1e-7],
            "z": [1.0, -1.0, 48.0],
            "p": [0.2, 0.8, 0.01],
            "distinguishable": [False, False, True],
        }
    )
    fig = cv.perturbation_shifts(summary)
    bars = fig.data[0]
    grey, blue = _perturbation.NULL_LIKE_COLOR, _perturbation.SHIFT_COLOR
    assert list(bars.marker.color) == [grey, grey, blue]
    legend = [t.name for t in fig.data[2:]]
    assert legend == [_perturbation.DISTINGUISHABLE_NAME, _perturbation.NOT_DISTINGUISHABLE_NAME]
    assert "not distinguishable from random genes" in legend[1]
    assert all(t.x == (None,) for t in fig.data[2:])  # legend entries only, no data
    assert (
        bars.customdata[0][3] == _perturbation.NOT_DISTINGUISHABLE_NAME
        and "p %{customdata[1]" in bars.hovertemplate
    )
    assert not fig.layout.annotations  # a null exists: no "no null" note
    # without the column the rule is p < 0.05 and z >= 2, the summary's own rule
    derived = cv.perturbation_shifts(summary.drop(columns="distinguishable"))
    assert list(derived.data[0].marker.color) == [grey, grey, blue]
    all_grey = cv.perturbation_shifts(summary.assign(distinguishable=False))
    assert [t.name for t in all_grey.data[2:]] == [_perturbation.NOT_DISTINGUISHABLE_NAME]


def test_shift_bars_without_null_say_so():
    fig = cv.perturbation_shifts(_summary(null=False, goal=False).assign(p=np.nan, z=np.nan))
    assert [t.name for t in fig.data] == ["mean shift"]
    assert fig.data[0].marker.color is None  # not greyed: nothing was compared
    (note,) = fig.layout.annotations
    assert note.text.startswith("no null computed")


def test_shift_axes_never_use_si_prefixes():
    tiny = pd.DataFrame({"perturbation": ["A", "B"], "mean_shift": [8e-7, 2e-6], "n_cells": [3, 3]})
    fig = cv.perturbation_shifts(tiny)
    assert fig.layout.yaxis.tickformat == ".1e" and fig.layout.yaxis.exponentformat == "e"
    assert "cosine" in fig.layout.yaxis.title.text
    big = cv.perturbation_shifts(_summary(null=True, goal=True))
    assert big.layout.yaxis.tickformat == ".3~g" and big.layout.yaxis.exponentformat == "e"
    cells = pd.DataFrame(
        {"perturbation": ["A", "A"], "cell": ["c0", "c1"], "counted": [True, True], "shift": [1e-7, 3e-7]}
    )
    violins = cv.perturbation_cells(cells)
    assert violins.layout.yaxis.tickformat == ".1e" and violins.layout.yaxis.exponentformat == "e"
    assert cv.perturbation_cells(cells.assign(shift=[0.1, 0.3])).layout.yaxis.tickformat == ".3~g"
