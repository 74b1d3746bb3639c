"""Gene-similarity network (e.g. cosine similarity of gene embeddings), laid out with networkx."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import ConfigError, DataError
from ._common import TEMPLATE, add_note, labelled_matrix
from ._palettes import NA_COLOR, default_palette

__all__ = ["gene_network"]


def gene_network(
    similarity: pd.DataFrame,
    *,
    threshold: float = 0.5,
    highlight: Sequence[str] | str | None = None,
    programs: Mapping[str, Any] | pd.Series | None = None,
    layout_seed: int = 0,
    max_nodes: int | None = 200,
    drop_isolated: bool = True,
    title: str | None = None,
    max_labels: int | None = 30,
) -> go.Figure:
    """Network of genes joined where their similarity reaches ``threshold``.

    Layout: ``networkx.spring_layout`` weighted by similarity (``layout_seed`` makes it
    reproducible). Edges are one line trace (``name="edges"``); nodes are coloured by program
    (one trace per program, with ``programs``) or by degree (one trace with a colour bar).
    Genes are labelled by name (all of them up to ``max_labels``, else the highlighted genes and
    the best connected ones; every gene's name shows on hover); ``highlight`` genes are drawn
    larger, outlined and named in larger red letters.

    Parameters
    ----------
    similarity
        Either a square ``(n_genes, n_genes)`` DataFrame (index and columns the same genes, e.g.
        cosine similarities of gene embeddings; the diagonal is ignored), or an edge list: a
        DataFrame with columns ``source``, ``target`` and optionally ``weight`` (default 1).
    threshold
        Keep edges with weight ``>= threshold``.
    highlight
        Genes to emphasise; always kept. Unknown genes raise :class:`DataError`.
    programs
        ``{gene: program}`` (or a Series indexed by gene): colour nodes by program; genes
        without one are grey (``"none"``).
    layout_seed
        Seed of the spring layout.
    max_nodes
        Keep at most this many genes: the highlighted ones, then those with the largest weighted
        degree; a note says so. ``None`` keeps all.
    drop_isolated
        Leave out genes without an edge at ``threshold`` (highlighted genes stay).
    title
        Figure title.
    max_labels
        Write the names of all genes when at most this many are drawn; otherwise of the
        highlighted genes and the ``max_labels`` genes with the most edges (a note says so).
        ``None`` names every gene.

    Returns
    -------
    plotly.graph_objects.Figure
        With no edge at ``threshold`` the figure has a note saying so (lower ``threshold``).
    """
    import networkx as nx

    edges = _edges(similarity)
    genes = pd.Index(pd.unique(np.concatenate([edges["source"].to_numpy(), edges["target"].to_numpy()])))
    if isinstance(similarity, pd.DataFrame) and not _is_edge_list(similarity):
        genes = pd.Index(similarity.index.astype(str))
    wanted = [highlight] if isinstance(highlight, str) else list(highlight or [])
    unknown = [g for g in wanted if g not in genes]
    if unknown:
        close = {g: difflib.get_close_matches(g, list(genes), n=3) for g in unknown}
        raise DataError(
            f"highlight genes {unknown} are not in the similarity matrix; close matches: {close}."
        )
    kept = edges[edges["weight"] >= threshold]
    graph = nx.Graph()
    graph.add_nodes_from(genes if not drop_isolated else wanted)
    graph.add_weighted_edges_from(kept[["source", "target", "weight"]].itertuples(index=False, name=None))
    notes = []
    if max_nodes is not None:
        if max_nodes < 1:
            raise ConfigError(f"max_nodes must be a positive integer or None; got {max_nodes}.")
        if graph.number_of_nodes() > max_nodes:
            strength = dict(graph.degree(weight="weight"))
            ranked = sorted(graph.nodes, key=lambda g: (g not in wanted, -strength[g]))
            total = graph.number_of_nodes()
            graph = graph.subgraph(ranked[:max_nodes]).copy()
            if drop_isolated:
                graph.remove_nodes_from(
                    [g for g in list(graph.nodes) if graph.degree(g) == 0 and g not in wanted]
                )
            notes.append(f"showing {graph.number_of_nodes()} of {total} genes (largest weighted degree)")
    if graph.number_of_edges() == 0:
        best = edges["weight"].max() if len(edges) else float("nan")
        notes.append(
            f"no gene pair reaches threshold={threshold:g} (largest similarity {best:.3g}); lower the threshold"
        )

    nodes = list(graph.nodes)
    pos = nx.spring_layout(graph, seed=layout_seed, weight="weight") if nodes else {}
    xy = np.array([pos[g] for g in nodes], dtype=np.float64).reshape(-1, 2)
    index = {g: i for i, g in enumerate(nodes)}
    fig = go.Figure()
    if graph.number_of_edges():
        ends = np.array([(index[a], index[b]) for a, b in graph.edges], dtype=np.int64)
        seg = np.full((len(ends), 3, 2), np.nan)
        seg[:, 0], seg[:, 1] = xy[ends[:, 0]], xy[ends[:, 1]]
        fig.add_trace(
            go.Scatter(
                x=_gapped(seg[:, :, 0]),
                y=_gapped(seg[:, :, 1]),
                mode="lines",
                line={"width": 0.8, "color": "#b0b0b0"},
                hoverinfo="skip",
                name="edges",
                showlegend=False,
            )
        )
    degree = np.array([graph.degree(g) for g in nodes], dtype=np.int64)
    is_hl = np.array([g in set(wanted) for g in nodes], dtype=bool)
    named = _named(degree, is_hl, max_labels)
    if not named.all():
        notes.append(
            f"names shown for {int(named.sum())} of {len(nodes)} genes (most edges); hover for the rest"
        )
    hover = [f"<b>{g}</b><br>degree: {d}" for g, d in zip(nodes, degree)]
    if programs is not None:
        prog = pd.Series(programs) if not isinstance(programs, pd.Series) else programs
        labels = [str(prog[g]) if g in prog.index and pd.notna(prog[g]) else "none" for g in nodes]
        hover = [f"{h}<br>program: {p}" for h, p in zip(hover, labels)]
        cats = sorted({x for x in labels if x != "none"}, key=_natural)
        colors = dict(zip(cats, default_palette(len(cats))))
        colors["none"] = NA_COLOR
        for cat in [*cats, "none"]:
            sel = np.array([x == cat for x in labels], dtype=bool)
            if sel.any():
                fig.add_trace(_nodes(xy, sel, is_hl, named, nodes, hover, name=cat, color=colors[cat]))
        showlegend = True
    else:
        sel = np.ones(len(nodes), dtype=bool)
        trace = _nodes(xy, sel, is_hl, named, nodes, hover, name="genes", color=degree)
        trace.marker.colorscale = "Viridis"
        trace.marker.showscale = True
        trace.marker.colorbar = {"title": {"text": "degree"}, "thickness": 14}
        fig.add_trace(trace)
        showlegend = False
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title if title is not None else f"gene similarity ≥ {threshold:g}"},
        showlegend=showlegend,
        legend={"title": {"text": "program"}},
        xaxis={"visible": False},
        yaxis={"visible": False},
        hovermode="closest",
        margin={"b": 50},
    )
    if notes:
        add_note(fig, "; ".join(notes))
    return fig


def _is_edge_list(frame: pd.DataFrame) -> bool:
    return {"source", "target"} <= {str(c) for c in frame.columns}


def _edges(similarity: Any) -> pd.DataFrame:
    """``source``, ``target``, ``weight`` for every gene pair (upper triangle of a matrix)."""
    if isinstance(similarity, pd.DataFrame) and _is_edge_list(similarity):
        frame = similarity.rename(columns=str)
        out = pd.DataFrame(
            {
                "source": frame["source"].astype(str).to_numpy(),
                "target": frame["target"].astype(str).to_numpy(),
                "weight": frame["weight"].astype(np.float64).to_numpy() if "weight" in frame else 1.0,
            }
        )
        return out[out["source"] != out["target"]].reset_index(drop=True)
    if not isinstance(similarity, pd.DataFrame):
        raise DataError(
            "similarity must be a square DataFrame (genes × genes, labelled) or an edge list with columns "
            f"'source', 'target', 'weight'; got {type(similarity).__name__}. Wrap an array as "
            "pd.DataFrame(sim, index=genes, columns=genes)."
        )
    frame = labelled_matrix(
        similarity, None, None, what="the similarity matrix", row_name="genes", col_name="genes"
    )
    if frame.shape[0] != frame.shape[1] or not frame.index.equals(frame.columns):
        raise DataError(
            f"the similarity matrix must be square with the same genes as index and columns; got shape "
            f"{frame.shape}. Reindex it: sim.loc[genes, genes]."
        )
    s = frame.to_numpy()
    i, j = np.triu_indices(len(s), k=1)
    w = s[i, j]
    ok = np.isfinite(w)
    names = frame.index.to_numpy()
    return pd.DataFrame({"source": names[i[ok]], "target": names[j[ok]], "weight": w[ok]})


def _named(degree: np.ndarray, is_hl: np.ndarray, max_labels: int | None) -> np.ndarray:
    """Which genes get their name written: all up to ``max_labels``, else highlighted + most edges."""
    if max_labels is not None and max_labels < 0:
        raise ConfigError(f"max_labels must be a non-negative integer or None; got {max_labels}.")
    if max_labels is None or len(degree) <= max_labels:
        return np.ones(len(degree), dtype=bool)
    named = is_hl.copy()
    order = np.argsort(-degree, kind="stable")
    named[order[:max_labels]] = True
    return named


def _gapped(seg: np.ndarray) -> np.ndarray:
    """``(n_edges, 3)`` [start, end, NaN] rows as one flat list with ``None`` gaps (JSON ``null``)."""
    flat = seg.ravel().astype(object)
    flat[2::3] = None
    return flat


def _natural(x: str) -> tuple[int, Any]:
    tail = x.rsplit("_", 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, x)


def _nodes(
    xy: np.ndarray,
    sel: np.ndarray,
    is_hl: np.ndarray,
    named: np.ndarray,
    nodes: list[str],
    hover: list[str],
    *,
    name: str,
    color: Any,
) -> go.Scatter:
    idx = np.flatnonzero(sel)
    col = color[idx] if isinstance(color, np.ndarray) else color
    return go.Scatter(
        x=xy[idx, 0],
        y=xy[idx, 1],
        mode="markers+text",
        text=[nodes[k] if named[k] else "" for k in idx],
        textposition="top center",
        textfont={
            "size": np.where(is_hl[idx], 14, 11),
            "color": np.where(is_hl[idx], "#d62728", "#333333"),
        },
        hovertext=[hover[k] for k in idx],
        hovertemplate="%{hovertext}<extra></extra>",
        customdata=np.array([nodes[k] for k in idx], dtype=object).reshape(-1, 1),
        name=name,
        marker={
            "size": np.where(is_hl[idx], 16, 9),
            "color": col,
            "line": {
                "width": np.where(is_hl[idx], 2.0, 0.5),
                "color": np.where(is_hl[idx], "#d62728", "#ffffff"),
            },
        },
    )
