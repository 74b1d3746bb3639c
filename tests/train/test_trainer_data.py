"""The trainer over real cellkit data objects: shard streams, length buckets, masked objectives, bf16."""

from __future__ import annotations

import pytest
import torch

import cellkit
from cellkit.data.collate import Collator
from cellkit.data.dataset import CellDataset, ShardStreamDataset
from cellkit.train.trainer import Trainer

from ..test_finetune import make_adata, make_model

pytestmark = pytest.mark.timeout(300)
OPTS = {"batch_size": 8, "lr": 3e-3, "progress": False, "seed": 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


@pytest.fixture(scope="module")
def tokens():
    model = make_model()
    return cellkit.tokenize(make_adata(), model, obs_columns=["cell_type"], progress=False)


def _head(model):
    model.add_head("classifier", n_classes=3)
    return model


def test_streamed_shards_train_and_resume_mid_epoch(tokens, tmp_path):
    shards = tokens.to_shards(tmp_path / "shards", max_shard_samples=25)

    def stream():
        return ShardStreamDataset(shards, label_key="cell_type", shuffle=True, seed=2, batch_size=8)

    straight_model = _head(make_model())
    straight = Trainer(straight_model, ["cls"], epochs=2, **OPTS).fit(stream())
    assert straight.status == "completed"
    assert sum(r["cells"] for r in straight.history.step_records) == 2 * len(tokens)

    model = _head(make_model())
    stop_at = 4

    def stop(event):
        if event.kind == "step_end" and event.step == stop_at:
            trainer.request_stop()

    trainer = Trainer(model, ["cls"], epochs=2, checkpoint_dir=tmp_path / "ck", callbacks=[stop], **OPTS)
    assert trainer.fit(stream()).status == "stopped"
    model2 = _head(make_model(seed=5))
    resumed = Trainer(model2, ["cls"], epochs=2, checkpoint_dir=tmp_path / "ck", **OPTS).fit(
        stream(), resume=True
    )
    assert resumed.history == straight.history
    for k, v in straight_model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_length_buckets_reduce_padding(tokens):
    model = _head(make_model())
    widths = []
    coll = Collator.for_tokens(tokens)

    def collate(items):
        batch = coll(items)
        widths.append(batch["gene_ids"].shape[1])
        return batch

    ds = CellDataset(tokens, label_key="cell_type")
    Trainer(model, ["cls"], epochs=1, **OPTS).fit(ds, collate_fn=collate)
    plain = sum(widths)
    widths.clear()
    Trainer(model, ["cls"], epochs=1, bucket_by_length=True, **OPTS).fit(ds, collate_fn=collate)
    assert sum(widths) < plain


def test_masked_value_objectives_with_the_collator(tokens):
    model = make_model()
    coll = Collator.for_tokens(tokens, masking="values", mask_ratio=0.4)
    ds = CellDataset(tokens)
    result = Trainer(model, {"gep": 1.0, "mvc": 1.0, "ecs": 10.0}, epochs=3, **OPTS).fit(
        ds, ds, collate_fn=coll, val_collate_fn=Collator.for_tokens(tokens, masking="values", mask_ratio=0.4)
    )
    ep = result.history.epochs
    assert ep["train/loss/gep"].iloc[-1] < ep["train/loss/gep"].iloc[0]
    assert {"val/loss/gep", "val/loss/mvc", "val/loss/ecs"} <= set(ep.columns)


def test_cce_runs_two_passes(tokens):
    model = make_model()  # dropout 0: both passes agree; CCE then just tells cells apart
    ds = CellDataset(tokens)
    result = Trainer(model, ["cce"], epochs=1, **OPTS).fit(ds, collate_fn=Collator.for_tokens(tokens))
    assert result.history.steps["loss/cce"].notna().all()


def test_bf16_autocast_on_cpu(tokens):
    model = _head(make_model())
    ds = CellDataset(tokens, label_key="cell_type")
    result = Trainer(model, ["cls"], epochs=1, amp="bf16", **OPTS).fit(
        ds, collate_fn=Collator.for_tokens(tokens)
    )
    assert result.status == "completed"
    assert torch.isfinite(torch.tensor(result.history.steps["loss"].to_numpy())).all()
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    with pytest.raises(cellkit.ConfigError, match="fp16"):
        Trainer(model, ["cls"], epochs=1, amp="fp16", **OPTS).fit(ds, collate_fn=Collator.for_tokens(tokens))
