"""TrainerState (the checkpoint's ``trainer`` object, old shape included) and the metric objects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cellkit import CheckpointError
from cellkit.train import (
    Accuracy,
    Classification,
    MacroF1,
    MaskedValueMSE,
    Metric,
    MetricSet,
    Trainer,
    TrainerState,
)
from cellkit.train.checkpoint import CheckpointManager
from cellkit.train.events import Callback
from cellkit.train.metrics import macro_f1

from ._tiny import TinyCells, collator, tiny_model

pytestmark = pytest.mark.timeout(300)

TRAIN, VAL = TinyCells(40, seed=0), TinyCells(15, seed=1)
OPTS = {"batch_size": 8, "lr": 3e-3, "progress": False, "seed": 3}

#: a ``trainer`` entry of state.json exactly as the dict-based trainer wrote it (mid-epoch, step 7)
OLD_TRAINER_STATE = {
    "epoch": 1,
    "batch": 2,
    "step": 7,
    "best": 0.95,
    "best_step": 5,
    "bad_evals": 1,
    "acc": {
        "cells": 16.0,
        "loss": 14.5,
        "correct": 9.0,
        "labelled": 16.0,
        "loss/cls": 14.5,
        "confusion": [[3.0, 1.0, 0.0], [2.0, 4.0, 0.0], [0.0, 4.0, 2.0]],
    },
    "last_metrics": {"val/loss": 0.95, "val/accuracy": 0.6},
    "done": False,
    "_improved": False,
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ TrainerState
def test_state_reads_the_old_dict_and_writes_the_same_object():
    state = TrainerState.from_dict(OLD_TRAINER_STATE, MetricSet([Accuracy(), MacroF1()], prefix="train/"))
    assert (state.epoch, state.batch, state.step, state.best_step, state.bad_evals) == (1, 2, 7, 5, 1)
    assert state.train_losses == {"cells": 16.0, "loss": 14.5, "loss/cls": 14.5}
    expected = {
        k: v for k, v in OLD_TRAINER_STATE.items() if k != "_improved"
    }  # transient, not saved any more
    assert state.to_dict() == expected
    json.dumps(state.to_dict())  # JSON-able
    rec = state.epoch_record(["cls"])
    assert rec["train/loss"] == 14.5 / 16 and rec["train/accuracy"] == 9 / 16
    y = np.repeat([0, 0, 1, 1, 2, 2], [3, 1, 2, 4, 4, 2])
    p = np.repeat([0, 1, 0, 1, 1, 2], [3, 1, 2, 4, 4, 2])
    assert rec["train/macro_f1"] == macro_f1(y, p)


def test_fresh_state_and_new_epoch():
    state = TrainerState.fresh(["cls", "dab"], MetricSet([Accuracy()], prefix="train/"))
    assert state.to_dict() == {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "acc": {"cells": 0.0, "loss": 0.0, "loss/cls": 0.0, "loss/dab": 0.0, "correct": 0.0, "labelled": 0.0},
        "last_metrics": {},
        "done": False,
    }
    assert state.epoch_record(["cls", "dab"]) == {}  # no cell yet: nothing to report


@pytest.mark.parametrize("bad", [{"step": None}, {"epoch": -1}, {"batch": "2"}, {"step": True}])
def test_damaged_counters_are_a_checkpoint_error(bad):
    with pytest.raises(CheckpointError, match="damaged"):
        TrainerState.from_dict({**OLD_TRAINER_STATE, **bad}, MetricSet([]))


class StopAt(Callback):
    def __init__(self, ref, step):
        self.ref, self.step = ref, step

    def on_step_end(self, event):
        if event.step == self.step:
            self.ref[0].request_stop()


def test_resume_from_a_checkpoint_in_the_old_shape_equals_a_straight_run(tmp_path):
    straight_model = tiny_model()
    straight = Trainer(straight_model, ["cls"], epochs=2, **OPTS).fit(
        TRAIN, VAL, collate_fn=collator(straight_model)
    )
    model, ref = tiny_model(), []
    trainer = Trainer(model, ["cls"], epochs=2, checkpoint_dir=tmp_path, callbacks=[StopAt(ref, 7)], **OPTS)
    ref.append(trainer)
    first = trainer.fit(TRAIN, VAL, collate_fn=collator(model))
    assert first.status == "stopped"
    # rewrite the checkpoint's trainer entry as the dict-based trainer wrote it: the transient
    # "_improved" flag, the confusion counts last in "acc"
    path = CheckpointManager(tmp_path).latest
    saved = json.loads((path / "state.json").read_text())
    acc = saved["trainer"]["acc"]
    assert set(acc) == {"cells", "loss", "correct", "labelled", "loss/cls", "confusion"}
    saved["trainer"]["acc"] = {
        k: acc[k] for k in ("cells", "loss", "correct", "labelled", "loss/cls", "confusion")
    }
    saved["trainer"]["_improved"] = False
    (path / "state.json").write_text(json.dumps(saved, indent=1))

    model2 = tiny_model(seed=99)
    second = Trainer(model2, ["cls"], epochs=2, checkpoint_dir=tmp_path, **OPTS).fit(
        TRAIN, VAL, collate_fn=collator(model2), resume=True
    )
    assert second.status == "completed"
    assert second.history == straight.history
    w2, ws = _weights(model2), _weights(straight_model)
    assert all(torch.equal(w2[k], ws[k]) for k in ws)


# ------------------------------------------------------------------------------ metrics
def _out_batch(logits, labels):
    return SimpleNamespace(class_logits=torch.as_tensor(logits)), {"labels": torch.as_tensor(labels)}


def test_metrics_equal_the_label_forms_exactly_over_any_split():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 6))
        logits = rng.normal(size=(n, k))
        labels = rng.integers(0, k, n)
        labels[rng.random(n) < 0.2] = -100
        whole = MetricSet([Accuracy(), MacroF1()])
        parts = MetricSet([Accuracy(), MacroF1()])
        whole.update(*_out_batch(logits, labels))
        for chunk in np.array_split(np.arange(n), 3):  # batches, then merged: as the epoch does
            step = MetricSet([Accuracy(), MacroF1()])
            step.update(*_out_batch(logits[chunk], labels[chunk]))
            parts.merge(step)
        ok = labels != -100
        pred = logits.argmax(-1)
        got = whole.compute()
        assert got == parts.compute()
        if ok.any():
            assert got["accuracy"] == float((pred[ok] == labels[ok]).mean())
            assert got["macro_f1"] == macro_f1(labels[ok], pred[ok])


def test_empty_metrics_follow_the_records_conventions():
    out, batch = _out_batch(np.zeros((2, 3)), [-100, -100])  # classifier outputs, no labelled cell
    train = MetricSet([Accuracy(), MacroF1()])
    train.update(out, batch)
    assert train.compute() == {"macro_f1": 0.0}  # a step's record: macro_f1 0, no accuracy
    val = MetricSet([Accuracy(), MacroF1()], prefix="val/", skip_empty=True)
    val.update(out, batch)
    assert val.compute() == {}  # validation leaves both out
    nothing = MetricSet([Accuracy(), MacroF1()])
    nothing.update(SimpleNamespace(class_logits=None), {"labels": torch.zeros(2)})
    assert nothing.compute() == {}
    assert nothing.state_dict() == {"correct": 0.0, "labelled": 0.0}  # no confusion entry


def test_state_dict_round_trip():
    a = MetricSet([Accuracy(), MacroF1()])
    a.update(*_out_batch([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]], [0, 0, 1]))
    b = MetricSet([Accuracy(), MacroF1()])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.compute() == a.compute() == {"accuracy": 1 / 3, "macro_f1": macro_f1([0, 0, 1], [0, 1, 0])}


def test_objectives_attach_their_metrics():
    assert [m.name for m in Classification().metrics()] == ["accuracy", "macro_f1"]
    assert MaskedValueMSE().metrics() == []
    model = tiny_model(heads={"classifier": {"n_classes": 3}, "adversarial": {"n_batches": 2}})
    trainer = Trainer(model, ["cls", "dab"], **OPTS)
    assert [m.name for m in trainer.new_metrics()] == ["accuracy", "macro_f1"]


class LabelledCells(Metric):
    """A custom metric: how many labelled cells a record saw."""

    name = "labelled_cells"

    def reset(self):
        self.n = 0.0

    def update(self, out, batch):
        self.n += float((batch["labels"] != -100).sum())

    def state_dict(self):
        return {"labelled_cells": self.n}

    def load_state_dict(self, state):
        self.n += float(state.get("labelled_cells", 0.0))

    def compute(self):
        return self.n

    def count(self):
        return self.n


@dataclass
class CountingClassification(Classification):
    def metrics(self):
        return [*super().metrics(), LabelledCells()]


def test_a_custom_metric_reaches_every_record_and_event():
    seen = []
    model = tiny_model()
    result = Trainer(model, [CountingClassification()], epochs=2, callbacks=[seen.append], **OPTS).fit(
        TRAIN, VAL, collate_fn=collator(model)
    )
    steps, epochs = result.history.steps, result.history.epochs
    assert list(steps["labelled_cells"]) == [8.0] * 10
    assert list(epochs["train/labelled_cells"]) == [40.0, 40.0]
    assert list(epochs["val/labelled_cells"]) == [15.0, 15.0]
    assert {"accuracy", "macro_f1"} <= set(steps.columns)
    validation = [e for e in seen if e.kind == "validation"]
    assert all(e.metrics["val/labelled_cells"] == 15.0 for e in validation)
