"""The Model panel: loading (demo, saved directory, recent paths), the model description, coverage, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cellkit._errors import CheckpointError, ConfigError
from cellkit.widgets import ModelPanel, StudioState
from cellkit.widgets._model import MAX_RECENT, add_recent, read_recent


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Keep the recent-paths file out of the real home."""
    monkeypatch.setenv("CELLKIT_HOME", str(tmp_path / "home"))


@pytest.fixture
def saved(tmp_path, demo):
    return demo.save(tmp_path / "m")


def test_shows_the_state_model_and_its_coverage(state, demo):
    panel = ModelPanel(state)
    info = panel.info()
    assert info["family"] == "scgpt" and info["format"] == "cellkit"
    assert info["n_parameters"] == demo.num_parameters() and info["vocab_size"] == len(demo.vocab)
    assert info["architecture"]["d_model"] == 128 and info["architecture"]["n_layers"] == 2
    assert info["architecture"]["n_heads"] == 8 and info["heads"] == ["expression", "mvc"]
    assert info["mapped"] == len(demo.load_report.mapped) > 0
    cov = info["coverage"]
    assert (cov["n_matched"], cov["n_genes"], cov["fraction"]) == (765, 765, 1.0)
    assert cov["genes_from"] == ".raw.var_names"  # the demo model reads .raw
    assert "765 of 765 genes" in panel.coverage_html.value
    assert "446,593" in panel.info_html.value and "scgpt" in panel.info_html.value


def test_demo_button(pbmc):
    state = StudioState(adata=pbmc)
    panel = ModelPanel(state)
    assert panel.info() == {} and "No model loaded" in panel.info_html.value
    panel.demo_button.click()
    assert panel.last_error is None
    assert state.model is not None and state.model_source == "demo"
    assert panel.info()["source"] == "demo" and panel.info()["coverage"]["n_matched"] == 765
    assert "demo" in panel.message_text and "cellkit-ok" in panel.message.value
    assert read_recent() == []  # the demo is not a path


def test_load_saved_directory_and_recent_list(saved, tmp_path, demo):
    panel = ModelPanel()  # alone: its own state
    model = panel.load(str(saved))
    assert panel.last_error is None, panel.message_text
    assert panel.state.model is model and panel.state.model_source == str(saved.resolve())
    info = panel.info()
    assert info["format"] == "cellkit" and info["n_parameters"] == demo.num_parameters()
    assert info["coverage"] is None and "No data yet" in panel.coverage_html.value
    key = "encoder.embeddings.gene.weight"
    np.testing.assert_array_equal(model.state_dict()[key], demo.state_dict()[key])
    # remembered, most recent first, in $CELLKIT_HOME/recent.json
    other = demo.save(tmp_path / "m2")
    panel.path.value = str(other)
    panel.load_button.click()
    assert panel.state.model_source == str(other.resolve())
    expected = [str(other.resolve()), str(saved.resolve())]
    assert read_recent() == expected
    assert json.loads((tmp_path / "home" / "recent.json").read_text())["models"] == expected
    # a new panel offers them; picking one fills the path box
    fresh = ModelPanel()
    assert [v for _, v in fresh.recent.options][1:] == expected
    fresh.recent.value = expected[1]
    assert fresh.path.value == expected[1]
    fresh.load()
    assert fresh.state.model_source == expected[1] and read_recent() == expected[::-1]


def test_recent_list_is_bounded_and_tolerates_a_corrupt_file(tmp_path):
    for i in range(MAX_RECENT + 3):
        add_recent(f"/models/{i}")
    paths = read_recent()
    assert len(paths) == MAX_RECENT and paths[0] == f"/models/{MAX_RECENT + 2}"
    add_recent("/models/5")  # moves to the front, no duplicate
    assert read_recent()[0] == "/models/5" and read_recent().count("/models/5") == 1
    assert not list((tmp_path / "home").glob(".recent-*"))  # no temp file left behind
    (tmp_path / "home" / "recent.json").write_text("{not json")
    assert read_recent() == []
    panel = ModelPanel()  # still builds
    assert [v for _, v in panel.recent.options] == [""]
    assert add_recent("/models/x") == ["/models/x"]  # and repairs the file
    (tmp_path / "home" / "recent.json").write_text('["a list, not a dict"]')
    assert read_recent() == []


def test_coverage_follows_the_data(state, pbmc):
    panel = ModelPanel(state)
    state.set_adata(pbmc[:, :100].copy(), name="first100")  # .raw keeps all 765 genes
    assert panel.info()["coverage"]["n_matched"] == 765
    small = pbmc[:, :100].copy()
    small.raw = None  # no .raw: the genes of .X are what the tokenizer would read
    state.set_adata(small, name="x100")
    cov = panel.info()["coverage"]
    assert (cov["n_matched"], cov["n_genes"], cov["genes_from"]) == (100, 100, "var_names")
    renamed = small.copy()
    renamed.var_names = [f"NOTAGENE{i}" for i in range(100)]
    state.set_adata(renamed, name="unknown")
    cov = panel.info()["coverage"]
    assert cov["n_matched"] == 0 and cov["unmatched_examples"][:2] == ["NOTAGENE0", "NOTAGENE1"]
    assert "No gene matches" in panel.coverage_html.value and "unknown" in panel.coverage_html.value


def test_format_choice(saved):
    panel = ModelPanel()
    panel.format.value = "cellkit"
    assert panel.load(str(saved)) is not None and panel.last_error is None
    assert panel.load(str(saved), format="scgpt") is None
    assert isinstance(panel.last_error, CheckpointError)
    assert panel.load(str(saved), format="onnx") is None
    assert isinstance(panel.last_error, ConfigError) and "Unknown model format" in panel.message_text


def _broken(saved, tmp_path, name, content):
    bad = tmp_path / "broken"
    shutil.copytree(saved, bad)
    (bad / name).write_bytes(content)
    return bad


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("empty", "Enter the path of a model directory"),
        ("missing", "does not exist"),
        ("not_a_checkpoint", "not a model directory cellkit recognises"),
        ("a_file", "is a file"),
        ("broken_weights", "model.safetensors cannot be read as safetensors"),
        ("broken_vocab", "vocab.json is not valid JSON"),
    ],
)
def test_bad_paths_keep_the_previous_model(state, saved, tmp_path, which, expected):
    panel = ModelPanel(state)
    before, source = state.model, state.model_source
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    path = {
        "empty": "  ",
        "missing": str(tmp_path / "nope"),
        "not_a_checkpoint": str(plain),
        "a_file": str(plain / "notes.txt"),
        "broken_weights": lambda: _broken(saved, tmp_path, "model.safetensors", b"\x00garbage" * 10),
        "broken_vocab": lambda: _broken(saved, tmp_path, "vocab.json", b'{"A": 0,'),
    }[which]
    path = str(path()) if callable(path) else path
    assert panel.load(path) is None
    assert panel.last_error is not None and expected in panel.message_text
    assert "cellkit-error" in panel.message.value and "Unexpected error" not in panel.message_text
    assert state.model is before and state.model_source == source
    assert read_recent() == []
    # still usable
    assert panel.load(str(saved)) is not None and panel.last_error is None
    assert state.model is not before


def test_unexpected_loader_errors_become_readable(state, saved, monkeypatch):
    import cellkit

    def explode(*_args, **_kwargs):
        raise OSError("Input/output error")

    panel = ModelPanel(state)
    before = state.model
    monkeypatch.setattr(cellkit, "load_model", explode)
    assert panel.load(str(saved)) is None
    assert isinstance(panel.last_error, CheckpointError) and state.model is before
    assert "Could not load a model from" in panel.message_text
    assert "OSError: Input/output error" in panel.message_text and "previous model" in panel.message_text
