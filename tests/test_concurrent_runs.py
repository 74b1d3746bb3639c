"""Two training runs in one process are refused (torch's RNG is process-wide); a live checkpoint_dir is locked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from cellkit import CellkitError, CellModel, CheckpointError, GeneVocab
from cellkit.presets import scgpt_config
from cellkit.tasks import finetune, pretrain
from cellkit.train.checkpoint import CheckpointManager
from cellkit.train.trainer import Trainer, TrainingError

from .test_finetune import N_GENES, make_adata
from .train._tiny import TinyCells, collator, tiny_model

pytestmark = pytest.mark.timeout(300)
# dropout on: the RNG matters, so a disturbed run would show
FAST = {"epochs": 2, "lr": 3e-3, "batch_size": 16, "progress": False, "seed": 5}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _model():
    genes = [f"G{i}" for i in range(N_GENES)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(1)
    return CellModel(
        scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.1, n_bins=11), vocab
    )


def test_second_concurrent_finetune_is_refused_and_the_first_equals_its_standalone_run():
    adata = make_adata(n_per_class=16)
    alone = finetune(adata, model := _model(), label_key="cell_type", **FAST)
    alone_1 = alone.model
    alone_2 = finetune(adata, _model(), label_key="cell_type", **FAST).model
    assert _same(_weights(alone_1), _weights(alone_2))  # a standalone run is bit-identical to itself
    assert model is alone_1

    in_step, refused = threading.Event(), threading.Event()

    def hold(event):  # the background run waits in its first step until the second one was tried
        if event.kind == "step_end" and not in_step.is_set():
            in_step.set()
            refused.wait(60)

    out = {}

    def background():
        torch.set_num_threads(1)  # the thread count is per thread: match the standalone runs
        out["result"] = finetune(adata, _model(), label_key="cell_type", callbacks=[hold], **FAST)

    # built before the background run starts: building a model draws from torch's global RNG, which
    # would change the background run's dropout stream (cellkit cannot guard that)
    m1, m2, m3 = _model(), _model(), tiny_model()
    thread = threading.Thread(target=background, name="studio-finetune")
    thread.start()
    try:
        assert in_step.wait(60)
        # a notebook cell: fine-tune, pretrain, or a bare Trainer while the background run is active
        for start in (
            lambda: finetune(adata, m1, label_key="cell_type", **FAST),
            lambda: pretrain(adata, m2, **FAST),
            lambda: Trainer(m3, ["cls"], progress=False).fit(TinyCells(8), collate_fn=collator(m3)),
        ):
            with pytest.raises(TrainingError, match=r"(?i)another cellkit training run is active") as info:
                start()
            assert "studio-finetune" in str(info.value)
            assert isinstance(info.value, CellkitError)
    finally:
        refused.set()
        thread.join(120)
    # the background run was not disturbed: its per-step losses are its standalone run's. A reseeded
    # dropout stream changes them by > 1e-3; rtol 1e-5 allows the last-bit float differences a
    # different thread may give (thread-local math settings), which Adam can grow in the weights
    np.testing.assert_allclose(
        out["result"].history.steps["loss"].to_numpy(), alone.history.steps["loss"].to_numpy(), rtol=1e-5
    )
    # the slot is free again once the run has finished
    again = finetune(adata, _model(), label_key="cell_type", **FAST).model
    assert _same(_weights(again), _weights(alone_1))


def test_a_run_that_fails_releases_the_slot():
    adata = make_adata(n_per_class=16)
    with pytest.raises(CellkitError):
        finetune(adata, _model(), label_key="no_such_column", **FAST)
    finetune(adata, _model(), label_key="cell_type", **{**FAST, "epochs": 1})


def test_checkpoint_dir_of_a_live_run_is_locked(tmp_path, caplog):
    root = tmp_path / "ckpt"
    model = tiny_model()
    with CheckpointManager(root).lock():
        # another process
        code = textwrap.dedent(
            f"""
            from cellkit.train.checkpoint import CheckpointManager
            from cellkit import CheckpointError
            try:
                CheckpointManager({str(root)!r}).lock().__enter__()
            except CheckpointError as e:
                print("REFUSED", e)
            else:
                print("ACQUIRED")
            """
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "REFUSED" in done.stdout, done.stdout + done.stderr
        assert "in use by another live training run" in done.stdout
        assert str(root) in done.stdout
        # and a run in this process
        with pytest.raises(CheckpointError, match="in use by another live training run"):
            Trainer(model, ["cls"], checkpoint_dir=root, progress=False).fit(
                TinyCells(8), collate_fn=collator(model)
            )
    # released: a run goes ahead and releases it again
    Trainer(model, ["cls"], checkpoint_dir=root, progress=False, epochs=1).fit(
        TinyCells(8), collate_fn=collator(model)
    )
    assert (root / ".lock").read_text() == ""
    # a lock left by a process that died is taken over, with a log line naming it
    (root / ".lock").write_text("pid 999999 on elsewhere, started 2020-01-01 00:00:00")
    with caplog.at_level("WARNING", logger="cellkit"), CheckpointManager(root).lock():
        pass
    assert "Taking over the lock" in caplog.text
    assert "pid 999999" in caplog.text
