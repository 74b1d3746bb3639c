"""The training loop: learning, resume (stop flag, Ctrl-C), checkpoints, accumulation, events, errors."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from cellkit import ConfigError, DataError
from cellkit.train import checkpoint as ckpt_mod
from cellkit.train.checkpoint import CheckpointManager, read_checkpoint
from cellkit.train.events import Callback
from cellkit.train.sampling import EpochBatchSampler
from cellkit.train.trainer import Trainer, TrainerConfig, TrainingError
from tests._tolerance import assert_close_scaled

from ._tiny import TinyCells, collator, tiny_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


TRAIN, VAL = TinyCells(40, seed=0), TinyCells(15, seed=1)
OPTS = {"batch_size": 8, "lr": 3e-3, "progress": False, "seed": 3}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _straight(tmp_path, epochs=2, **kw):
    model = tiny_model()
    opts = {**OPTS, "epochs": epochs, **kw}
    trainer = Trainer(model, ["cls"], checkpoint_dir=tmp_path / "straight", **opts)
    result = trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    return model, result


def test_learns_and_records_history(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, ["cls"], epochs=10, **OPTS)
    result = trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    assert result.status == "completed"
    steps, epochs = result.history.steps, result.history.epochs
    assert len(steps) == 10 * 5
    assert list(steps["step"]) == list(range(1, 51))
    assert {"loss", "loss/cls", "lr", "accuracy", "cells"} <= set(steps.columns)
    assert set(steps["cells"]) == {8}
    assert {"train/loss", "val/loss", "val/accuracy", "val/macro_f1", "train/accuracy"} <= set(epochs.columns)
    assert epochs["train/loss"].iloc[-1] < epochs["train/loss"].iloc[0]
    assert result.metrics["val/accuracy"] > 0.5  # chance is 1/3
    assert result.best_metric == pytest.approx(epochs["val/loss"].min())


class StopAt(Callback):
    def __init__(self, trainer_ref, step, how):
        self.ref, self.step, self.how = trainer_ref, step, how

    def on_step_end(self, event):
        if event.step == self.step:
            if self.how == "flag":
                self.ref[0].request_stop()
            else:  # what Ctrl-C in a notebook does: SIGINT to the kernel process
                os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize(("how", "at"), [("flag", 5), ("flag", 7), ("sigint", 5), ("sigint", 3)])
def test_stop_and_resume_equals_straight_run(tmp_path, how, at):
    straight_model, straight = _straight(tmp_path)

    model = tiny_model()
    ref = []
    trainer = Trainer(
        model, ["cls"], epochs=2, checkpoint_dir=tmp_path / "run", callbacks=[StopAt(ref, at, how)], **OPTS
    )
    ref.append(trainer)
    first = trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    assert first.status == ("stopped" if how == "flag" else "interrupted")
    assert first.history.step_records[-1]["step"] == at
    assert first.checkpoint is not None
    assert first.checkpoint.name == f"step-{at:08d}"

    # a fresh process: new model (same init), new trainer, resume from the checkpoint directory
    model2 = tiny_model(seed=99)  # different init: everything must come from the checkpoint
    trainer2 = Trainer(model2, ["cls"], epochs=2, checkpoint_dir=tmp_path / "run", **OPTS)
    second = trainer2.fit(TRAIN, VAL, collate_fn=collator(model2), resume=True)
    assert second.status == "completed"
    _assert_same(_weights(model2), _weights(straight_model))
    assert second.history == straight.history
    assert second.best_step == straight.best_step


def test_resume_in_memory_without_checkpoints():
    model_a = tiny_model()
    straight = Trainer(model_a, ["cls"], epochs=2, **OPTS).fit(TRAIN, VAL, collate_fn=collator(model_a))
    model = tiny_model()
    ref = []
    trainer = Trainer(model, ["cls"], epochs=2, callbacks=[StopAt(ref, 6, "flag")], **OPTS)
    ref.append(trainer)
    assert trainer.fit(TRAIN, VAL, collate_fn=collator(model)).status == "stopped"
    trainer.callbacks = []
    result = trainer.fit(TRAIN, VAL, collate_fn=collator(model), resume=True)
    assert result.status == "completed"
    assert result.history == straight.history
    _assert_same(_weights(model), _weights(model_a))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = tiny_model()
    trainer = Trainer(model, ["cls"], epochs=3, checkpoint_dir=tmp_path, **OPTS)
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (end of epoch 2): half a file, then the disk "fails"
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 100)
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest is not None
    assert mgr.latest.name == "step-00000005"
    assert not list(tmp_path.glob(".tmp-*"))
    _path, tensors, state = read_checkpoint(tmp_path)
    assert state["trainer"]["epoch"] == 1
    assert "rng.cpu.0" in tensors
    # and the run goes on from it
    model2 = tiny_model()
    result = Trainer(model2, ["cls"], epochs=3, checkpoint_dir=tmp_path, **OPTS).fit(
        TRAIN, VAL, collate_fn=collator(model2), resume=True
    )
    assert result.status == "completed"
    assert result.history.step_records[-1]["step"] == 15


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    _, result = _straight(tmp_path, epochs=1)
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["config"]["lr"] == OPTS["lr"]
    assert state["objectives"] == ["cls"]
    assert (tmp_path / "straight" / "latest").read_text().strip() == result.checkpoint.name


def test_grad_accumulation_equals_a_larger_batch():
    a, b = tiny_model(dropout=0.0), tiny_model(dropout=0.0)
    base = {**OPTS, "epochs": 1, "max_grad_norm": None}
    Trainer(a, ["cls"], **{**base, "batch_size": 8}, grad_accum=2).fit(TRAIN, collate_fn=collator(a))
    Trainer(b, ["cls"], **{**base, "batch_size": 16}).fit(TRAIN, collate_fn=collator(b))
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        if k.endswith("qkv.bias"):  # the key bias has a mathematically zero gradient (softmax shift
            d = wa[k].shape[0] // 3  # invariance); Adam turns its rounding noise into full steps
            wa[k], wb[k] = torch.cat([wa[k][:d], wa[k][2 * d :]]), torch.cat([wb[k][:d], wb[k][2 * d :]])
        # fp32 summation order (2 x 8 vs 16 rows) carried through Adam: 1e-6 relative to max(1, max|w|)
        # (~2 ulp at |w| ≈ 4); measured ≤ 3.9e-7 at max|w| ≈ 4.1 on an AVX-512 Xeon (10x margin)
        assert_close_scaled(wa[k], wb[k], rel=1e-6, what=k)


def test_freezing_keeps_weights_and_restores_requires_grad():
    model = tiny_model()
    before = _weights(model)
    Trainer(model, ["cls"], epochs=1, freeze=("encoder.embeddings", "encoder.layers.0"), **OPTS).fit(
        TRAIN, collate_fn=collator(model)
    )
    after = _weights(model)
    for k in before:
        if k.startswith(("encoder.embeddings", "encoder.layers.0.")):
            assert torch.equal(before[k], after[k]), k
        elif k.startswith(("encoder.layers.1.", "heads.classifier")):
            assert not torch.equal(before[k], after[k]), k
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="match no parameter"):
        Trainer(model, ["cls"], freeze=("encoder.nothing",), **OPTS).fit(TRAIN, collate_fn=collator(model))


def test_early_stopping_and_best_weights(tmp_path):
    model = tiny_model()
    trainer = Trainer(
        model,
        ["cls"],
        epochs=30,
        early_stopping_patience=2,
        monitor="val/accuracy",
        checkpoint_dir=tmp_path,
        **OPTS,
    )
    result = trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    epochs = result.history.epochs
    assert result.status == "early_stopped"
    assert len(epochs) < 30
    best = epochs["val/accuracy"].max()
    assert result.best_metric == best
    assert epochs["val/accuracy"].iloc[-2:].max() <= best
    # the model ends with the best weights: its validation accuracy is the best one
    assert trainer.evaluate(VAL, collate_fn=collator(model))["val/accuracy"] == pytest.approx(best)
    assert result.best_checkpoint is not None
    assert result.best_checkpoint.exists()


def test_schedules():
    model = tiny_model()
    t = Trainer(model, ["cls"], schedule="step", step_gamma=0.5, warmup_steps=2, **OPTS)
    assert [t.lr_factor(s, e, 10) for s, e in [(0, 0), (1, 0), (2, 0), (5, 1), (9, 3)]] == [
        0.5,
        1.0,
        1.0,
        0.5,
        0.125,
    ]
    t = Trainer(model, ["cls"], schedule="linear", **OPTS)
    assert [t.lr_factor(s, 0, 10) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    t = Trainer(model, ["cls"], schedule="cosine", **OPTS)
    assert t.lr_factor(5, 0, 10) == pytest.approx(0.5)
    result = Trainer(model, ["cls"], schedule="step", step_gamma=0.5, epochs=2, **OPTS).fit(
        TRAIN, collate_fn=collator(model)
    )
    assert list(result.history.epochs["lr"]) == [OPTS["lr"], OPTS["lr"] * 0.5]


def test_events_in_order(tmp_path):
    seen = []
    model = tiny_model()
    Trainer(
        model, ["cls"], epochs=2, checkpoint_dir=tmp_path, callbacks=[lambda e: seen.append(e)], **OPTS
    ).fit(TRAIN, VAL, collate_fn=collator(model))
    kinds = [e.kind for e in seen]
    assert kinds[0] == "train_start"
    assert kinds[-1] == "finish"
    assert kinds.count("step_end") == 10
    # epoch_end carries the 0-based epoch that just ended, like the step events before it
    assert [e.epoch for e in seen if e.kind == "epoch_end"] == [0, 1]
    assert [e.epoch for e in seen if e.kind == "step_end"] == [0] * 5 + [1] * 5
    assert kinds.index("validation") < kinds.index("epoch_end") < kinds.index("checkpoint")
    assert seen[-1].status == "completed"
    assert seen[-1].total_steps == 10
    step = next(e for e in seen if e.kind == "step_end")
    assert {"loss", "loss/cls", "lr"} <= set(step.metrics)


def test_broken_callback_does_not_stop_training(caplog):
    def bad(event):
        raise ValueError("plot broke")

    model = tiny_model()
    result = Trainer(model, ["cls"], epochs=1, callbacks=[bad], **OPTS).fit(TRAIN, collate_fn=collator(model))
    assert result.status == "completed"
    assert "plot broke" in caplog.text


def test_bad_inputs():
    model = tiny_model()
    for lr in (0, -1e-3, float("nan")):
        with pytest.raises(ConfigError, match="learning rate"):
            Trainer(model, ["cls"], lr=lr)
    with pytest.raises(ConfigError, match="lacks"):
        Trainer(model, ["dab"], **OPTS)
    with pytest.raises(ConfigError, match="Unknown trainer option"):
        Trainer(model, ["cls"], learning_rate=1e-3)
    with pytest.raises(DataError, match="empty"):
        Trainer(model, ["cls"], **OPTS).fit(TinyCells(0), collate_fn=collator(model))
    unlabelled = [{k: v for k, v in it.items() if k != "labels"} for it in TRAIN.items]
    with pytest.raises(DataError, match="label_key"):
        Trainer(model, ["cls"], **OPTS).fit(unlabelled, collate_fn=collator(model))
    with pytest.raises(ConfigError, match="divisible"):
        EpochBatchSampler(10, 7, world_size=2)
    with pytest.raises(ConfigError, match="positive integer"):
        TrainerConfig(epochs=0)


def test_nan_loss_is_a_clear_error():
    model = tiny_model()
    bad = TinyCells(16)
    for it in bad.items:
        it["values"] = it["values"] * float("nan")
    with pytest.raises(TrainingError, match="became nan"):
        Trainer(model, ["cls"], epochs=1, **OPTS).fit(bad, collate_fn=collator(model))


def test_resume_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="Nothing to resume"):
        Trainer(model, ["cls"], **OPTS).fit(TRAIN, collate_fn=collator(model), resume=True)
    with pytest.raises(Exception, match="No training checkpoint"):
        Trainer(model, ["cls"], **OPTS).fit(TRAIN, collate_fn=collator(model), resume=tmp_path)


def test_macro_f1_from_confusion_matches_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score

    from cellkit.train.trainer import macro_f1_from_confusion

    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 5, 30), rng.integers(0, 4, 30)
        cm = confusion_matrix(y, p, labels=range(6))
        assert macro_f1_from_confusion(cm) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_step_and_epoch_records_carry_macro_f1():
    model = tiny_model()
    result = Trainer(model, ["cls"], epochs=1, **OPTS).fit(TRAIN, collate_fn=collator(model))
    assert result.history.steps["macro_f1"].between(0, 1).all()
    assert 0 <= result.history.epochs["train/macro_f1"].iloc[0] <= 1
