"""Unwritable outputs fail before any work: no training step, no tokenized block, a CellkitError naming the path."""

from __future__ import annotations

import os

import pytest

import cellkit
from cellkit import CellkitError
from cellkit._utils import ensure_writable_dir
from cellkit.cli import main
from cellkit.data.schemes import scgpt as scgpt_scheme
from cellkit.tasks import finetune, pretrain
from cellkit.train.trainer import Trainer

from .test_finetune import make_adata, make_model
from .train._tiny import TinyCells, collator, tiny_model

pytestmark = pytest.mark.timeout(300)
FAST = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "progress": False}
as_root = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def _bad_dirs(tmp_path):
    """(label, path) of directories that cannot be written, and the text the error must name."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("existing file", a_file), ("under a file", a_file / "sub" / "dir")]
    if not as_root:  # root writes anywhere: a read-only directory stops only other users
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append(("read-only parent", ro / "out"))
    return cases


def _steps():
    seen = []
    return seen, [lambda e: seen.append(e.kind) if e.kind == "step_end" else None]


def _litter(tmp_path):
    return sorted(p.name for p in tmp_path.rglob(".*"))


def test_finetune_and_pretrain_refuse_unwritable_checkpoint_dir_before_the_first_step(tmp_path):
    adata = make_adata(n_per_class=10)
    for label, bad in _bad_dirs(tmp_path):
        for task in (finetune, pretrain):
            seen, callbacks = _steps()
            kw = {"label_key": "cell_type"} if task is finetune else {}
            with pytest.raises(CellkitError, match="checkpoint_dir") as info:
                task(adata, make_model(), checkpoint_dir=str(bad), callbacks=callbacks, **kw, **FAST)
            assert str(bad) in str(info.value), label
            assert seen == [], f"{task.__name__} trained before refusing ({label})"
    assert _litter(tmp_path) == []  # the probes leave nothing behind


def test_trainer_refuses_unwritable_checkpoint_dir_at_construction(tmp_path):
    model = tiny_model()
    for _label, bad in _bad_dirs(tmp_path):
        with pytest.raises(CellkitError, match="checkpoint_dir") as info:
            Trainer(model, ["cls"], checkpoint_dir=bad, **FAST)
        assert str(bad) in str(info.value)
    # a writable one is fine, and checking it creates nothing
    fine = tmp_path / "new" / "ckpt"
    Trainer(model, ["cls"], checkpoint_dir=fine, **FAST)
    assert not (tmp_path / "new").exists()
    result = Trainer(model, ["cls"], checkpoint_dir=fine, **FAST).fit(TinyCells(8), collate_fn=collator(model))
    assert result.checkpoint is not None
    assert result.checkpoint.parent == fine


def test_tokenize_refuses_unwritable_output_before_the_first_block(tmp_path, monkeypatch):
    blocks = []
    real = scgpt_scheme.run

    def counting(ctx):
        for part in real(ctx):
            blocks.append(len(part))
            yield part

    monkeypatch.setattr(scgpt_scheme, "run", counting)
    adata, model = make_adata(n_per_class=5), make_model()
    for label, bad in _bad_dirs(tmp_path):
        with pytest.raises(CellkitError, match="output") as info:
            cellkit.tokenize(adata, model, output=bad, progress=False)
        assert str(bad) in str(info.value), label
    assert blocks == []
    shards = cellkit.tokenize(adata, model, output=tmp_path / "shards", progress=False)
    assert len(shards) == adata.n_obs
    assert blocks


def test_cli_refuses_bad_out_before_training(tmp_path, capsys, monkeypatch):
    data = tmp_path / "cells.h5ad"
    make_adata(n_per_class=10).write_h5ad(data)
    model_dir = tmp_path / "model"
    make_model().save(model_dir)
    trained = []
    monkeypatch.setattr("cellkit.tasks.finetune", lambda *a, **k: trained.append(1))
    monkeypatch.setattr("cellkit.tasks.pretrain", lambda *a, **k: trained.append(1))
    notes = tmp_path / "notes"  # a run directory whose model/ entry is someone else's directory
    (notes / "model").mkdir(parents=True)
    (notes / "model" / "thesis.tex").write_text("keep me")
    bad_outs = [*(p for _, p in _bad_dirs(tmp_path)), notes]
    for bad in bad_outs:
        for cmd in (
            ["finetune", "--model", str(model_dir), "--label-key", "cell_type"],
            ["pretrain", "--model", str(model_dir)],
        ):
            code = main([*cmd, "--data", str(data), "--out", str(bad), "--quiet"])
            err = capsys.readouterr().err
            assert code == 2
            assert "--out" in err
            assert str(bad) in err
    assert trained == []
    assert (notes / "model" / "thesis.tex").read_text() == "keep me"


def test_ensure_writable_dir_accepts_new_and_existing_dirs(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b", what="x") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert ensure_writable_dir(tmp_path, what="x", replaced_whole=True) == tmp_path
    assert list(tmp_path.iterdir()) == []
