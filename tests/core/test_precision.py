"""Inference precision: resolving ``precision=``, fp32 parity, bf16 accuracy, exact weight restore."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from cellkit import CellModel, ConfigError, GeneVocab
from cellkit.core import precision as P
from cellkit.core.precision import (
    PRECISIONS,
    cpu_bf16_mode,
    cpu_bf16_units,
    precision_context,
    resolve_precision,
)
from cellkit.data.synthetic import synthetic_batch
from cellkit.presets import scgpt_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(P, "_warned", set())
    yield
    cpu_bf16_units.cache_clear()


def tiny_model(seed: int = 0) -> CellModel:
    genes = [f"G{i}" for i in range(40)]
    vocab = GeneVocab([*genes, "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    torch.manual_seed(seed)
    cfg = scgpt_config(vocab, d_model=32, n_heads=4, n_layers=2, d_ff=48, dropout=0.0, n_bins=11)
    return CellModel(cfg, vocab).eval()


def tiny_batch(model: CellModel) -> dict[str, torch.Tensor]:
    return synthetic_batch(model.vocab, [30, 17, 24, 9], n_bins=11, seed=3)


def embed(model: CellModel, batch: dict[str, torch.Tensor], backend: str = "sdpa") -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch, heads=(), attn_backend=backend).cell_embedding.float()


def state_of(model: nn.Module) -> dict[str, tuple[torch.dtype, torch.Tensor, int]]:
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = (t.dtype, t.detach().clone(), t.data_ptr())
    return out


def assert_same_state(model: nn.Module, before: dict[str, tuple[torch.dtype, torch.Tensor, int]]) -> None:
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert set(after) == set(before)
    for name, (dtype, values, ptr) in before.items():
        t = after[name]
        assert t.dtype == dtype, name
        assert torch.equal(t.detach(), values), name  # bit for bit
        assert t.data_ptr() == ptr, name  # the very tensor it was, not a copy


# ----------------------------------------------------------------------------- resolve
def test_resolve_rejects_unknown_precision_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="precision must be one of") as err:
        resolve_precision("bfloat16", CPU)
    for p in PRECISIONS:
        assert p in str(err.value)
    assert err.value.param == "precision"


def test_resolve_fp16_only_on_cuda():
    with pytest.raises(ConfigError, match="only on CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="only on CUDA"):
        precision_context(tiny_model(), CPU, "fp16")


def test_resolve_fp32_is_fp32():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_bf16_without_cpu_units_stays_fp32_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)
    with (
        caplog.at_level(logging.WARNING, logger="cellkit.core.precision"),
        pytest.warns(RuntimeWarning, match=r"no bf16 units \(AMX / AVX512-BF16\).*staying in fp32"),
    ):
        assert resolve_precision("bf16", CPU) == "fp32"
    assert any("no bf16 units" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        assert resolve_precision("bf16", CPU) == "fp32"


def test_bf16_with_cpu_units_is_bf16(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "AMX")
    assert resolve_precision("bf16", CPU) == "bf16"


def test_cpu_bf16_units_reads_torch_then_cpuinfo(monkeypatch):
    monkeypatch.setattr(P, "_torch_cpu_caps", lambda: {})
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16"})
    cpu_bf16_units.cache_clear()
    assert cpu_bf16_units() == "AVX512_BF16"
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx512f", "avx512_vnni"})
    cpu_bf16_units.cache_clear()
    assert cpu_bf16_units() is None
    # torch's report wins over the flags; AMX also needs the kernel's permission (_init_amx)
    monkeypatch.setattr(P, "_torch_cpu_caps", lambda: {"amx_bf16": True, "avx512_bf16": True})
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: True, raising=False)
    cpu_bf16_units.cache_clear()
    assert cpu_bf16_units() == "AMX"
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False, raising=False)
    cpu_bf16_units.cache_clear()
    assert cpu_bf16_units() == "AVX512_BF16"


def test_cpu_bf16_units_on_this_machine_agrees_with_torch():
    cpu_bf16_units.cache_clear()
    units = cpu_bf16_units()
    assert units in (None, "AMX", "AVX512_BF16", "ARM_BF16")
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        assert units is not None
    elif caps:
        assert units in (None, "ARM_BF16")


# ----------------------------------------------------------------------------- fp32 parity
def test_fp32_context_is_bit_identical():
    model = tiny_model()
    batch = tiny_batch(model)
    ref = embed(model, batch)
    with precision_context(model, CPU, "fp32") as how:
        got = embed(model, batch)
    assert how == "fp32"
    assert torch.equal(got, ref)
    # an outer autocast does not leak into fp32
    with torch.autocast("cpu", dtype=torch.bfloat16), precision_context(model, CPU, "fp32"):
        got = embed(model, batch)
    assert torch.equal(got, ref)


def test_context_checks_its_arguments():
    with pytest.raises(ConfigError, match="precision must be one of"):
        precision_context(tiny_model(), CPU, "half")
    with pytest.raises(ConfigError, match="cpu_mode must be one of"):
        precision_context(tiny_model(), CPU, "bf16", cpu_mode="fast")


# ----------------------------------------------------------------------------- bf16
# bf16 is exact arithmetic on bf16 numbers on any CPU (emulated without bf16 units: slower, same
# results), so the accuracy and restore tests run everywhere; only the speed needs the units.
@pytest.mark.parametrize("mode", ["autocast", "cast", "auto"])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_bf16_context_accuracy_and_exact_restore(mode, backend):
    model = tiny_model()
    batch = tiny_batch(model)
    ref = embed(model, batch, backend)
    before = state_of(model)
    with precision_context(model, CPU, "bf16", cpu_mode=mode) as how:
        assert how in ("autocast", "cast") and (mode == "auto" or how == mode)
        if how == "cast":
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        got = embed(model, batch, backend)
    assert_same_state(model, before)
    assert not torch.equal(got, ref)  # it did run in bf16
    cos = torch.nn.functional.cosine_similarity(got, ref)
    assert cos.min() >= 0.999, cos
    assert torch.equal(embed(model, batch, backend), ref)  # fp32 again afterwards


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_bf16_context_restores_weights_when_the_body_raises(mode):
    model = tiny_model()
    before = state_of(model)

    def body():
        with precision_context(model, CPU, "bf16", cpu_mode=mode):
            embed(model, tiny_batch(model))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        body()
    assert_same_state(model, before)
    assert not model._forward_pre_hooks  # the input-casting hook is gone


def test_cast_restores_buffers_and_ties():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.BatchNorm1d(6), nn.Linear(6, 6)).eval()
    model[2].weight = lin.weight  # tied
    with torch.no_grad():
        model[1].running_mean.uniform_()
    before = state_of(model)
    x = torch.randn(5, 6)
    ref = model(x)
    with torch.inference_mode(), precision_context(model, CPU, "bf16", cpu_mode="cast"):
        assert model[1].running_mean.dtype == torch.bfloat16
        assert model[2].weight is lin.weight  # still tied
        out = model(x)  # fp32 input cast on entry
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(out.float(), ref, dim=1).min() >= 0.99
    assert_same_state(model, before)
    assert model[2].weight is lin.weight


def test_cpu_bf16_mode_is_measured_once_and_keeps_rng(monkeypatch):
    model = tiny_model()
    P._measure_cpu_modes.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mode = cpu_bf16_mode(model)
    assert torch.equal(torch.rand(3), expected)  # the probe does not disturb the global RNG
    assert mode in ("autocast", "cast")
    _, info = P._measure_cpu_modes(32, 4, 48, torch.get_num_threads())
    assert info["autocast_cosine"] >= P.PROBE_MIN_COSINE
    assert P._measure_cpu_modes.cache_info().hits >= 1
    # cast is picked only when clearly faster and accurate
    fake = {"fp32_s": 1.0, "autocast_s": 1.0, "cast_s": 0.95, "autocast_cosine": 1.0, "cast_cosine": 1.0}
    assert P._pick_cpu_mode(fake) == "autocast"
    assert P._pick_cpu_mode({**fake, "cast_s": 0.5}) == "cast"
    assert P._pick_cpu_mode({**fake, "cast_s": 0.5, "cast_cosine": 0.99}) == "autocast"
