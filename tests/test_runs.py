"""Run records (``run.json``): schema round trip, atomic and bounded files, where each run writes
one, ``cellkit info``, models that carry their record, and :func:`cellkit.rerun` giving the same
bits on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellkit
from cellkit import DataError, RunRecord, load_run
from cellkit._utils import _run
from cellkit._utils._run import (
    MAX_RUN_BYTES,
    SCHEMA_VERSION,
    hash_names,
    hash_positions,
    run_file_for,
    to_json_value,
    write_run,
)
from cellkit.analysis._runs import data_fingerprint
from cellkit.cli import main
from cellkit.presets import scgpt_config

from .test_finetune import FAST, make_adata, make_model

pytestmark = pytest.mark.timeout(300)
TINY = {**FAST, "epochs": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


def _record(**fields) -> RunRecord:
    base = {
        "function": "cellkit.finetune",
        "options": {"label_key": "cell_type", "seed": 3, "epochs": 2},
        "status": "completed",
        "metrics": {"accuracy": 0.5},
        "started_at": "2026-12-06T10:00:00+00:00",
        "finished_at": "2026-12-06T10:00:05+00:00",
        "wall_time_s": 5.0,
        "environment": _run.environment("cpu"),
    }
    return RunRecord(**{**base, **fields})


# ============================================================================== the record
def test_round_trip_through_a_file(tmp_path):
    rec = _record(paths={"checkpoint_dir": "/abs/ckpt"}, command=["finetune", "--seed", "3"])
    file = write_run(rec, tmp_path / "run_dir")
    assert file == tmp_path / "run_dir" / "run.json"
    back = load_run(tmp_path / "run_dir")
    assert back == rec
    assert load_run(file) == rec
    doc = json.loads(file.read_text())
    assert doc["schema"] == "cellkit-run" and doc["schema_version"] == SCHEMA_VERSION
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__ and env["device"] == "cpu"
    assert "hostname" not in json.dumps(env).lower()


def test_values_become_json_and_say_whether_they_replay():
    assert to_json_value(np.float32(0.5)) == (0.5, True)
    assert to_json_value(np.int64(7)) == (7, True)
    assert to_json_value(("cls", "gep")) == (["cls", "gep"], True)
    assert to_json_value(Path("a/b")) == ("a/b", True)
    assert to_json_value(float("nan")) == (None, True)
    assert to_json_value({"gep": np.float64(0.5)}) == ({"gep": 0.5}, True)
    assert to_json_value(np.array([1, 2, 3])) == ([1, 2, 3], True)
    assert to_json_value(pd.Series(["a", "b"])) == (["a", "b"], True)
    big, ok = to_json_value(np.arange(5000))
    assert not ok and big["shape"] == [5000] and big["sha256"] == hash_positions(np.arange(5000))
    obj, ok = to_json_value(object())
    assert not ok and obj["type"] == "builtins.object"
    # a record holding numpy values still writes standard JSON
    text = _record(metrics={"acc": np.float32(0.25), "n": np.int64(3), "bad": float("inf")}).to_json()
    assert json.loads(text)["metrics"] == {"acc": 0.25, "n": 3, "bad": None}


def test_name_hashes_do_not_depend_on_container_or_block():
    names = [f"cell{i}" for i in range(200_000)]
    h = hash_names(names)
    assert h == hash_names(pd.Index(names)) == hash_names(np.asarray(names))
    assert h != hash_names(names[::-1])
    assert hash_names(["a", "bc"]) != hash_names(["ab", "c"])  # separated, not concatenated
    assert hash_positions(np.arange(5, dtype=np.int32)) == hash_positions(list(range(5)))


def test_write_is_atomic(tmp_path, monkeypatch):
    rec = _record()
    write_run(rec, tmp_path)
    before = (tmp_path / "run.json").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_run(_record(status="stopped"), tmp_path)
    assert (tmp_path / "run.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind


def test_missing_corrupt_oversized_and_newer_records_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"holds no run\.json"):
        load_run(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "cellkit-run", "schema_version": 1, "function": ')
    with pytest.raises(DataError, match=r"run record .*bad\.json is not valid JSON"):
        load_run(bad)
    bad.write_text('{"format": "cellkit"}')
    with pytest.raises(DataError, match="not a cellkit run record"):
        load_run(bad)
    doc = _record().to_dict()
    bad.write_text(json.dumps({**doc, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(DataError, match="newer than this cellkit"):
        load_run(bad)
    bad.write_text(json.dumps({**doc, "options": [1, 2]}))
    with pytest.raises(DataError, match="'options' must be an object"):
        load_run(bad)
    with open(bad, "wb") as fh:  # sparse: the size is refused before anything is read
        fh.truncate(MAX_RUN_BYTES + 1)
    with pytest.raises(DataError, match="at most"):
        load_run(bad)


def test_run_file_locations(tmp_path):
    (tmp_path / "store").mkdir()
    assert run_file_for(tmp_path / "store") == tmp_path / "store" / "run.json"
    assert run_file_for(tmp_path / "new_dir") == tmp_path / "new_dir" / "run.json"
    assert run_file_for(tmp_path / "out.h5ad") == tmp_path / "out.h5ad.run.json"
    assert run_file_for(tmp_path / "x" / "run.json") == tmp_path / "x" / "run.json"


def test_data_fingerprint_tracks_names_shape_and_selection():
    a = make_adata()
    fp = data_fingerprint(a)
    assert fp["shape"] == [120, 40] and fp["n_selected"] == 120
    assert data_fingerprint(a.copy()) == fp
    sel = data_fingerprint(a, cells="cell_type == 'type1'")
    assert sel["n_selected"] == 40 and sel["selected_sha256"] != fp["selected_sha256"]
    b = a.copy()
    b.obs_names = [f"x{i}" for i in range(b.n_obs)]
    assert data_fingerprint(b)["obs_names_sha256"] != fp["obs_names_sha256"]


# ============================================================================== training runs
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One fine-tuning run with a checkpoint_dir (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("tuned")
    adata, model = make_adata(), make_model()
    torch.set_num_threads(1)
    result = cellkit.finetune(adata, model, label_key="cell_type", checkpoint_dir=str(tmp / "ckpt"), **TINY)
    return adata, result, tmp


def test_finetune_records_its_run(tuned):
    adata, result, tmp = tuned
    rec = result.run
    assert rec is not None and result.model.run is rec
    assert rec.function == "cellkit.finetune" and rec.status == result.status
    assert rec.options["label_key"] == "cell_type" and rec.options["epochs"] == 2
    assert rec.options["schedule"] == "constant"  # **trainer_options are flattened in
    assert rec.seeds == {"seed": 0, "torch_initial_seed": 0}
    assert rec.metrics["accuracy"] == result.metrics["accuracy"]
    assert rec.outputs["baseline_metrics"] == result.baseline_metrics != {}  # the logistic regression beside it
    assert rec.data == data_fingerprint(adata)
    assert rec.model["vocab_size"] == len(result.model.vocab)
    assert rec.model["fingerprint"] != rec.outputs["model"]["fingerprint"]  # trained in place
    assert rec.paths["checkpoint_dir"] == str((tmp / "ckpt").resolve())
    assert rec.environment["device"] == "cpu" and rec.wall_time_s > 0
    assert load_run(tmp / "ckpt") == rec
    text = str(rec)
    assert "cellkit.finetune (completed)" in text and "120×40" in text and "label_key=cell_type" in text


def test_saved_model_carries_its_run(tuned, tmp_path, caplog):
    _, result, _ = tuned
    result.model.save(tmp_path / "m")
    assert (tmp_path / "m" / "run.json").is_file()
    loaded = cellkit.load_model(tmp_path / "m")
    assert loaded.run == result.run
    # a model without a record saves none, and loads with run None
    make_model().save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "run.json").exists()
    assert cellkit.load_model(tmp_path / "plain").run is None
    # a damaged run.json does not stop the weights from loading
    (tmp_path / "m" / "run.json").write_text("{ not json")
    assert cellkit.load_model(tmp_path / "m").run is None
    assert "without its run record" in caplog.text


def test_scgpt_format_save_carries_the_run_beside_its_files(tmp_path):
    specials = {"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}
    vocab = cellkit.GeneVocab([*(f"G{i}" for i in range(10)), *specials.values()], specials=specials)
    model = cellkit.CellModel(scgpt_config(vocab, d_model=16, n_heads=2, n_layers=1, d_ff=32, n_bins=11), vocab)
    model.run = _record()
    model.save(tmp_path / "sg", format="scgpt")
    assert (tmp_path / "sg" / "run.json").is_file() and (tmp_path / "sg" / "best_model.pt").is_file()
    assert cellkit.load_model(tmp_path / "sg").run == model.run


def test_predict_output_gets_a_run_record(tuned, tmp_path):
    adata, result, _ = tuned
    cellkit.predict(adata, result.model, output=tmp_path / "pred.h5ad", progress=False)
    rec = load_run(tmp_path / "pred.h5ad")
    assert rec.function == "cellkit.analysis.atlas.predict_to_output"
    assert rec.outputs["classes"] == result.classes
    assert rec.model["fingerprint"] == result.run.outputs["model"]["fingerprint"]  # the tuned model
    assert rec.model["made_by"]["function"] == "cellkit.finetune"


def test_rerun_gives_the_same_weights_and_metrics(tuned, tmp_path):
    adata, result, tmp = tuned
    record = load_run(tmp / "ckpt")
    again = cellkit.rerun(record, adata=adata, model=make_model())
    assert again.metrics == result.metrics
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.run.outputs["model"]["fingerprint"] == record.outputs["model"]["fingerprint"]
    assert again.run.options["checkpoint_dir"] is None  # the rerun does not write into the recorded run
    # call_options is the documented manual path
    manual = cellkit.finetune(adata, make_model(), **{**record.call_options, "checkpoint_dir": None})
    assert manual.metrics == result.metrics


def test_rerun_refuses_other_data_or_model(tuned):
    adata, result, _ = tuned
    other = adata[:100].copy()
    with pytest.raises(DataError, match=r"data differ .*shape"):
        cellkit.rerun(result.run, adata=other, model=make_model())
    renamed = adata.copy()
    renamed.obs_names = [f"x{i}" for i in range(renamed.n_obs)]
    with pytest.raises(DataError, match="obs_names_sha256"):
        cellkit.rerun(result.run, adata=renamed, model=make_model())
    with pytest.raises(DataError, match="model differs"):
        cellkit.rerun(result.run, adata=adata, model=make_model(seed=1))
    with pytest.raises(cellkit.ConfigError, match="in memory"):
        cellkit.rerun(result.run, model=make_model())
    with pytest.warns(UserWarning, match="data differ"):
        cellkit.rerun(result.run, adata=other, model=make_model(), check="warn", epochs=1)
    older = dataclasses.replace(result.run, environment={**result.run.environment, "torch": "0.1"})
    with pytest.warns(UserWarning, match=r"software differs .*torch 0\.1"):
        cellkit.rerun(older, adata=adata, model=make_model(), epochs=1)


def test_rerun_asks_for_options_it_could_only_describe(tmp_path):
    adata = make_adata()
    seen = []
    r = cellkit.finetune(
        adata, make_model(), label_key="cell_type", callbacks=[seen.append], cells=np.arange(100), **{**TINY, "epochs": 1}
    )
    assert "callbacks" in r.run.not_replayable
    assert r.run.options["callbacks"][0]["type"] == "callable"
    assert r.run.options["cells"] == list(range(100))  # short selections are stored as themselves
    again = cellkit.rerun(r.run, adata=adata, model=make_model())  # callbacks: reset to none
    assert again.metrics == r.metrics


def test_pretrain_records_its_run(tmp_path):
    result = cellkit.pretrain(make_adata(), make_model(), checkpoint_dir=str(tmp_path / "ck"), **{**TINY, "epochs": 1})
    assert result.run.function == "cellkit.pretrain" and result.model.run is result.run
    assert load_run(tmp_path / "ck").status == result.status


# ============================================================================== outputs and the CLI
def test_embed_output_gets_a_run_record(tmp_path, capsys):
    adata, model = make_adata(), make_model()
    cellkit.embed_cells(adata, model, output=tmp_path / "emb", progress=False, chunk_size=50)
    rec = load_run(tmp_path / "emb")
    assert rec.function == "cellkit.analysis.atlas.embed_to_output"
    assert rec.metrics["n_chunks"] == 3 and rec.outputs["kind"] == "dir"
    assert rec.data == data_fingerprint(adata)
    cellkit.embed_cells(adata, model, output=tmp_path / "emb.h5ad", progress=False)
    assert (tmp_path / "emb.h5ad.run.json").is_file()
    assert main(["info", str(tmp_path / "emb.h5ad")]) == 0
    assert "embed_to_output (completed)" in capsys.readouterr().out
    # the same job found complete keeps the record of the run that computed it
    first = (tmp_path / "emb" / "run.json").read_bytes()
    cellkit.embed_cells(adata, model, output=tmp_path / "emb", progress=False, chunk_size=50)
    assert (tmp_path / "emb" / "run.json").read_bytes() == first
    # and a rerun of it, into a new output, gives the same array
    cellkit.rerun(rec, adata=adata, model=model, output=tmp_path / "emb2")
    assert np.array_equal(np.load(tmp_path / "emb" / "X_cellkit.npy"), np.load(tmp_path / "emb2" / "X_cellkit.npy"))
    with pytest.raises(cellkit.ConfigError, match="own output"):
        cellkit.rerun(rec, adata=adata, model=model)


def test_cli_finetune_writes_run_json_and_info_prints_it(tmp_path, capsys):
    data, model_dir, out = tmp_path / "cells.h5ad", tmp_path / "base", tmp_path / "run"
    make_adata().write_h5ad(data)
    make_model().save(model_dir)
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--label-key", "cell_type",
            "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    rec = load_run(out)
    assert rec.command == args
    assert rec.data["shape"] == [120, 40] and rec.data["path"] == str(data)
    assert rec.paths["adata"] == str(data.resolve())
    assert rec.options["adata"] == str(data) and "adata" not in rec.not_replayable
    assert rec.model["source"] == str(model_dir)
    assert load_run(out / "model") == rec
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run       cellkit.finetune (completed)" in text and "command   cellkit finetune" in text
    assert "CellModel(" not in text  # a run directory: the record only
    assert main(["info", str(out / "model")]) == 0
    text = capsys.readouterr().out
    assert "run       cellkit.finetune" in text and "CellModel(family='scgpt'" in text  # both
    assert main(["info", str(out / "run.json")]) == 0
    assert "cellkit.finetune" in capsys.readouterr().out
    assert main(["info", str(model_dir)]) == 0  # a model without a record: as before
    assert "run       " not in capsys.readouterr().out
    # rerun from the record alone: data and model are read again from the recorded paths
    again = cellkit.rerun(out, progress=False)
    tuned = cellkit.load_model(out / "model")
    a, b = tuned.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_tokenize_writes_run_json(tmp_path):
    data = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(data)
    make_model().save(tmp_path / "m")
    assert main(["tokenize", str(data), "--model", str(tmp_path / "m"), "--output", str(tmp_path / "tok"), "--quiet"]) == 0
    rec = load_run(tmp_path / "tok")
    assert rec.function == "cellkit.tokenize" and rec.metrics["n_cells"] == 120
    assert rec.data["kind"] == "h5ad" and rec.data["shape"] == [120, 40]
    assert cellkit.open_shards(tmp_path / "tok").n_shards == 1  # the shard directory still opens
    args = ["embed", str(tmp_path / "tok"), "--model", str(tmp_path / "m"), "--output", str(tmp_path / "emb"), "--quiet"]
    assert main(args) == 0
    emb = load_run(tmp_path / "emb")
    assert emb.command == args and emb.data["kind"] == "shards" and emb.options["data"] == {"type": "ShardedTokens", "see": "data"}
    # embed from the .h5ad (read backed by the command), then rerun from the record alone
    args = ["embed", str(data), "--model", str(tmp_path / "m"), "--output", str(tmp_path / "e.h5ad"), "--quiet"]
    assert main(args) == 0
    rec = load_run(tmp_path / "e.h5ad")
    assert rec.data["file"] == str(data.resolve())
    cellkit.rerun(rec, output=tmp_path / "e2", progress=False)
    first = ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_cellkit"]
    assert np.array_equal(first, np.load(tmp_path / "e2" / "X_cellkit.npy"))


def test_shard_directory_runs_record_the_manifest_and_rerun_from_it(tmp_path):
    adata, model = make_adata(), make_model()
    shards = cellkit.tokenize(adata, model, output=tmp_path / "tok", obs_columns=["cell_type"], progress=False)
    r = cellkit.finetune(shards, model, label_key="cell_type", **{**TINY, "epochs": 1})
    assert r.run.data["kind"] == "shards" and r.run.data["n_cells"] == 120 and "manifest_sha256" in r.run.data
    again = cellkit.rerun(r.run, model=make_model())  # the cells are read again from the shard directory
    assert again.metrics == r.metrics
