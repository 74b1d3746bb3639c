"""``precision=`` of the attention functions: fp32 unchanged, bf16 close to it, weights restored, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellkit import ConfigError
from cellkit.analysis.attention import attention_difference, attention_maps, gene_attention
from cellkit.core import precision as P

from ..test_finetune import make_adata, make_model


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setattr(P, "_warned", set())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weights(model):
    return {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def assert_weights(model, before):
    for k, v in model.state_dict(keep_vars=True).items():
        assert v.dtype == before[k][0], k
        assert torch.equal(v.detach(), before[k][1]), k


CELLS = [0, 45, 100]


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_attention_maps_bf16_close_to_fp32_and_weights_restored(monkeypatch, mode):
    # bf16 is emulated exactly on a CPU without bf16 units: force it to run here
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(P, "cpu_bf16_mode", lambda model: mode)
    adata, model = make_adata(), make_model()
    before = weights(model)
    ref = attention_maps(adata, model, cells=CELLS, device="cpu", progress=False)
    got = attention_maps(adata, model, cells=CELLS, device="cpu", precision="bf16", progress=False)
    assert_weights(model, before)
    for r, g in zip(ref, got, strict=True):
        assert g.probs.dtype == np.float32 and g.probs.shape == r.probs.shape
        assert not np.array_equal(g.probs, r.probs)  # it ran in bf16
        assert np.abs(g.probs - r.probs).max() <= 2e-2
        np.testing.assert_allclose(g.probs.sum(-1), 1.0, atol=2e-2)


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_gene_attention_bf16_close_to_fp32(monkeypatch, mode):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(P, "cpu_bf16_mode", lambda model: mode)
    adata, model = make_adata(), make_model()
    before = weights(model)
    kw = {"groupby": "cell_type", "groups": "type0", "device": "cpu", "progress": False}
    for statistic in ("probability", "grn"):
        ref = gene_attention(adata, model, statistic=statistic, **kw).to_numpy()
        got = gene_attention(adata, model, statistic=statistic, precision="bf16", **kw).to_numpy()
        assert got.shape == ref.shape
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        diff = np.abs(got - ref)[~np.isnan(ref)]
        assert diff.max() > 0  # it ran in bf16
        if statistic == "probability":
            assert diff.max() <= 2e-3, diff.max()
        else:  # ranks: bf16 swaps near-equal scores, so single entries move by a few ranks / M
            assert diff.mean() <= 0.01, diff.mean()
            assert np.corrcoef(got[~np.isnan(ref)], ref[~np.isnan(ref)])[0, 1] >= 0.995
    assert_weights(model, before)
    out = attention_difference(
        adata, model, groupby="cell_type", condition="type0", control="type1", k=5, device="cpu",
        precision="bf16", progress=False,
    )  # fmt: skip
    assert len(out) == 5


def test_bf16_without_units_is_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)
    adata, model = make_adata(), make_model()
    ref = attention_maps(adata, model, cells=CELLS, device="cpu", progress=False)
    with pytest.warns(RuntimeWarning, match="no bf16 units"):
        got = attention_maps(adata, model, cells=CELLS, device="cpu", precision="bf16", progress=False)
    for r, g in zip(ref, got, strict=True):
        assert np.array_equal(g.probs, r.probs)


@pytest.mark.parametrize("fn", [attention_maps, gene_attention])
def test_bad_precision_is_refused_before_work(fn):
    adata, model = make_adata(), make_model()
    with pytest.raises(ConfigError, match="precision must be one of"):
        fn(adata, model, device="cpu", precision="bfloat16", progress=False)
    with pytest.raises(ConfigError, match="only on CUDA"):
        fn(adata, model, device="cpu", precision="fp16", progress=False)
