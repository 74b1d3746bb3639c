from __future__ import annotations

import pytest
import torch

from cellkit import ConfigError, MissingDependencyError
from cellkit.core import CellEncoder, pack, unpack, varlen_attention
from cellkit.core.varlen import varlen_kernel_available
from tests.conftest import random_batch


def test_pack_unpack_round_trip():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    packed, p = pack(x, mask)
    assert packed.shape == (6, 3)
    assert p.cu_seqlens.tolist() == [0, 2, 6]
    assert p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 4
    torch.testing.assert_close(packed[:2], x[0, :2])
    torch.testing.assert_close(packed[2:], x[1])
    back = unpack(packed, p)
    torch.testing.assert_close(back[~mask], x[~mask])
    assert torch.all(back[mask] == 0)


def test_pack_without_mask():
    x = torch.randn(3, 5, 2)
    packed, p = pack(x, None)
    assert p.cu_seqlens.tolist() == [0, 5, 10, 15]
    torch.testing.assert_close(unpack(packed, p), x)


def test_reference_varlen_attention_matches_padded_sdpa():
    torch.manual_seed(1)
    lengths = [3, 6, 1]
    q, k, v = (torch.randn(3, 2, 6, 4) for _ in range(3))  # (B, H, L, D)
    mask = torch.arange(6)[None, :] >= torch.tensor(lengths)[:, None]
    padded = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    packed = [pack(t.transpose(1, 2), mask)[0] for t in (q, k, v)]  # (T, H, D)
    _, p = pack(q.transpose(1, 2), mask)
    out = varlen_attention(*packed, p.cu_seqlens, p.max_seqlen, impl="reference")
    # O(1) attention outputs (max ≈ 2.3), packed vs padded fp32 kernels: measured 1.2e-7 (8x margin)
    torch.testing.assert_close(
        unpack(out, p), padded.transpose(1, 2) * (~mask)[..., None, None], atol=1e-6, rtol=0
    )


def test_varlen_encoder_path_matches_padded(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [8, 2, 5])
    with torch.no_grad():
        a = enc(**batch, output_hidden_states=True)
        b = enc(**batch, attn_backend="varlen", output_hidden_states=True)
    keep = ~batch["padding_mask"]
    for ha, hb in zip(a.hidden_states[1:], b.hidden_states[1:]):
        assert (ha - hb)[keep].abs().max() <= 1e-6


def test_varlen_gradients_match_padded(tiny_config):
    enc = CellEncoder(tiny_config).train()
    enc.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    enc.layers[0].self_attn.dropout = 0.0
    enc.layers[1].self_attn.dropout = 0.0
    batch = random_batch(tiny_config, [6, 3])
    keep = ~batch["padding_mask"]
    grads = []
    for backend in ("sdpa", "varlen"):
        enc.zero_grad()
        enc(**batch, attn_backend=backend).last_hidden_state[keep].pow(2).sum().backward()
        grads.append(enc.layers[0].self_attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    varlen_kernel_available(), reason="checks the error raised when flash-attn/CUDA are absent"
)
def test_flash_backend_without_flash_attn_is_a_clear_error(tiny_config):
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [4, 2])
    with pytest.raises((MissingDependencyError, ConfigError), match=r"flash-attn|CUDA"):
        enc(**batch, attn_backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths_match_cpu(tiny_config):
    """SDPA (flash/efficient kernels), the packed varlen path and bf16 autocast on a real GPU."""
    enc = CellEncoder(tiny_config).eval()
    batch = random_batch(tiny_config, [37, 5, 20])
    keep = ~batch["padding_mask"]
    with torch.no_grad():
        ref = enc(**batch).last_hidden_state
        gpu = enc.cuda()
        cuda_batch = {k: v.cuda() for k, v in batch.items()}
        sdpa = gpu(**cuda_batch).last_hidden_state.cpu()
        assert (sdpa - ref)[keep].abs().max() < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for backend in ["sdpa", "varlen"] + (["flash"] if varlen_kernel_available() else []):
                out = gpu(**cuda_batch, attn_backend=backend).last_hidden_state.float().cpu()
                assert (out - ref)[keep].abs().max() < 0.1, backend
