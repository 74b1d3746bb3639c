"""Geneformer (Hugging Face BERT) checkpoints: parity with transformers, safety, clear errors.

Tiny real ``BertForMaskedLM`` models are built with ``transformers`` (seeded random weights, odd
sizes) and saved next to pickled dictionaries laid out like Geneformer's: V1 (``<pad>``/``<mask>``,
``numpy.int16`` ids, ReLU, 2048 positions) and V2 (``<pad>``/``<mask>``/``<cls>``/``<eos>``, GELU,
4096 positions). cellkit's outputs must equal transformers' at every non-pad position.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cellkit
from cellkit import CellkitError, CheckpointError, InputSpec, VocabError
from cellkit.checkpoints import detect_format
from cellkit.checkpoints import geneformer as gf
from cellkit.heads import pool_cells
from tests._tolerance import FP32_PARITY, assert_close_scaled

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

ATOL = FP32_PARITY  # fp32 parity contract (see tests/_tolerance.py)
N_GENES = 37
N_LAYERS = 2
HIDDEN = 24
#: largest absolute difference seen per comparison (for reporting)
MAX_DIFF: dict[str, float] = {}


# ---------------------------------------------------------------------------------------- builders
def _gene_ids(n: int) -> list[str]:
    return [f"ENSG{1000 + 7 * i:011d}" for i in range(n)]  # already in sorted order


def _write_dictionaries(folder: Path, version: str, *, n_genes: int = N_GENES, suffix: str = "") -> None:
    """Pickles laid out like Geneformer's (§1.3): V1 ids are numpy.int16, medians numpy.float64."""
    genes = _gene_ids(n_genes)
    if version == "V1":
        tokens = {"<pad>": 0, "<mask>": 1} | {g: np.int16(i + 2) for i, g in enumerate(genes)}
    else:
        tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} | {g: i + 4 for i, g in enumerate(genes)}
    rng = np.random.default_rng(1)
    medians = {g: np.float64(x) for g, x in zip(genes, rng.uniform(0.1, 600.0, n_genes))}
    names = {f"GENE{i}": g for i, g in enumerate(genes)}
    mapping = {g: g for g in genes}
    tables = {
        f"token_dictionary{suffix}.pkl": tokens,
        f"gene_median_dictionary{suffix}.pkl": medians,
        f"gene_name_id_dict{suffix}.pkl": names,
        f"ensembl_mapping_dict{suffix}.pkl": mapping,
    }
    for name, table in tables.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(table, fh, protocol=4)


def _bert_config(version: str, **overrides) -> BertConfig:
    n_special = 2 if version == "V1" else 4
    settings = {
        "vocab_size": N_GENES + n_special,
        "hidden_size": HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 3,
        "intermediate_size": 40,
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "initializer_range": 0.2,
        "layer_norm_eps": 1e-12,
    }
    if version == "V1":
        settings |= {
            "hidden_act": "relu",
            "max_position_embeddings": 2048,
            "hidden_dropout_prob": 0.02,
            "attention_probs_dropout_prob": 0.02,
        }
    else:
        settings |= {
            "hidden_act": "gelu",
            "max_position_embeddings": 4096,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
        }
    return BertConfig(**(settings | overrides))


def _random_model(cls, config: BertConfig, seed: int):
    """A seeded model whose every parameter (LayerNorms, biases included) is non-trivial."""
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save_legacy_bin(model, folder: Path) -> None:
    """A V1-era ``pytorch_model.bin``: TF LayerNorm names, position_ids, pooler, NSP, tied copies."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value.clone()
    assert "cls.predictions.decoder.weight" in state
    assert "cls.predictions.decoder.bias" in state
    g = torch.Generator().manual_seed(5)
    state["bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    state["bert.pooler.dense.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
    state["bert.pooler.dense.bias"] = torch.randn(HIDDEN, generator=g)
    state["cls.seq_relationship.weight"] = torch.randn(2, HIDDEN, generator=g)
    state["cls.seq_relationship.bias"] = torch.randn(2, generator=g)
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Model directories: ``V1`` and ``V2`` (safetensors), ``V1-bin`` (legacy pytorch_model.bin)."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("geneformer")
    dirs = {}
    for version, seed in (("V1", 11), ("V2", 22)):
        folder = root / version
        model = _random_model(BertForMaskedLM, _bert_config(version), seed)
        model.save_pretrained(folder)
        suffix = "_gc30M" if version == "V1" else "_gc104M"
        _write_dictionaries(folder, version, suffix=suffix)
        dirs[version] = folder
        if version == "V1":
            _save_legacy_bin(model, root / "V1-bin")
            _write_dictionaries(root / "V1-bin", "V1")
            dirs["V1-bin"] = root / "V1-bin"
    return dirs


def _reference_dir(ckpts: dict[str, Path], kind: str) -> Path:
    return ckpts["V1" if kind == "V1-bin" else kind]


@functools.cache
def _hf(cls, folder: Path, attn: str = "eager"):
    return cls.from_pretrained(folder, attn_implementation=attn).eval()


def _batch(vocab, *, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-ordered cells of different lengths, V2 ones wrapped in <cls> … <eos>, right-padded."""
    rng = np.random.default_rng(seed)
    genes = np.array([i for i in range(len(vocab)) if i not in vocab.special_ids])
    v2 = "cls" in vocab.specials
    cells = []
    for n in lengths:
        ids = rng.permutation(genes)[:n].tolist()
        cells.append([vocab.cls_id, *ids, vocab.special_id("eos")] if v2 else ids)
    width = max(map(len, cells))
    ids = torch.full((len(cells), width), vocab.pad_id, dtype=torch.long)
    for i, cell in enumerate(cells):
        ids[i, : len(cell)] = torch.tensor(cell)
    padding = ids == vocab.pad_id
    return ids, padding


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32, cellkit's kernels vs transformers' (different reduction order on every CPU): ATOL relative to
    # max(1, max|expected|); measured on an Intel Xeon (AVX-512): ≤ 2.4e-6 (MLM logits), ≤ 1.5e-6 elsewhere
    diff = assert_close_scaled(actual, expected, rel=ATOL, what=name)
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)


def _copy(ckpts: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpts[kind], tmp_path / kind))


# ---------------------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["V1", "V2", "V1-bin"])
def test_hidden_states_and_logits_equal_transformers(ckpts, kind, hf_attn):
    model = cellkit.load_model(ckpts[kind])
    ids, pad = _batch(model.vocab, lengths=[12, 5, 9, 1])
    keep = ~pad
    ref_dir = _reference_dir(ckpts, kind)
    with torch.no_grad():
        mlm = _hf(BertForMaskedLM, ref_dir, hf_attn)(
            input_ids=ids, attention_mask=keep.long(), output_hidden_states=True
        )
        base = _hf(BertModel, ref_dir, hf_attn)(
            input_ids=ids, attention_mask=keep.long(), output_hidden_states=True
        )
        for backend in ("sdpa", "explicit", "varlen"):
            out = model(ids, padding_mask=pad, output_hidden_states=True, attn_backend=backend)
            assert len(out.hidden_states) == N_LAYERS + 1 == len(mlm.hidden_states)
            for i, state in enumerate(out.hidden_states):
                _close(f"hidden_states[{i}] vs BertForMaskedLM", state[keep], mlm.hidden_states[i][keep])
                _close(f"hidden_states[{i}] vs BertModel", state[keep], base.hidden_states[i][keep])
            _close(
                "last_hidden_state vs BertModel", out.last_hidden_state[keep], base.last_hidden_state[keep]
            )
            _close("MLM logits vs BertForMaskedLM", out.token_logits[keep], mlm.logits[keep])


def test_legacy_bin_loads_the_same_tensors_as_safetensors(ckpts):
    a = cellkit.load_model(ckpts["V1"]).state_dict()
    b = cellkit.load_model(ckpts["V1-bin"]).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------- 2. embeddings
def _geneformer_cell_mean(hidden: torch.Tensor, pad: torch.Tensor, *, has_cls: bool, has_eos: bool):
    """Geneformer's emb_mode='cell' by position: drop <cls> (first) and <eos> (last real token)."""
    rows = []
    for b, length in enumerate((~pad).sum(1).tolist()):
        start, stop = int(has_cls), length - int(has_eos)
        rows.append(hidden[b, start:stop].mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["V1", "V2"])
def test_cls_and_cell_embeddings_equal_transformers(ckpts, kind):
    model = cellkit.load_model(ckpts[kind])
    v2 = kind == "V2"
    assert model.config.pooling == ("cls" if v2 else "mean")
    ids, pad = _batch(model.vocab, lengths=[12, 5, 9, 2], seed=3)
    specials = [model.vocab.special_id(r) for r in ("cls", "eos") if r in model.vocab.specials]
    boundary = torch.isin(ids, torch.tensor(specials, dtype=torch.long)) if specials else None
    with torch.no_grad():
        out = model(ids, padding_mask=pad, output_hidden_states=True)
        ref = _hf(BertForMaskedLM, ckpts[kind])(
            input_ids=ids, attention_mask=(~pad).long(), output_hidden_states=True
        )
    for emb_layer in (0, -1):
        index = gf.hidden_state_index(emb_layer, model.config.encoder.n_layers)
        ours, theirs = out.hidden_states[index], ref.hidden_states[N_LAYERS + emb_layer]
        cell_ours = pool_cells(ours, mode="mean", padding_mask=pad, exclude_mask=boundary)
        cell_ref = _geneformer_cell_mean(theirs, pad, has_cls=v2, has_eos=v2)
        _close(f"cell embedding ({kind}, emb_layer={emb_layer})", cell_ours, cell_ref)
        if v2:
            cls_ours = pool_cells(ours, mode="cls")
            _close(f"cls embedding (V2, emb_layer={emb_layer})", cls_ours, theirs[:, 0])
    last = ref.hidden_states[-1]
    expected = last[:, 0] if v2 else _geneformer_cell_mean(last, pad, has_cls=False, has_eos=False)
    _close(f"model.cell_embedding ({kind}, default pooling)", out.cell_embedding, expected)


def test_hidden_state_index():
    assert gf.hidden_state_index(0, 6) == 6
    assert gf.hidden_state_index(-1, 6) == 5
    assert gf.hidden_state_index(-6, 6) == 0
    for bad in (1, -7):
        with pytest.raises(CellkitError, match="out of range"):
            gf.hidden_state_index(bad, 6)
    with pytest.raises(CellkitError, match="integer"):
        gf.hidden_state_index(-1.0, 6)
    with pytest.raises(CellkitError, match="n_layers"):
        gf.hidden_state_index(0, 0)


# ---------------------------------------------------------------------------------------- 3. safety
class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: Path) -> list[_Payload]:
    return [
        _Payload(os.system, f"touch {marker}"),
        _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "exec"])
def test_malicious_token_dictionary_is_refused(ckpts, tmp_path, which):
    folder = _copy(ckpts, "V1", tmp_path)
    # the payload is live: unpickling it for real creates a file
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_payloads(armed)[which]))
    assert armed.exists()
    marker = tmp_path / "pwned"
    table = {"<pad>": 0, "<mask>": 1, "ENSG1": _payloads(marker)[which]}
    bad = folder / "token_dictionary_gc30M.pkl"
    bad.write_bytes(pickle.dumps(table, protocol=4))
    with pytest.raises(CheckpointError, match=r"token_dictionary_gc30M\.pkl") as info:
        cellkit.load_model(folder)
    assert "refused" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "exec"])
def test_malicious_pytorch_model_bin_is_refused(ckpts, tmp_path, which):
    folder = _copy(ckpts, "V1-bin", tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["bert.pooler.dense.weight"] = _payloads(marker)[which]  # hidden among real tensors
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin") as info:
        cellkit.load_model(folder)
    assert "refused" in str(info.value)
    assert "weights_only" in str(info.value)
    assert not marker.exists()
    # a plain pickle (not torch's zip format) is refused too
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_payloads(marker)[which], protocol=2))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        cellkit.load_model(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- 4. bad inputs
def _drop_dictionaries(folder: Path) -> None:
    for p in folder.glob("*.pkl"):
        p.unlink()


def _second_token_dictionary(folder: Path) -> None:
    _write_dictionaries(folder, "V2", suffix="_gc104M")


def _short_token_dictionary(folder: Path) -> None:
    for p in folder.glob("*.pkl"):
        p.unlink()
    _write_dictionaries(folder, "V1", n_genes=N_GENES - 3, suffix="_gc30M")


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _truncate_weights(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(cfg | changes))

    return edit


def _edit_weights(add=(), drop=()):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        for key in drop:
            del state[key]
        for key in add:
            state[key] = torch.zeros(3)
        save_file(state, folder / "model.safetensors")

    return edit


BAD_INPUTS = {
    "no token dictionary": (_drop_dictionaries, ["token_dictionary*.pkl", "token_dictionary="]),
    "two token dictionaries": (
        _second_token_dictionary,
        ["token_dictionary_gc104M.pkl", "token_dictionary_gc30M.pkl", "explicitly", "token_dictionary="],
    ),
    "vocab size != embedding rows": (
        _short_token_dictionary,
        ["token_dictionary_gc30M.pkl", "36", "39", "model.safetensors", "token_dictionary="],
    ),
    "missing weights file": (_drop_weights, ["model.safetensors", "pytorch_model.bin", "no weights"]),
    "truncated safetensors": (_truncate_weights, ["model.safetensors", "truncated or corrupt", "download"]),
    "unsupported hidden_act": (
        _edit_config(hidden_act="gelu_new"),
        ["config.json", "hidden_act", "gelu_new"],
    ),
    "relative positions": (
        _edit_config(position_embedding_type="relative_key"),
        ["config.json", "position_embedding_type", "relative_key"],
    ),
    "config vocab_size != embedding rows": (
        _edit_config(vocab_size=50),
        ["config.json", "vocab_size=50", "39"],
    ),
    "unknown state-dict key": (
        _edit_weights(add=["bert.encoder.layer.0.attention.self.distance_embedding.weight"]),
        ["bert.encoder.layer.0.attention.self.distance_embedding.weight", "model.safetensors"],
    ),
    "missing layer tensor": (
        _edit_weights(drop=["bert.encoder.layer.1.attention.self.key.bias"]),
        ["encoder.layer.1.attention.self.key.bias", "model.safetensors", "lacks"],
    ),
    "more layers than config": (_edit_config(num_hidden_layers=1), ["encoder.layer.1", "config"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(ckpts, tmp_path, case):
    breaker, fragments = BAD_INPUTS[case]
    folder = _copy(ckpts, "V1", tmp_path)
    breaker(folder)
    with pytest.raises(CellkitError) as info:
        cellkit.load_model(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_fine_tuned_classifier_is_not_supported_yet(ckpts, tmp_path):
    folder = tmp_path / "classifier"
    _random_model(BertForSequenceClassification, _bert_config("V1", num_labels=3), 3).save_pretrained(folder)
    _write_dictionaries(folder, "V1")
    with pytest.raises(CheckpointError, match="classifier") as info:
        cellkit.load_model(folder)
    assert "not supported yet" in str(info.value)
    assert "classifier.weight" in str(info.value)


def test_token_dictionary_with_a_gap_names_the_file(ckpts, tmp_path):
    folder = _copy(ckpts, "V1", tmp_path)
    file = folder / "token_dictionary_gc30M.pkl"
    table = pickle.loads(file.read_bytes())
    table["ENSG00000001000"] = np.int16(500)
    file.write_bytes(pickle.dumps(table))
    with pytest.raises(VocabError, match=r"token_dictionary_gc30M\.pkl") as info:
        cellkit.load_model(folder)
    assert "contiguous" in str(info.value)


def test_unknown_option_is_an_error(ckpts):
    with pytest.raises(CellkitError, match="token_dictionary"):
        cellkit.load_model(ckpts["V1"], token_dict="x.pkl")


# ---------------------------------------------------------------------------------------- reading details
def test_config_vocab_resources_and_report(ckpts):
    model = cellkit.load_model(ckpts["V2"])
    c = model.config
    assert c.family == "geneformer"
    assert c.pooling == "cls"
    assert c.input == InputSpec(version="V2", max_length=4096, special_token=True)
    assert c.heads == {"mlm": {"activation": "gelu", "tied": True, "eps": 1e-12}}
    enc = c.encoder
    assert (enc.d_model, enc.n_heads, enc.n_layers, enc.d_ff) == (HIDDEN, 3, N_LAYERS, 40)
    assert (enc.max_position_embeddings, enc.type_vocab_size, enc.pad_token_id) == (4096, 2, 0)
    assert (enc.embedding_norm, enc.embedding_dropout, enc.gene_norm) == (True, True, False)
    assert (enc.value_encoder, enc.norm_scheme, enc.activation) == ("none", "post", "gelu")
    assert (enc.dropout, enc.attention_dropout) == (0.1, 0.1)
    assert model.vocab.specials == {"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"}
    assert c.metadata["hf_config"]["model_type"] == "bert"
    assert set(model.resources) == {"gene_median", "gene_name_id", "ensembl_mapping"}
    json.dumps(model.resources)  # plain JSON-able (numpy scalars converted)
    assert all(type(v) is float for v in model.resources["gene_median"].values())
    assert model.resources["gene_name_id"]["GENE0"] == _gene_ids(1)[0]
    r = model.load_report
    assert r.format == "geneformer"
    assert r.architecture["geneformer_version"] == "V2"
    assert len(set(r.mapped.values())) == len(model.state_dict()) - len(model.tied_keys())

    v1 = cellkit.load_model(ckpts["V1"])
    assert v1.config.input == InputSpec(version="V1", max_length=2048, special_token=False)
    assert v1.config.pooling == "mean"
    assert v1.config.encoder.activation == "relu"
    assert v1.vocab.specials == {"pad": "<pad>", "mask": "<mask>"}
    assert v1.config.heads["mlm"] == {"activation": "relu", "tied": True, "eps": 1e-12}
    assert all(type(i) is int for i in v1.vocab.to_dict().values())


def test_dictionaries_passed_explicitly(ckpts, tmp_path):
    folder = _copy(ckpts, "V2", tmp_path)
    elsewhere = tmp_path / "dicts"
    elsewhere.mkdir()
    for p in folder.glob("*.pkl"):
        shutil.move(p, elsewhere / p.name)
    model = cellkit.load_model(
        folder,
        token_dictionary=elsewhere / "token_dictionary_gc104M.pkl",
        gene_median_dictionary=elsewhere / "gene_median_dictionary_gc104M.pkl",
    )
    assert len(model.vocab) == N_GENES + 4
    assert set(model.resources) == {"gene_median"}
    assert any("gene_name_id_dictionary" in n for n in model.load_report.notes)


def test_missing_token_dictionary_points_at_the_geneformer_folder(ckpts, tmp_path):
    folder = _copy(ckpts, "V2", tmp_path)
    package = tmp_path / "geneformer"
    package.mkdir()
    for p in folder.glob("*.pkl"):
        shutil.move(p, package / p.name)
    with pytest.raises(CheckpointError, match="Candidates nearby") as info:
        cellkit.load_model(folder)
    assert str(package / "token_dictionary_gc104M.pkl") in str(info.value)


def test_untied_decoder_and_bert_model_without_head(ckpts, tmp_path):
    untied = tmp_path / "untied"
    hf = _random_model(BertForMaskedLM, _bert_config("V2", tie_word_embeddings=False), 4)
    assert not torch.equal(hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight)
    hf.save_pretrained(untied)
    _write_dictionaries(untied, "V2")
    model = cellkit.load_model(untied)
    assert model.config.heads["mlm"]["tied"] is False
    assert model.load_report.mapped["cls.predictions.decoder.weight"] == "heads.mlm.decoder.weight"
    # transformers 5 unties the decoder bias too when tie_word_embeddings=false; the decoder's is applied
    assert model.load_report.mapped["cls.predictions.decoder.bias"] == "heads.mlm.bias"
    ids, pad = _batch(model.vocab, lengths=[6, 3])
    with torch.no_grad():
        ours = model(ids, padding_mask=pad).token_logits
        theirs = hf(input_ids=ids, attention_mask=(~pad).long()).logits
    _close("MLM logits, untied decoder", ours[~pad], theirs[~pad])

    base = tmp_path / "base"
    _random_model(BertModel, _bert_config("V1"), 5).save_pretrained(base)
    _write_dictionaries(base, "V1")
    model = cellkit.load_model(base)
    assert model.config.heads == {}
    assert "pooler.dense.weight" in model.load_report.ignored


def test_detect(ckpts, tmp_path):
    assert gf.detect(ckpts["V1"])
    assert gf.detect(ckpts["V1-bin"])
    assert detect_format(ckpts["V2"]) == "geneformer"
    assert not gf.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert not gf.detect(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not gf.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "format": "cellkit"}))
    assert not gf.detect(tmp_path)


# ---------------------------------------------------------------------------------------- 5. inspect
def test_inspect_checkpoint_reports_format_size_and_ignored_keys(ckpts):
    info = cellkit.inspect_checkpoint(ckpts["V1-bin"])
    assert info["format"] == "geneformer"
    assert info["family"] == "geneformer"
    assert info["vocab_size"] == N_GENES + 2
    hf = _hf(BertForMaskedLM, ckpts["V1"])
    assert info["n_parameters"] == hf.num_parameters()
    ignored = info["ignored"]
    assert set(ignored) == {
        "bert.embeddings.position_ids",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "cls.seq_relationship.weight",
        "cls.seq_relationship.bias",
        "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias",
    }
    assert "pooler" in ignored["bert.pooler.dense.weight"]
    assert "next-sentence" in ignored["cls.seq_relationship.weight"]
    assert "tied" in ignored["cls.predictions.decoder.weight"]
    assert "duplicate" in ignored["cls.predictions.decoder.bias"]
    assert "buffer" in ignored["bert.embeddings.position_ids"]
    assert info["heads"] == ["mlm"]
    assert info["architecture"]["weights_file"] == "pytorch_model.bin"


# ---------------------------------------------------------------------------------------- 6. round trip
@pytest.mark.parametrize("kind", ["V1", "V2"])
def test_save_and_reload_in_cellkit_format(ckpts, tmp_path, kind):
    model = cellkit.load_model(ckpts[kind])
    saved = model.save(tmp_path / "saved")
    again = cellkit.load_model(saved)
    assert again.load_report.format == "cellkit"
    assert again.config.to_dict() == model.config.to_dict()
    assert again.vocab == model.vocab
    assert again.resources["gene_median"] == model.resources["gene_median"]
    ids, pad = _batch(model.vocab, lengths=[7, 4, 10])
    with torch.no_grad():
        a = model(ids, padding_mask=pad, output_hidden_states=True)
        b = again(ids, padding_mask=pad, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(x, y)
    assert torch.equal(a.token_logits, b.token_logits)
    assert torch.equal(a.cell_embedding, b.cell_embedding)
