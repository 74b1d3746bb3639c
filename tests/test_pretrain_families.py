"""pretrain() for the Geneformer-style (token MLM) and PerturbGene-style (phenotypic MLM) families."""

from __future__ import annotations

import warnings

import pytest
import torch

from cellkit.presets import build_model
from cellkit.tasks import pretrain

from .test_presets import EDGES, GENES, PHENOTYPES, TINY, counts_adata

pytestmark = pytest.mark.timeout(300)
FAST = {"epochs": 8, "lr": 5e-3, "batch_size": 8, "progress": False, "val_size": 0.0, "schedule": "constant"}


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tokenizer notes (computed n_counts ...)
        yield
    torch.set_num_threads(n)


def test_geneformer_style_mlm_pretraining():
    adata = counts_adata(48)
    medians = {g: 1.0 + (i % 3) * 0.5 for i, g in enumerate(GENES)}
    model = build_model(
        adata, family="geneformer", seed=0, max_len=32, resources={"gene_median": medians}, **TINY
    )
    result = pretrain(adata, model, **FAST)
    steps = result.history.steps
    assert list(result.trainer.heads) == ["mlm"]
    assert {"loss/mlm"} <= set(steps.columns)
    first, last = steps["loss/mlm"].iloc[:4].mean(), steps["loss/mlm"].iloc[-4:].mean()
    assert last < first


def test_perturbgene_style_phenotypic_mlm_pretraining():
    adata = counts_adata(48)
    model = build_model(GENES, family="perturbgene", phenotypes=PHENOTYPES, bin_edges=EDGES, seed=0, **TINY)
    result = pretrain(adata, model, tokenize_options={"phenotype_columns": ["cell_type", "sex"]}, **FAST)
    objective = result.trainer.objectives[0]
    assert (objective.name, objective.label_smoothing) == ("mlm", 0.5)
    steps = result.history.steps
    assert steps["loss/mlm"].iloc[-4:].mean() < steps["loss/mlm"].iloc[:4].mean()
