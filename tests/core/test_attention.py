from __future__ import annotations

import math

import pytest
import torch

from cellkit import ConfigError
from cellkit.core import CellEncoder, MultiheadSelfAttention
from tests.conftest import random_batch


def test_explicit_probabilities_equal_hand_softmax():
    attn = MultiheadSelfAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])
    out, probs = attn(x, mask, backend="explicit", need_weights=True)
    assert probs.shape == (2, 3, 5, 5)

    # by hand from the packed projection: rows [q; k; v], head h owns rows h*dh:(h+1)*dh of each block
    w, b = attn.qkv.weight, attn.qkv.bias
    q = x @ w[:12].T + b[:12]
    k = x @ w[12:24].T + b[12:24]
    v = x @ w[24:].T + b[24:]
    for cell in range(2):
        for h in range(3):
            sl = slice(4 * h, 4 * h + 4)
            scores = q[cell, :, sl] @ k[cell, :, sl].T / math.sqrt(4)
            scores[:, mask[cell]] = float("-inf")
            expected = torch.softmax(scores, dim=-1)
            # probabilities ≤ 1, two fp32 softmax kernels: measured ≤ 6e-8 on an AVX-512 Xeon (16x margin)
            torch.testing.assert_close(probs[cell, h], expected, atol=1e-6, rtol=0)
    assert torch.all(probs[0, :, :, 3:] == 0), "masked keys must get exactly zero probability"
    # rows of ≤ 5 fp32 probabilities sum to 1 within a few ulp: measured 1.2e-7 (8x margin)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5), atol=1e-6, rtol=0)
    # the output is probs @ v then out_proj
    ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v.view(2, 5, 3, 4)).reshape(2, 5, 12)
    # O(1) outputs, einsum vs the module's matmuls: measured 0 on an AVX-512 Xeon (fp32 order may differ)
    torch.testing.assert_close(out, attn.out_proj(ctx), atol=1e-6, rtol=0)


def test_sdpa_and_explicit_agree(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [9, 4, 1, 7])
    with torch.no_grad():
        a = enc(**batch, attn_backend="sdpa", output_hidden_states=True)
        b = enc(**batch, attn_backend="explicit", output_hidden_states=True)
    keep = ~batch["padding_mask"]
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert (ha - hb)[keep].abs().max() <= 1e-6


def test_attentions_returned_per_layer(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [6, 3])
    out = enc(**batch, output_attentions=True)
    assert len(out.attentions) == tiny_config.n_layers
    for p in out.attentions:
        assert p.shape == (2, tiny_config.n_heads, 6, 6)
        assert torch.all(p[1, :, :, 3:] == 0)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_unknown_backend_is_clear(tiny_config):
    enc = CellEncoder(tiny_config)
    batch = random_batch(tiny_config, [3])
    with pytest.raises(ConfigError, match="attn_backend"):
        enc(**batch, attn_backend="magic")
