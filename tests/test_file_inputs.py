"""Malformed files: every one gives a CellkitError naming the file and the field, quickly.

A table of damaged ``config.json`` (cellkit, Geneformer), ``args.json`` (scGPT), ``vocab.json`` and
``resources.json`` files, each loaded through the public :func:`cellkit.load_model`. None may raise a
raw ``KeyError`` / ``TypeError`` / ``AttributeError`` / ``RecursionError`` / ``MemoryError``, and
none may allocate memory in proportion to a number written in the file (a vocabulary id of 1e9, a
layer count of 1e9): each must be refused in time and memory proportional to the file's size.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import cellkit
from cellkit import CellkitError, CellModel, ConfigError, EncoderConfig, GeneVocab
from cellkit._utils import read_json
from cellkit.cli import main
from cellkit.model import CellModelConfig
from cellkit.presets import scgpt_config

from .test_finetune import N_GENES, make_model

#: peak Python allocation allowed while refusing one file (the files here are a few kB)
PEAK_BYTES = 64 * 2**20


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    model = make_model()
    model.add_head("classifier", n_classes=3)
    model.save(root / "cellkit")
    _scgpt_model().save(root / "scgpt", format="scgpt")
    return {"cellkit": root / "cellkit", "scgpt": root / "scgpt"}


def _scgpt_model() -> CellModel:
    """A tiny scGPT-family model whose vocabulary holds all three scGPT specials."""
    vocab = GeneVocab(
        [*(f"G{i}" for i in range(N_GENES)), "<pad>", "<cls>", "<eoc>"],
        specials={"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"},
    )
    torch.manual_seed(0)
    return CellModel(
        scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, n_bins=11), vocab
    )


def _copy(saved: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    out = tmp_path / kind
    shutil.copytree(saved[kind], out)
    return out


def _edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        doc = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(edit(doc)))

    return apply


def _write(name: str, text: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_text(text)

    return apply


def _model(**changes: Any) -> Callable[[Any], Any]:
    def edit(doc: dict) -> dict:
        doc["model"].update(changes)
        return doc

    return edit


def _encoder(**changes: Any) -> Callable[[Any], Any]:
    def edit(doc: dict) -> dict:
        doc["model"]["encoder"].update(changes)
        return doc

    return edit


def _drop(*path: str) -> Callable[[Any], Any]:
    def edit(doc: dict) -> dict:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return doc

    return edit


def _args(**changes: Any) -> Callable[[Any], Any]:
    return lambda doc: {**doc, **changes}


DEEP = "[" * 100_000 + "]" * 100_000

#: case -> (model kind, breaker, file name in the message, field name in the message or None)
CASES: dict[str, tuple[str, Callable[[Path], None], str, str | None]] = {
    # cellkit config.json
    "config not JSON": ("cellkit", _write("config.json", '{"format": "cellkit",'), "config.json", None),
    "config nested 1e5 deep": ("cellkit", _write("config.json", DEEP), "config.json", None),
    "config is an array": ("cellkit", _write("config.json", "[1, 2]"), "config.json", None),
    "config with NaN": (
        "cellkit",
        _edit_json(
            "config.json", lambda d: json.loads(json.dumps(d).replace('"dropout": 0.0', '"dropout": NaN'))
        ),
        "config.json",
        "NaN",
    ),
    "config repeats a key": (
        "cellkit",
        lambda f: (f / "config.json").write_text(
            (f / "config.json")
            .read_text()
            .replace('"format": "cellkit"', '"format": "cellkit", "format": "cellkit"')
        ),
        "config.json",
        "format",
    ),
    "format_version a string": (
        "cellkit",
        _edit_json("config.json", lambda d: {**d, "format_version": "abc"}),
        "config.json",
        "format_version",
    ),
    "model missing": ("cellkit", _edit_json("config.json", _drop("model")), "config.json", "model"),
    "model a list": (
        "cellkit",
        _edit_json("config.json", lambda d: {**d, "model": [1]}),
        "config.json",
        "model",
    ),
    "encoder missing": (
        "cellkit",
        _edit_json("config.json", _drop("model", "encoder")),
        "config.json",
        "encoder",
    ),
    "encoder a list": ("cellkit", _edit_json("config.json", _model(encoder=[512])), "config.json", "encoder"),
    "vocab_size missing": (
        "cellkit",
        _edit_json("config.json", _drop("model", "encoder", "vocab_size")),
        "config.json",
        "vocab_size",
    ),
    "d_model a string": (
        "cellkit",
        _edit_json("config.json", _encoder(d_model="16")),
        "config.json",
        "d_model",
    ),
    "n_heads negative": (
        "cellkit",
        _edit_json("config.json", _encoder(n_heads=-2)),
        "config.json",
        "n_heads",
    ),
    "dropout a list": (
        "cellkit",
        _edit_json("config.json", _encoder(dropout=[0.1])),
        "config.json",
        "dropout",
    ),
    "vocab_size a float": (
        "cellkit",
        _edit_json("config.json", _encoder(vocab_size=1e9)),
        "config.json",
        "vocab_size",
    ),
    "gene_norm a string": (
        "cellkit",
        _edit_json("config.json", _encoder(gene_norm="yes")),
        "config.json",
        "gene_norm",
    ),
    "activation a dict": (
        "cellkit",
        _edit_json("config.json", _encoder(activation={})),
        "config.json",
        "activation",
    ),
    "extra a list": ("cellkit", _edit_json("config.json", _encoder(extra=[])), "config.json", "extra"),
    "unknown encoder key": (
        "cellkit",
        _edit_json("config.json", _encoder(d_modle=16)),
        "config.json",
        "d_modle",
    ),
    "n_layers 1e9": (
        "cellkit",
        _edit_json("config.json", _encoder(n_layers=10**9)),
        "config.json",
        "n_layers",
    ),
    "heads a list": (
        "cellkit",
        _edit_json("config.json", _model(heads=["classifier"])),
        "config.json",
        "heads",
    ),
    "head options a string": (
        "cellkit",
        _edit_json("config.json", _model(heads={"classifier": "three"})),
        "config.json",
        "classifier",
    ),
    "n_classes a string": (
        "cellkit",
        _edit_json("config.json", _model(heads={"classifier": {"n_classes": "3"}})),
        "config.json",
        "n_classes",
    ),
    "classifier n_layers 1e9": (
        "cellkit",
        _edit_json("config.json", _model(heads={"classifier": {"n_classes": 3, "n_layers": 10**9}})),
        "config.json",
        "n_layers",
    ),
    "labels a number": (
        "cellkit",
        _edit_json("config.json", _model(heads={"classifier": {"n_classes": 3, "labels": 3}})),
        "config.json",
        "labels",
    ),
    "unknown head": (
        "cellkit",
        _edit_json("config.json", _model(heads={"decoder": {}})),
        "config.json",
        "decoder",
    ),
    "pooling a number": ("cellkit", _edit_json("config.json", _model(pooling=5)), "config.json", "pooling"),
    "specials a list": (
        "cellkit",
        _edit_json("config.json", _model(specials=["<pad>"])),
        "config.json",
        "specials",
    ),
    "input a string": ("cellkit", _edit_json("config.json", _model(input="binned")), "config.json", "input"),
    # vocab.json / resources.json
    "vocab id 1e9": ("cellkit", _edit_json("vocab.json", lambda d: {**d, "G3": 10**9}), "vocab.json", "G3"),
    "vocab id negative": ("cellkit", _edit_json("vocab.json", lambda d: {**d, "G0": -1}), "vocab.json", "G0"),
    "vocab id a string": (
        "cellkit",
        _edit_json("vocab.json", lambda d: {**d, "G1": "1"}),
        "vocab.json",
        "G1",
    ),
    "vocab an array": ("cellkit", _write("vocab.json", '["G0", "G1"]'), "vocab.json", None),
    "vocab nested deep": ("cellkit", _write("vocab.json", DEEP), "vocab.json", None),
    "resources nested deep": ("cellkit", _write("resources.json", DEEP), "resources.json", None),
    "resources an array": ("cellkit", _write("resources.json", "[]"), "resources.json", None),
    # scGPT args.json / vocab.json
    "args not an object": ("scgpt", _write("args.json", '"embsize"'), "args.json", None),
    "args nested deep": ("scgpt", _write("args.json", DEEP), "args.json", None),
    "embsize a string": ("scgpt", _edit_json("args.json", _args(embsize="16")), "args.json", "embsize"),
    "nheads missing": (
        "scgpt",
        _edit_json("args.json", lambda d: {k: v for k, v in d.items() if k != "nheads"}),
        "args.json",
        "nheads",
    ),
    "nlayers 1e9": ("scgpt", _edit_json("args.json", _args(nlayers=10**9)), "args.json", "nlayers"),
    "dropout not a number": ("scgpt", _edit_json("args.json", _args(dropout="high")), "args.json", "dropout"),
    "dropout out of range": ("scgpt", _edit_json("args.json", _args(dropout=3)), "args.json", "dropout"),
    "pad_value a string": ("scgpt", _edit_json("args.json", _args(pad_value="-2")), "args.json", "pad_value"),
    "n_bins negative": ("scgpt", _edit_json("args.json", _args(n_bins=-1)), "args.json", "n_bins"),
    "pad_token a list": (
        "scgpt",
        _edit_json("args.json", _args(pad_token=["<pad>"])),
        "args.json",
        "pad_token",
    ),
    "input_emb_style a list": (
        "scgpt",
        _edit_json("args.json", _args(input_emb_style=["continuous"])),
        "args.json",
        "input_emb_style",
    ),
    "max_seq_len a string": (
        "scgpt",
        _edit_json("args.json", _args(max_seq_len="1200")),
        "args.json",
        "max_seq_len",
    ),
    "scgpt vocab id 1e9": (
        "scgpt",
        _edit_json("vocab.json", lambda d: {**d, "G5": 10**9}),
        "vocab.json",
        "G5",
    ),
}

RAW = (KeyError, TypeError, AttributeError, RecursionError, MemoryError, IndexError)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_files_are_named_with_their_field(saved, tmp_path, case):
    kind, breaker, file_name, field_name = CASES[case]
    folder = _copy(saved, kind, tmp_path)
    breaker(folder)
    tracemalloc.start()
    try:
        with pytest.raises(CellkitError) as info:
            cellkit.load_model(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not isinstance(info.value, RAW) or isinstance(info.value, CellkitError)
    message = str(info.value)
    assert file_name in message, message
    if field_name is not None:
        assert field_name in message, message
    assert "not a model directory" not in message
    assert peak < PEAK_BYTES, f"refusing {case} allocated {peak / 2**20:.0f} MiB"


def test_unbroken_copies_load(saved, tmp_path):
    for kind in saved:
        cellkit.load_model(_copy(saved, kind, tmp_path))


def test_cli_names_the_damaged_file(saved, tmp_path, capsys):
    folder = _copy(saved, "cellkit", tmp_path)
    _edit_json("config.json", _encoder(d_model="sixteen"))(folder)
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "d_model" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- Geneformer config.json
def _geneformer_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    import pickle

    transformers.logging.set_verbosity_error()
    genes = [f"ENSG{i:011d}" for i in range(10)]
    config = transformers.BertConfig(
        vocab_size=12,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        hidden_act="relu",
    )
    folder = tmp_path / "geneformer"
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    with open(folder / "token_dictionary.pkl", "wb") as fh:
        pickle.dump({"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(genes)}, fh)
    return folder


GENEFORMER = {
    "hidden_size a string": ({"hidden_size": "8"}, "hidden_size"),
    "num_hidden_layers 1e9": ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    "num_hidden_layers a float": ({"num_hidden_layers": 1.5}, "num_hidden_layers"),
    "vocab_size null": ({"vocab_size": None}, "vocab_size"),
    "hidden_act a list": ({"hidden_act": ["relu"]}, "hidden_act"),
    "layer_norm_eps a string": ({"layer_norm_eps": "1e-12"}, "layer_norm_eps"),
    "max_position_embeddings negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
}


def test_geneformer_config_fields(tmp_path):
    base = _geneformer_dir(tmp_path)
    cellkit.load_model(base)
    for case, (changes, field_name) in GENEFORMER.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(base, folder)
        _edit_json("config.json", lambda d, c=changes: {**d, **c})(folder)
        with pytest.raises(CellkitError) as info:
            cellkit.load_model(folder)
        message = str(info.value)
        assert "config.json" in message and field_name in message, (case, message)
    folder = tmp_path / "deep"
    shutil.copytree(base, folder)
    _write("config.json", DEEP)(folder)
    with pytest.raises(CellkitError, match=r"config\.json.*nests"):
        cellkit.load_model(folder)


# ----------------------------------------------------------------------------- the parts directly
@pytest.mark.parametrize(
    ("data", "field_name"),
    [
        ({"vocab_size": 10, "d_model": "8"}, "d_model"),
        ({"vocab_size": 10, "n_layers": True}, "n_layers"),
        ({"vocab_size": 10, "layer_norm_eps": "small"}, "layer_norm_eps"),
        ({"vocab_size": 10, "attention_dropout": None}, "attention_dropout"),
        ({"vocab_size": 10, "pad_token_id": "0"}, "pad_token_id"),
        ({"vocab_size": 10, "value_max": float("inf")}, "value_max"),
        ({"vocab_size": 10, "final_norm": 1}, "final_norm"),
        ({"vocab_size": 10, "norm_scheme": None}, "norm_scheme"),
        ({"vocab_size": 10, "n_value_bins": -3}, "n_value_bins"),
        ({"d_model": 8}, "vocab_size"),
        ({"vocab_size": 10, "bogus": 1}, "bogus"),
        ([1, 2], "EncoderConfig"),
    ],
)
def test_encoder_config_from_dict(data, field_name):
    with pytest.raises(ConfigError, match=field_name):
        EncoderConfig.from_dict(data)


def test_encoder_config_from_json_is_bounded():
    with pytest.raises(ConfigError, match=r"cannot be parsed|levels deep"):  # refused before parsing
        EncoderConfig.from_json(DEEP[:5000] + DEEP[-5000:])
    with pytest.raises(ConfigError, match=r"cannot be parsed|not valid JSON"):
        EncoderConfig.from_json("{")
    cfg = EncoderConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    assert EncoderConfig.from_json(cfg.to_json()) == cfg


def test_cell_model_config_from_dict_names_the_field():
    enc = EncoderConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=16).to_dict()
    with pytest.raises(ConfigError, match=r"'encoder'.*d_model"):
        CellModelConfig.from_dict({"encoder": {**enc, "d_model": "8"}})
    with pytest.raises(ConfigError, match=r"heads\.mlm.*tied"):
        CellModelConfig.from_dict({"encoder": enc, "heads": {"mlm": {"tied": "yes"}}})
    with pytest.raises(ConfigError, match="object"):
        CellModelConfig.from_dict("encoder")  # type: ignore[arg-type]


def test_vocab_with_a_huge_id_is_refused_without_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(CellkitError, match=r"'B' has id 1000000000"):
            GeneVocab.from_dict({"A": 0, "B": 10**9})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": 1, "a": 2}', "appears more than once"),
        ('{"a": Infinity}', "Infinity"),
        ("[" * 40 + "]" * 40, "nests"),
        ("\xff\xfe", "not UTF-8"),
        ('{"a": 1', "not valid JSON"),
        ("1" + "0" * 5000, "cannot be parsed"),
    ],
)
def test_read_json_refusals_name_the_file(tmp_path, text, match):
    path = tmp_path / "thing.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CellkitError, match=match) as info:
        read_json(path, what="test file")
    assert str(path) in str(info.value)


def test_read_json_limits(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(CellkitError, match="at most 1,000 are read"):
        read_json(path, max_bytes=1000)
    with pytest.raises(CellkitError, match="not a regular file"):
        read_json(tmp_path)
    with pytest.raises(CellkitError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(CellkitError, match="expected a JSON array"):
        read_json(path, expect=list)
    assert read_json(path, expect=dict)["x"] == "y" * 2000
