"""A synthetic perturb-seq data set with planted ground truth: :func:`synthetic_perturbation`.

The layout is the one GEARS and scGPT's perturbation tutorial use (Norman / Adamson / Replogle
data): one AnnData, one row per cell, ``obs["condition"]`` saying which genes were perturbed —
``"ctrl"`` for control cells, ``"GENE+ctrl"`` for a single perturbation, ``"GENE1+GENE2"`` for a
double — and log1p-normalised expression in ``.X``.

How the cells are made (all draws from one ``numpy`` generator seeded with ``seed``):

1. Every gene ``g`` gets a baseline share ``p_g`` of the library (log-normal across genes).
2. Every perturbed gene ``a`` gets a planted effect vector ``e_a``, in natural-log fold change of
   the gene's expected count: ``-knockdown`` on ``a`` itself (a CRISPRi-like knock-down) and
   ``±effect_size × U(0.5, 1.5)`` on ``n_targets`` other genes; zero elsewhere.
3. A perturbation's effect is the sum of its genes' effects, plus (doubles only) a small random
   interaction on ``n_targets`` genes when ``interaction > 0``, plus a response shared by every
   perturbation (``common_effect``; real screens have one too — it is what makes the "mean of the
   training perturbations" baseline strong).
4. A cell of that perturbation has counts ``Poisson(s · L · p_g · exp(effect_g + ε_g))`` with a
   log-normal size factor ``s`` (σ 0.2), library size ``L`` and per-cell, per-gene biological
   noise ``ε ~ N(0, noise²)``.
5. ``.X = log1p(counts / total × 1e4)`` (scanpy's ``normalize_total(target_sum=1e4)`` + ``log1p``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cellkit._errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["synthetic_perturbation"]

CONTROL = "ctrl"


def _gene_names(n: int) -> list[str]:
    width = max(4, len(str(n)))
    return [f"G{i + 1:0{width}d}" for i in range(n)]


def _parse(condition: str, var_index: dict[str, int]) -> tuple[str, ...]:
    parts = [p.strip() for p in str(condition).split("+")]
    if any(not p for p in parts):
        raise DataError(f"Perturbation {condition!r} does not parse: write 'GENE+ctrl' or 'GENE1+GENE2'.")
    genes = tuple(p for p in parts if p != CONTROL)
    if not genes or len(set(genes)) != len(genes):
        raise DataError(
            f"Perturbation {condition!r} must name one or two different genes ('GENE+ctrl', 'GENE1+GENE2')."
        )
    unknown = [g for g in genes if g not in var_index]
    if unknown:
        raise DataError(
            f"Perturbation {condition!r} names gene(s) {unknown} that are not among the {len(var_index)} "
            f"synthetic genes ({next(iter(var_index))} …); raise n_genes or use those names."
        )
    return genes


def _check_arguments(
    *,
    n_genes: int,
    n_control: int,
    n_cells_per_perturbation: int,
    n_single: int,
    n_double: int,
    n_targets: int,
    noise: float,
    interaction: float,
    common_effect: float,
    library_size: float,
) -> None:
    """Refuse sizes and scales that do not fit, before any random draw."""
    for name, value in (
        ("n_genes", n_genes),
        ("n_control", n_control),
        ("n_cells_per_perturbation", n_cells_per_perturbation),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("n_single", n_single), ("n_double", n_double), ("n_targets", n_targets)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}.")
    for name, value in (("noise", noise), ("interaction", interaction), ("common_effect", common_effect)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}.")
    if library_size <= 0:
        raise ConfigError(f"library_size must be > 0, got {library_size!r}.")
    if n_targets >= n_genes:
        raise ConfigError(f"n_targets ({n_targets}) must be smaller than n_genes ({n_genes}).")


def _default_conditions(
    rng: np.random.Generator, share: np.ndarray, genes: list[str], *, n_single: int, n_double: int
) -> list[str]:
    """``n_single`` singles on genes of the more highly expressed half, then ``n_double`` doubles among them."""
    upper = np.flatnonzero(share >= np.median(share))
    if n_single > len(upper):
        raise ConfigError(
            f"n_single={n_single} is more than the {len(upper)} more highly expressed genes; raise n_genes."
        )
    picked = np.sort(rng.choice(upper, size=n_single, replace=False))
    singles = [genes[i] for i in picked]
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1 :]]
    if n_double > len(pairs):
        raise ConfigError(f"n_double={n_double} is more than the {len(pairs)} pairs of {n_single} genes.")
    chosen = sorted(rng.choice(len(pairs), size=n_double, replace=False).tolist()) if n_double else []
    return [f"{g}+{CONTROL}" for g in singles] + [f"{pairs[k][0]}+{pairs[k][1]}" for k in chosen]


def _given_conditions(perturbations: Sequence[str]) -> list[str]:
    """The caller's conditions, checked to be distinct and free of the control label."""
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    conditions = [str(c) for c in perturbations]
    if len(set(conditions)) != len(conditions) or CONTROL in conditions:
        raise DataError("perturbations must be distinct and must not include the control label 'ctrl'.")
    return conditions


def _planted_effects(
    rng: np.random.Generator,
    perturbed: list[str],
    genes: list[str],
    var_index: dict[str, int],
    *,
    n_targets: int,
    effect_size: float,
    knockdown: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each perturbed gene's planted log-fold-change effect: as a Series of its genes, and as a full vector."""
    import pandas as pd

    n_genes = len(genes)
    truth: dict[str, Any] = {}
    effect_of: dict[str, np.ndarray] = {}
    for g in perturbed:
        i = var_index[g]
        others = np.setdiff1d(np.arange(n_genes), [i])
        targets = np.sort(rng.choice(others, size=n_targets, replace=False))
        e = np.zeros(n_genes)
        e[targets] = rng.choice([-1.0, 1.0], size=n_targets) * effect_size * rng.uniform(0.5, 1.5, n_targets)
        e[i] = -knockdown
        effect_of[g] = e
        nz = np.flatnonzero(e)
        truth[g] = pd.Series(e[nz], index=pd.Index([genes[k] for k in nz], name="gene"), name=g)
    return truth, effect_of


def synthetic_perturbation(
    *,
    n_genes: int = 200,
    n_control: int = 300,
    n_cells_per_perturbation: int = 50,
    perturbations: Sequence[str] | None = None,
    n_single: int = 20,
    n_double: int = 10,
    n_targets: int = 10,
    effect_size: float = 1.0,
    knockdown: float = 2.0,
    common_effect: float = 0.5,
    interaction: float = 0.0,
    library_size: float = 5000.0,
    noise: float = 0.2,
    seed: int = 0,
) -> AnnData:
    """A perturb-seq-like AnnData whose true perturbation effects are known.

    Parameters
    ----------
    n_genes
        Measured genes, named ``G0001``, ``G0002``, … (``var_names``).
    n_control
        Control cells (``condition == "ctrl"``).
    n_cells_per_perturbation
        Cells per perturbation condition.
    perturbations
        Conditions to simulate, e.g. ``["G0003+ctrl", "G0003+G0010"]``. Default: ``n_single``
        singles on genes drawn from the more highly expressed half, then ``n_double`` doubles
        drawn among pairs of those genes.
    n_single, n_double
        Used when ``perturbations`` is ``None``.
    n_targets
        Target genes per perturbed gene (and genes in the shared response and in each interaction).
    effect_size
        Typical absolute log fold change of a target (each is ``± effect_size × U(0.5, 1.5)``).
    knockdown
        Log fold change taken off the perturbed gene itself (2 → ~7.4× fewer counts).
    common_effect
        Scale of the response shared by every perturbation (0: none).
    interaction
        Standard deviation of the extra, non-additive effect of a double on ``n_targets`` genes
        (0: doubles are exactly the sum of their singles).
    library_size
        Mean counts per cell before the size factor.
    noise
        Standard deviation of the per-cell, per-gene log-scale biological noise.
    seed
        Seed of every random draw; the same arguments give the same AnnData.

    Returns
    -------
    :class:`anndata.AnnData` ``(n_control + n_conditions × n_cells_per_perturbation, n_genes)``:

    * ``.X``: float32 dense, ``log1p`` of counts normalised to 10,000 per cell;
    * ``.layers["counts"]``: the raw counts (float32);
    * ``obs["condition"]`` (categorical; ``"ctrl"`` first) and ``obs["n_perturbed"]`` (0, 1, 2);
    * ``uns["perturbation_truth"]``: ``{gene: pandas.Series}`` — the planted log-fold-change
      effect of perturbing that gene, indexed by the affected genes (itself included);
    * ``uns["perturbation_common"]``: the shared response (a Series over its genes);
    * ``uns["perturbation_interaction"]``: ``{double condition: Series}`` (empty when
      ``interaction == 0``);
    * ``uns["synthetic_perturbation"]``: the arguments.

    The Series in ``uns`` are for checking results in memory; convert them (e.g. to dicts)
    before ``write_h5ad``.

    Raises
    ------
    ConfigError
        For sizes that do not fit (e.g. more doubles than gene pairs).
    DataError
        For a ``perturbations`` entry that does not parse or names an unknown gene.

    Examples
    --------
    >>> from cellkit.datasets import synthetic_perturbation
    >>> adata = synthetic_perturbation(n_genes=50, n_single=4, n_double=2, n_cells_per_perturbation=10)
    >>> adata.obs["condition"].cat.categories[:2].tolist()
    ['ctrl', 'G0008+ctrl']
    """
    import pandas as pd
    from anndata import AnnData

    _check_arguments(
        n_genes=n_genes,
        n_control=n_control,
        n_cells_per_perturbation=n_cells_per_perturbation,
        n_single=n_single,
        n_double=n_double,
        n_targets=n_targets,
        noise=noise,
        interaction=interaction,
        common_effect=common_effect,
        library_size=library_size,
    )

    rng = np.random.default_rng(seed)
    genes = _gene_names(n_genes)
    var_index = {g: i for i, g in enumerate(genes)}
    log_share = rng.normal(0.0, 1.0, n_genes)
    share = np.exp(log_share - log_share.max())
    share /= share.sum()

    # -- which conditions
    if perturbations is None:
        conditions = _default_conditions(rng, share, genes, n_single=n_single, n_double=n_double)
    else:
        conditions = _given_conditions(perturbations)
    parsed = [_parse(c, var_index) for c in conditions]
    perturbed = sorted({g for p in parsed for g in p}, key=var_index.__getitem__)

    # -- planted effects (natural-log fold change of the expected count)
    truth, effect_of = _planted_effects(
        rng, perturbed, genes, var_index, n_targets=n_targets, effect_size=effect_size, knockdown=knockdown
    )
    common = np.zeros(n_genes)
    if common_effect > 0 and n_targets:
        idx = np.sort(rng.choice(n_genes, size=n_targets, replace=False))
        common[idx] = (
            rng.choice([-1.0, 1.0], size=n_targets) * common_effect * rng.uniform(0.5, 1.5, n_targets)
        )
    interactions: dict[str, Any] = {}
    effects = []
    for cond, gs in zip(conditions, parsed, strict=True):
        e = common + sum(effect_of[g] for g in gs)
        if len(gs) > 1 and interaction > 0 and n_targets:
            idx = np.sort(rng.choice(n_genes, size=n_targets, replace=False))
            extra = rng.normal(0.0, interaction, n_targets)
            e = e.copy()
            e[idx] += extra
            interactions[cond] = pd.Series(
                extra, index=pd.Index([genes[k] for k in idx], name="gene"), name=cond
            )
        effects.append(e)

    # -- cells
    labels = [CONTROL] * n_control + [c for c in conditions for _ in range(n_cells_per_perturbation)]
    effect_rows = np.vstack([np.zeros(n_genes), *effects])  # (1 + n_conditions, n_genes)
    row_of = np.concatenate(
        [
            np.zeros(n_control, dtype=int),
            np.repeat(np.arange(1, len(conditions) + 1), n_cells_per_perturbation),
        ]
    )
    n_cells = len(labels)
    size = rng.lognormal(0.0, 0.2, n_cells)[:, None]
    eps = rng.normal(0.0, noise, (n_cells, n_genes)) if noise > 0 else 0.0
    rate = size * library_size * share[None, :] * np.exp(effect_rows[row_of] + eps)
    counts = rng.poisson(rate).astype(np.float32)
    totals = counts.sum(1, keepdims=True)
    totals[totals == 0] = 1.0
    x = np.log1p(counts / totals * 1e4).astype(np.float32)

    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(labels, categories=[CONTROL, *conditions]),
            "n_perturbed": np.array([0] + [len(p) for p in parsed], dtype=np.int64)[row_of],
        },
        index=pd.Index([f"cell{i:05d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(
        {"perturbed_in_screen": np.isin(np.arange(n_genes), [var_index[g] for g in perturbed])},
        index=pd.Index(genes),
    )
    adata = AnnData(X=x, obs=obs, var=var, layers={"counts": counts})
    nz = np.flatnonzero(common)
    adata.uns["perturbation_truth"] = truth
    adata.uns["perturbation_common"] = pd.Series(
        common[nz], index=pd.Index([genes[k] for k in nz], name="gene"), name="common"
    )
    adata.uns["perturbation_interaction"] = interactions
    adata.uns["synthetic_perturbation"] = {
        "n_genes": n_genes,
        "n_control": n_control,
        "n_cells_per_perturbation": n_cells_per_perturbation,
        "conditions": list(conditions),
        "n_targets": n_targets,
        "effect_size": float(effect_size),
        "knockdown": float(knockdown),
        "common_effect": float(common_effect),
        "interaction": float(interaction),
        "library_size": float(library_size),
        "noise": float(noise),
        "seed": seed,
        "x": "log1p(counts / total * 1e4)",
    }
    return adata
