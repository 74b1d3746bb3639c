"""``TrainerConfig(micro_batch=...)``: a training batch run in pieces, and ``micro_batch="auto"``
(out-of-memory: the step starts over from the same state in pieces of half the size).

* pieces vs the whole batch: each piece's loss terms carry its share of what the term averages
  over (cells, labelled cells, masked positions), so the weights after a few steps match the
  unsplit run up to float rounding (stated tolerance: 1e-5 relative, measured ~1e-7);
* "auto" after injected out-of-memory errors (``CELLKIT_OOM_ABOVE_CELLS``) vs a fixed
  ``micro_batch`` at the size that worked: the same bits, also with dropout (the RNG is put back
  for the retried step, so it draws the same dropout masks).
"""

from __future__ import annotations

import logging

import pytest
import torch

import cellkit
from cellkit import CellModel, ConfigError, GeneVocab
from cellkit._inference import OOM_ABOVE_CELLS_ENV
from cellkit.presets import scgpt_config
from cellkit.train import TrainerConfig

from .test_finetune import N_GENES, make_adata


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def make_model(dropout: float = 0.0) -> CellModel:
    genes = [f"G{i}" for i in range(N_GENES)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(0)
    return CellModel(
        scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=dropout, n_bins=11), vocab
    )


FINETUNE = {"label_key": "cell_type", "epochs": 1, "batch_size": 16, "progress": False, "max_steps": 3}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


@pytest.fixture
def gradients(monkeypatch):
    """The gradients of every optimizer step (recorded before clipping and the update)."""
    from cellkit.train.trainer import Trainer

    seen: list[dict[str, torch.Tensor]] = []
    apply = Trainer._apply_gradients

    def record(self):
        seen.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return apply(self)

    monkeypatch.setattr(Trainer, "_apply_gradients", record)
    return seen


def grad_rel(a, b):
    """The largest difference of two steps' gradients, relative to each tensor's largest entry."""
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


@pytest.mark.parametrize("micro", [5, 1])
def test_pieces_match_the_whole_batch_within_rounding(gradients, micro):
    adata = make_adata(n_per_class=20)
    whole = cellkit.finetune(adata, make_model(), **FINETUNE)
    g_whole = list(gradients)
    gradients.clear()
    split = cellkit.finetune(adata, make_model(), micro_batch=micro, **FINETUNE)  # 16 cells: 5 + 5 + 5 + 1
    assert len(gradients) == len(g_whole) == 3
    assert max(grad_rel(a, b) for a, b in zip(gradients, g_whole, strict=True)) < 5e-6  # measured ~8e-7
    a, b = weights(split.model), weights(whole.model)
    assert max(float((a[k] - b[k]).abs().max()) for k in b) > 0  # other summation: not the same bits
    # Adam turns rounding in near-zero gradients into steps of up to lr: 1e-4 relative (measured ~2e-5)
    assert max_rel(a, b) < 1e-4
    for ra, rb in zip(split.history.step_records, whole.history.step_records, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["micro_batch"] == micro and "micro_batch" not in rb


def test_pieces_weighted_alike_would_not_match(monkeypatch, gradients):
    """The control: weighting the 1-cell piece like the 5-cell ones is not rounding."""
    from cellkit.train.objectives import Classification

    adata = make_adata(n_per_class=20)
    cellkit.finetune(adata, make_model(), **FINETUNE)
    g_whole = list(gradients)
    gradients.clear()
    monkeypatch.setattr(Classification, "units", lambda self, batch: torch.tensor(1.0, dtype=torch.float64))
    cellkit.finetune(adata, make_model(), micro_batch=5, **FINETUNE)
    assert grad_rel(gradients[0], g_whole[0]) > 1e-2


def test_token_level_objectives_are_weighted_by_masked_positions(gradients):
    adata = make_adata(n_per_class=10)
    opts = {"epochs": 1, "batch_size": 10, "progress": False, "max_steps": 2, "objectives": {"gep": 1.0, "mvc": 1.0}}
    whole = cellkit.pretrain(adata, make_model(), **opts)
    g_whole = list(gradients)
    gradients.clear()
    split = cellkit.pretrain(adata, make_model(), micro_batch=3, **opts)  # 10 cells: 3 + 3 + 3 + 1
    assert max(grad_rel(a, b) for a, b in zip(gradients, g_whole, strict=True)) < 5e-6
    assert max_rel(weights(split.model), weights(whole.model)) < 1e-4
    assert split.history.step_records[-1]["loss"] == pytest.approx(whole.history.step_records[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_auto_after_oom_equals_the_fixed_micro_batch_exactly(monkeypatch, caplog, dropout):
    adata = make_adata(n_per_class=20)
    fixed = cellkit.finetune(adata, make_model(dropout), micro_batch=4, **FINETUNE)
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "7")  # 16 -> 8 -> 4 cells per forward, at the first step
    with caplog.at_level(logging.WARNING, logger="cellkit"):
        auto = cellkit.finetune(adata, make_model(dropout), micro_batch="auto", **FINETUNE)
    a, b = weights(auto.model), weights(fixed.model)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["micro_batch"] for r in auto.history.step_records] == [4, 4, 4]
    assert [r["loss"] for r in auto.history.step_records] == [r["loss"] for r in fixed.history.step_records]
    assert "micro_batch auto: 16 → 8" in caplog.text and "micro_batch auto: 8 → 4" in caplog.text
    assert caplog.text.count("after out-of-memory") == 2  # the size that worked is kept for later steps


def test_auto_without_oom_is_the_whole_batch(monkeypatch):
    adata = make_adata(n_per_class=20)
    whole = cellkit.finetune(adata, make_model(0.2), **FINETUNE)
    auto = cellkit.finetune(adata, make_model(0.2), micro_batch="auto", **FINETUNE)
    a, b = weights(auto.model), weights(whole.model)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert auto.history.step_records[0]["micro_batch"] == 16


def test_a_single_cell_that_does_not_fit_is_an_error_with_advice(monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "0")
    with pytest.raises(ConfigError, match=r"single cell.*max_length") as err:
        cellkit.finetune(make_adata(n_per_class=10), make_model(), micro_batch="auto", **FINETUNE)
    assert err.value.param == "micro_batch"


def test_a_fixed_size_and_no_micro_batch_do_not_catch_out_of_memory(monkeypatch):
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "7")
    with pytest.raises(torch.OutOfMemoryError):
        cellkit.finetune(make_adata(n_per_class=10), make_model(), micro_batch=8, **FINETUNE)


def test_objectives_over_pairs_of_cells_cannot_be_split():
    with pytest.raises(ConfigError, match=r"\['ecs'\].*cannot be split"):
        cellkit.finetune(
            make_adata(n_per_class=10), make_model(), objectives={"cls": 1.0, "ecs": 1.0}, micro_batch=4, **FINETUNE
        )


def test_micro_batch_option_is_checked():
    for bad in (0, -2, True, 2.5, "big"):
        with pytest.raises(ConfigError, match="micro_batch"):
            TrainerConfig(micro_batch=bad)
    assert TrainerConfig(micro_batch="auto").to_dict()["micro_batch"] == "auto"
    assert TrainerConfig.from_dict(TrainerConfig(micro_batch=8).to_dict()).micro_batch == 8
    assert TrainerConfig().micro_batch is None


def test_weighting_masked_terms_by_cells_would_not_match(monkeypatch, gradients):
    """The control of the token-level test: a piece's share of cells is not its share of masked positions."""
    from cellkit.train.objectives import MVC, MaskedValueMSE

    adata = make_adata(n_per_class=10)
    opts = {"epochs": 1, "batch_size": 10, "progress": False, "max_steps": 1, "objectives": {"gep": 1.0, "mvc": 1.0}}
    cellkit.pretrain(adata, make_model(), **opts)
    g_whole = list(gradients)
    gradients.clear()
    for cls in (MaskedValueMSE, MVC):
        monkeypatch.setattr(cls, "units", lambda self, batch: torch.tensor(float(len(batch["gene_ids"])), dtype=torch.float64))
    cellkit.pretrain(adata, make_model(), micro_batch=3, **opts)
    assert grad_rel(gradients[0], g_whole[0]) > 1e-2


def test_a_resumed_auto_run_keeps_the_size_that_worked(tmp_path, monkeypatch):
    adata = make_adata(n_per_class=20)
    fixed = cellkit.finetune(adata, make_model(0.2), micro_batch=4, **FINETUNE)
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "7")
    ckpt = str(tmp_path / "ckpt")
    first = cellkit.finetune(
        adata, make_model(0.2), micro_batch="auto", checkpoint_dir=ckpt, **{**FINETUNE, "max_steps": 2}
    )
    assert first.history.step_records[-1]["micro_batch"] == 4
    monkeypatch.delenv(OOM_ABOVE_CELLS_ENV)  # memory to spare now: the run still goes on at 4
    again = cellkit.finetune(adata, make_model(0.2), micro_batch="auto", checkpoint_dir=ckpt, resume=True, **FINETUNE)
    assert again.history.step_records[-1]["micro_batch"] == 4
    a, b = weights(again.model), weights(fixed.model)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_cli_micro_batch_auto(tmp_path, monkeypatch, capsys):
    import csv

    from cellkit.cli import main

    from .test_finetune import make_model as base_model

    data, model_dir, out = tmp_path / "cells.h5ad", tmp_path / "model", tmp_path / "run"
    make_adata(n_per_class=10).write_h5ad(data)
    base_model().save(model_dir)
    monkeypatch.setenv(OOM_ABOVE_CELLS_ENV, "5")  # 16 -> 8 -> 4
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "cell_type", "--epochs", "1",
            "--batch-size", "16", "--micro-batch", "auto", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().out
    with open(out / "history_steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    assert steps and {r["micro_batch"] for r in steps} == {"4"}
    with pytest.raises(SystemExit):
        main([*args[:-5], "--micro-batch", "0", "--quiet"])
    assert "--micro-batch: takes a positive integer or 'auto'" in capsys.readouterr().err
