from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cellkit
from cellkit import CellModel, CellModelConfig, CheckpointError, ConfigError, EncoderConfig, load_model
from cellkit.data.synthetic import synthetic_batch, synthetic_vocab
from cellkit.presets import scgpt_config


@pytest.fixture
def model() -> CellModel:
    vocab = synthetic_vocab(40)
    cfg = scgpt_config(vocab, d_model=16, n_heads=2, n_layers=2, d_ff=24)
    m = CellModel(cfg, vocab)
    m.add_head("classifier", n_classes=3, labels=["B", "T", "NK"])
    return m.eval()


def _outputs(m, batch):
    with torch.no_grad():
        return m(**batch)


def test_save_load_bit_for_bit(model, tmp_path):
    batch = synthetic_batch(model.vocab, [12, 5, 1])
    before = _outputs(model, batch)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    loaded = load_model(tmp_path / "m")
    after = _outputs(loaded, batch)
    for name in ("last_hidden_state", "cell_embedding", "expression", "mvc", "class_logits"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert loaded.config.heads["classifier"]["labels"] == ["B", "T", "NK"]
    assert loaded.vocab == model.vocab
    assert not loaded.training


def test_tied_mlm_head_saved_once(tmp_path):
    vocab = synthetic_vocab(30, specials=("<pad>", "<mask>"))
    enc = EncoderConfig(
        vocab_size=len(vocab),
        d_model=12,
        n_heads=2,
        n_layers=1,
        d_ff=20,
        gene_norm=False,
        value_encoder="none",
        max_position_embeddings=32,
        embedding_norm=True,
        activation="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=vocab.pad_id,
    )
    m = CellModel(
        CellModelConfig(enc, heads={"mlm": {}}, pooling="mean", family="geneformer", specials=vocab.specials),
        vocab,
    )
    m.save(tmp_path / "g")
    assert "heads.mlm.decoder.weight" not in load_file(tmp_path / "g" / "model.safetensors")
    loaded = load_model(tmp_path / "g")
    assert loaded.heads["mlm"].decoder.weight is loaded.encoder.embeddings.gene.weight
    ids = torch.randint(0, 30, (2, 7))
    # exact: the same weights through the same kernels in one process are bit-identical on any CPU
    torch.testing.assert_close(m.eval()(ids).token_logits, loaded(ids).token_logits, rtol=0, atol=0)


def _tamper(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_tensor_is_named(model, tmp_path):
    model.save(tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.pop("heads.mvc.W.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: heads\.mvc\.W\.weight"):
        load_model(tmp_path / "m")


def test_extra_tensor_is_named(model, tmp_path):
    model.save(tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.__setitem__("flag_encoder.weight", torch.zeros(2, 16)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: flag_encoder\.weight"):
        load_model(tmp_path / "m")


def test_misshaped_tensor_is_named(model, tmp_path):
    model.save(tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.__setitem__("heads.classifier.out.bias", torch.zeros(4)))
    with pytest.raises(
        CheckpointError, match=r"heads\.classifier\.out\.bias is \(4,\) but the model needs \(3,\)"
    ):
        load_model(tmp_path / "m")


def test_corrupt_and_missing_files(model, tmp_path):
    model.save(tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing vocab\.json"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "junk")


def test_newer_format_version_refused(model, tmp_path):
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="upgrade cellkit"):
        load_model(tmp_path / "m")


def test_failed_save_keeps_previous_files(model, tmp_path, monkeypatch):
    model.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]


def test_config_and_head_errors(model):
    with pytest.raises(ConfigError, match="already has a 'classifier'"):
        model.add_head("classifier", n_classes=2)
    with pytest.raises(ConfigError, match="Unknown head"):
        model.add_head("decoder9")
    with pytest.raises(ConfigError, match="positive integer n_batches"):
        model.add_head("adversarial", n_batches=0)
    with pytest.raises(ConfigError, match="no head"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), heads=["mlm"])
    with pytest.raises(ConfigError, match="must match"):
        CellModel(model.config, synthetic_vocab(5))


def test_finetuned_scgpt_like_model_round_trip(tmp_path):
    """Batch labels, DSBN, adversarial head and zero-probability heads survive save/load."""
    vocab = synthetic_vocab(25)
    cfg = scgpt_config(vocab, d_model=8, n_heads=2, n_layers=1, d_ff=8)
    cfg.encoder.n_batch_labels = 3
    cfg.heads = {
        "expression": {"explicit_zero_prob": True, "use_batch_labels": True},
        "mvc": {"explicit_zero_prob": True, "use_batch_labels": True},
    }
    m = CellModel(CellModelConfig.from_dict(cfg.to_dict()), vocab)
    m.add_head("dsbn", n_domains=3)
    m.add_head("adversarial", n_batches=3)
    m.eval()
    batch = synthetic_batch(vocab, [6, 4]) | {"batch_labels": torch.tensor([1, 1])}
    out = m(**batch)
    assert out.expression_zero_probs.shape == (2, 6)
    assert out.batch_logits.shape == (2, 3)
    m.save(tmp_path / "ft")
    again = load_model(tmp_path / "ft")(**batch)
    assert torch.equal(out.mvc_zero_probs, again.mvc_zero_probs)
    with pytest.raises(ConfigError, match="batch_labels"):
        m(**synthetic_batch(vocab, [3]))


def test_public_api_is_lazy_and_complete():
    for name in cellkit.__all__:
        assert getattr(cellkit, name) is not None
    assert issubclass(cellkit.CheckpointError, cellkit.CellkitError)
