from __future__ import annotations

import dataclasses

import pytest
import torch

from cellkit import ConfigError
from cellkit.core import CellEncoder, EncoderConfig
from tests.conftest import random_batch

VARIANTS = {
    "scgpt": {},
    "pre_gelu": {"norm_scheme": "pre", "activation": "gelu", "final_norm": True},
    "bert": {
        "gene_norm": False,
        "value_encoder": "none",
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
        "embedding_norm": True,
        "embedding_dropout": True,
        "layer_norm_eps": 1e-12,
        "activation": "gelu",
    },
    # PerturbGene's GeneBert: bin tokens + gene identity as token type, no positions
    "perturbgene": {
        "gene_norm": False,
        "value_encoder": "none",
        "type_vocab_size": 60,
        "embedding_norm": True,
        "embedding_dropout": True,
        "layer_norm_eps": 1e-12,
        "activation": "gelu",
    },
    "category": {"value_encoder": "category", "n_value_bins": 53, "value_pad_id": 52},
    "scaling": {"value_encoder": "scaling"},
}


def _variant(base: EncoderConfig, name: str) -> EncoderConfig:
    return dataclasses.replace(base, **VARIANTS[name])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["sdpa", "explicit", "varlen", "native"])
def test_padding_does_not_change_real_tokens(tiny_config, variant, backend):
    cfg = _variant(tiny_config, variant)
    enc = CellEncoder(cfg).eval()
    batch = random_batch(cfg, [5, 3])
    wider = {k: torch.cat([v, v[:, -1:].expand(-1, 6)], dim=1) for k, v in batch.items()}
    wider["padding_mask"][:, 5:] = True
    with torch.no_grad():
        a = enc(**batch, attn_backend=backend).last_hidden_state
        b = enc(**wider, attn_backend=backend).last_hidden_state
    keep = ~batch["padding_mask"]
    assert (a - b[:, :5])[keep].abs().max() <= 1e-6


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cell_output_independent_of_batch(tiny_config, variant):
    cfg = _variant(tiny_config, variant)
    enc = CellEncoder(cfg).eval()
    batch = random_batch(cfg, [7, 2, 5])
    with torch.no_grad():
        together = enc(**batch).last_hidden_state
        for i, n in enumerate([7, 2, 5]):
            alone = enc(**{k: v[i : i + 1, :n] for k, v in batch.items()}).last_hidden_state
            assert (together[i, :n] - alone[0]).abs().max() <= 1e-6


def test_hidden_states_layout(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [4, 4])
    out = enc(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == tiny_config.n_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    emb, _ = enc.embed(batch["gene_ids"], batch["values"])
    assert torch.equal(out.hidden_states[0], emb)
    assert out.gene_embeddings.shape == (2, 4, tiny_config.d_model)


def test_continuous_value_clamp_is_top_only(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    vals = torch.tensor([[512.0, 600.0, -1.0, -2.0]])
    out = enc.embeddings.values(vals)
    torch.testing.assert_close(out[0, 0], out[0, 1])  # 600 clamps to 512
    assert not torch.allclose(out[0, 2], out[0, 3])  # sentinels below are untouched


def test_pad_row_gets_no_gradient(tiny_config):
    enc = CellEncoder(tiny_config)
    batch = random_batch(tiny_config, [5, 2])
    enc(**batch).last_hidden_state.sum().backward()
    assert torch.all(enc.embeddings.gene.weight.grad[tiny_config.pad_token_id] == 0)


def test_config_json_round_trip(tiny_config):
    cfg = _variant(tiny_config, "bert")
    assert EncoderConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 25}, "divisible"),
        ({"activation": "swish"}, "activation"),
        ({"value_encoder": "category"}, "n_value_bins"),
        ({"pad_token_id": 99}, "outside the vocabulary"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_config_validation(tiny_config, change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(tiny_config, **change)


def test_unknown_config_key_rejected(tiny_config):
    d = tiny_config.to_dict() | {"n_experts": 4}
    with pytest.raises(ConfigError, match="n_experts"):
        EncoderConfig.from_dict(d)


def test_empty_cell_and_long_sequence_errors(tiny_config):
    enc = CellEncoder(tiny_config)
    batch = random_batch(tiny_config, [3, 3])
    batch["padding_mask"][1] = True
    with pytest.raises(ConfigError, match="no tokens"):
        enc(**batch)
    bert = CellEncoder(_variant(tiny_config, "bert"))
    long = random_batch(tiny_config, [20])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        bert(long["gene_ids"], padding_mask=long["padding_mask"])
    with pytest.raises(ConfigError, match="pass `values`"):
        enc(long["gene_ids"])


def test_layers_argument_stops_early(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [4])
    x, _ = enc.embed(batch["gene_ids"], batch["values"])
    full = enc(**batch, output_hidden_states=True)
    first, _, _ = enc.encode(x, batch["padding_mask"], layers=1)
    assert torch.equal(first, full.hidden_states[1])
    with pytest.raises(ConfigError, match="out of range"):
        enc.encode(x, layers=5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_backend_matches_sdpa(tiny_config, variant):
    cfg = _variant(tiny_config, variant)
    enc = CellEncoder(cfg).eval()
    batch = random_batch(cfg, [7, 3, 5])
    with torch.no_grad():
        a = enc(**batch, output_hidden_states=True)
        b = enc(**batch, attn_backend="native", output_hidden_states=True)
    keep = ~batch["padding_mask"]
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert (ha - hb)[keep].abs().max() <= 1e-6


def test_native_backend_is_inference_only(tiny_config):
    enc = CellEncoder(tiny_config).train()
    with pytest.raises(ConfigError, match="inference path"):
        enc(**random_batch(tiny_config, [3]), attn_backend="native")
