"""Inference precision: fp32 (the default, exact), bf16 where the hardware has it, fp16 on CUDA.

:func:`resolve_precision` turns the user's ``precision=`` into what will actually run on a device
(``"bf16"`` on a CPU without bf16 units falls back to ``"fp32"`` with one warning: emulated bf16
is 2–3× *slower* than fp32 there); :func:`precision_context` runs a model in that precision::

    prec = resolve_precision(precision, dev)
    with torch.inference_mode(), precision_context(model, dev, prec):
        out = model(**batch)
    emb = out.cell_embedding.float()

How bf16 runs
-------------
* CUDA (and other accelerators with autocast): ``torch.autocast(device, dtype=torch.bfloat16)``
  (``float16`` for ``"fp16"``, CUDA only).
* CPU (AMX, AVX512-BF16, Arm BF16): one of two ways, whichever :func:`cpu_bf16_mode` measures to
  be faster at the required accuracy on a probe transformer block of the model's width —
  ``"autocast"`` (weights stay fp32; matmuls in bf16, norms / softmax / residuals in fp32: the more
  accurate), or ``"cast"`` (the weights themselves are cast to bf16 for the duration of the
  context, floating inputs are cast on entry to the model's ``forward``; everything runs in bf16:
  no per-op casts). ``"cast"`` must be ≥ :data:`CAST_MIN_SPEEDUP` faster to be chosen. On exit
  the model's parameters and buffers are the very fp32 tensors they were before (not copies:
  restored bit for bit, also when the body raises).
* ``"fp32"``: autocast explicitly disabled, so an outer autocast cannot leak in and results equal
  a plain fp32 forward bit for bit.

Pure torch: no AnnData, no widgets, no foreign formats.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cellkit._errors import ConfigError
from cellkit._utils import get_logger

__all__ = [
    "CAST_MIN_SPEEDUP",
    "CPU_BF16_MODES",
    "PRECISIONS",
    "cpu_bf16_mode",
    "cpu_bf16_units",
    "precision_context",
    "resolve_precision",
]

PRECISIONS = ("fp32", "bf16", "fp16")
#: how bf16 runs on a CPU: ``"auto"`` measures (see :func:`cpu_bf16_mode`)
CPU_BF16_MODES = ("auto", "autocast", "cast")
#: ``"cast"`` (all-bf16, less accurate) is chosen only when this much faster than ``"autocast"``
CAST_MIN_SPEEDUP = 1.1
#: a bf16 way is usable only if the probe's outputs keep at least this cosine to fp32
PROBE_MIN_COSINE = 0.999

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_log = get_logger("core.precision")
_warned: set[str] = set()


# ----------------------------------------------------------------------------- hardware
def _torch_cpu_caps() -> dict[str, Any]:
    cpu = getattr(torch, "cpu", None)
    get = getattr(cpu, "get_capabilities", None)
    if get is not None:
        try:
            return dict(get())
        except Exception:  # pragma: no cover - private torch API; fall through to the flags
            pass
    caps: dict[str, Any] = {}
    for key, fn in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        f = getattr(cpu, fn, None)
        if f is not None:
            with contextlib.suppress(Exception):
                caps[key] = bool(f())
    return caps


def _cpuinfo_flags() -> set[str]:
    """The ``flags`` (x86) / ``Features`` (Arm) of ``/proc/cpuinfo``'s first processor; empty if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """Which bf16 units this CPU has: ``"AMX"``, ``"AVX512_BF16"``, ``"ARM_BF16"``, or ``None``.

    torch's own report first (``torch.cpu.get_capabilities()``, as oneDNN sees the CPU; AMX also
    needs the kernel's permission for the tile state, ``torch.cpu._init_amx()``), then the flags of
    ``/proc/cpuinfo`` (``amx_bf16``, ``avx512_bf16``; ``bf16`` on Arm). A virtual machine may
    hide units the physical CPU has: what counts is what the process can use.
    """
    caps = _torch_cpu_caps()
    flags = _cpuinfo_flags()
    amx = caps.get("amx_bf16") if "amx_bf16" in caps else "amx_bf16" in flags
    if amx:
        init = getattr(getattr(torch, "cpu", None), "_init_amx", None)
        ok = True
        if init is not None:
            try:
                ok = bool(init())
            except Exception:  # pragma: no cover
                ok = True
        if ok:
            return "AMX"
    if caps.get("avx512_bf16") if "avx512_bf16" in caps else "avx512_bf16" in flags:
        return "AVX512_BF16"
    if "bf16" in flags and "asimd" in flags:  # aarch64 (Neoverse V1/V2, Graviton 3/4)
        return "ARM_BF16"
    return None


# ----------------------------------------------------------------------------- resolve
def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    _log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision that will run on ``device`` for the requested ``precision``.

    Parameters
    ----------
    precision
        ``"fp32"`` (default everywhere; exact), ``"bf16"``, or ``"fp16"`` (CUDA only).
    device
        Where the model runs.

    Returns
    -------
    ``"fp32"``, ``"bf16"`` or ``"fp16"``. ``"bf16"`` on a CPU without bf16 units (AMX / AVX512-BF16
    / Arm BF16), or on a GPU without bf16 support, gives ``"fp32"`` with a warning (once per
    process and device type): emulated bf16 would be slower than fp32.

    Raises
    ------
    ConfigError
        An unknown precision, or ``"fp16"`` on a device other than CUDA.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {PRECISIONS}, got {precision!r}. Use 'fp32' (exact, the default), "
            "'bf16' (fast on GPUs and on CPUs with AMX / AVX512-BF16) or 'fp16' (CUDA only).",
            param="precision",
            problem=f"unknown precision {precision!r}",
        )
    dev = torch.device(device)
    if precision == "fp32":
        return "fp32"
    if precision == "fp16":
        if dev.type != "cuda":
            raise ConfigError(
                f"precision='fp16' runs only on CUDA GPUs, not on {dev.type!r}; on this device use "
                "precision='bf16' (stays fp32 where the CPU has no bf16 units) or 'fp32'.",
                param="precision",
                problem=f"fp16 is not available on {dev.type}",
            )
        return "fp16"
    # bf16
    if dev.type == "cpu":
        if cpu_bf16_units() is None:
            _warn_once(
                "cpu",
                "precision='bf16': this CPU has no bf16 units (AMX / AVX512-BF16): bf16 would run slower; "
                "staying in fp32.",
            )
            return "fp32"
        return "bf16"
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        _warn_once(
            "cuda",
            "precision='bf16': this GPU has no bf16 support: bf16 would run slower; staying in fp32 "
            "(precision='fp16' runs on it).",
        )
        return "fp32"
    if not torch.amp.is_autocast_available(dev.type):
        raise ConfigError(
            f"precision='bf16' needs autocast on {dev.type!r}, which this torch does not offer; use 'fp32'.",
            param="precision",
            problem=f"no bf16 autocast on {dev.type}",
        )
    return "bf16"


# ----------------------------------------------------------------------------- CPU bf16 mode
class _ProbeBlock(nn.Module):
    """One post-norm transformer block (packed QKV, SDPA, ReLU feed-forward), the shape of the core's."""

    def __init__(self, d: int, h: int, f: int) -> None:
        super().__init__()
        self.h = h
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, f), nn.Linear(f, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)
        x = self.n1(x + self.out(a))
        return self.n2(x + self.ff2(F.relu(self.ff1(x))))


def _model_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(d_model, n_heads, d_ff)`` of a cellkit model (``config.encoder``), else from its Linear layers."""
    enc = getattr(getattr(model, "config", None), "encoder", None)
    if enc is not None and all(hasattr(enc, a) for a in ("d_model", "n_heads", "d_ff")):
        return int(enc.d_model), int(enc.n_heads), int(enc.d_ff)
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    d = max(set(widths), key=widths.count) if widths else 256
    h = max(1, d // 64) if d % 64 == 0 else 1
    return d, h, 4 * d


@functools.lru_cache(maxsize=16)
def _measure_cpu_modes(d: int, h: int, f: int, threads: int) -> tuple[str, dict[str, float]]:
    """Time the probe block in fp32, autocast and cast (best of 3); the faster accurate bf16 way."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(0)
        block = _ProbeBlock(d, h, f).eval()
        x = torch.randn(2, 512, d)
        cast_block = _ProbeBlock(d, h, f).eval()
        cast_block.load_state_dict(block.state_dict())
        cast_block.to(torch.bfloat16)
        x16 = x.to(torch.bfloat16)
        runs = {
            "fp32": lambda: block(x),
            "autocast": lambda: _autocast_run(block, x),
            "cast": lambda: cast_block(x16).float(),
        }
        outs = {name: run() for name, run in runs.items()}  # and warm-up (oneDNN primitive creation)
        times = dict.fromkeys(runs, float("inf"))
        for _ in range(3):  # interleaved, so a change in the machine's load hits every way alike
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name] = min(times[name], time.perf_counter() - t0)
        ref = outs["fp32"].reshape(-1, d)
        cos = {k: float(F.cosine_similarity(outs[k].reshape(-1, d), ref).min()) for k in ("autocast", "cast")}
    info = {**{f"{k}_s": v for k, v in times.items()}, **{f"{k}_cosine": v for k, v in cos.items()}}
    mode = _pick_cpu_mode(info)
    _log.info("bf16 on this CPU (d=%d): %s chosen; %s", d, mode, info)
    return mode, info


def _pick_cpu_mode(info: dict[str, float]) -> str:
    """``"cast"`` when accurate and ≥ :data:`CAST_MIN_SPEEDUP` × faster than autocast, else ``"autocast"``."""
    ok_cast = info["cast_cosine"] >= PROBE_MIN_COSINE
    return "cast" if ok_cast and info["autocast_s"] >= CAST_MIN_SPEEDUP * info["cast_s"] else "autocast"


def _autocast_run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return block(x).float()


def cpu_bf16_mode(model: nn.Module) -> str:
    """How bf16 runs ``model`` fastest on this CPU at the required accuracy: ``"autocast"`` or ``"cast"``.

    Measured once per process and model shape (``d_model``, heads, ``d_ff``, torch threads) on a
    probe transformer block of that shape with 2 × 512 random tokens (about a second with bf16
    units), interleaved best of 3: fp32, ``torch.autocast("cpu", bfloat16)``, and the block cast
    to bf16. ``"cast"`` is chosen when its outputs keep cosine ≥ :data:`PROBE_MIN_COSINE` to fp32 and it is at least
    :data:`CAST_MIN_SPEEDUP` × faster than autocast; otherwise autocast (the more accurate: norms,
    softmax and residuals stay fp32).
    """
    d, h, f = _model_shape(model)
    return _measure_cpu_modes(d, h, f, torch.get_num_threads())[0]


# ----------------------------------------------------------------------------- context
def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.dtype == torch.float32 else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floating(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floating(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _cast_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Every fp32 parameter and buffer of ``model`` as ``dtype`` inside; the original tensors back on exit.

    Parameters keep their identity (``param.data`` is swapped), so tied weights and optimisers
    holding them are unaffected; the originals are kept, not copied, so restoring is exact.
    """
    params: list[tuple[nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    hook = None
    try:
        with torch.no_grad():
            for p in model.parameters():  # unique parameters (tied ones once)
                if p.dtype == torch.float32:
                    params.append((p, p.data))
                    p.data = p.data.to(dtype)
            for mod in model.modules():
                for name, b in list(mod._buffers.items()):
                    if b is not None and b.dtype == torch.float32:
                        buffers.append((mod, name, b))
                        mod._buffers[name] = b.to(dtype)

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return _cast_floating(args, dtype), _cast_floating(kwargs, dtype)

        hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        yield
    finally:
        if hook is not None:
            hook.remove()
        with torch.no_grad():
            for p, data in params:
                p.data = data
            for mod, name, b in buffers:
                mod._buffers[name] = b


def precision_context(
    model: nn.Module,
    device: torch.device | str,
    precision: str,
    *,
    cpu_mode: str = "auto",
) -> contextlib.AbstractContextManager[str]:
    """Run ``model`` in ``precision`` on ``device`` inside the ``with`` block.

    Parameters
    ----------
    model
        The model (already on ``device``); in ``"cast"`` mode its fp32 parameters and buffers
        are bf16 inside the block and exactly the original tensors again after it.
    device
        Where it runs.
    precision
        A resolved precision (:func:`resolve_precision`): ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    cpu_mode
        bf16 on a CPU: ``"auto"`` (measure, :func:`cpu_bf16_mode`), ``"autocast"`` or ``"cast"``.

    Returns
    -------
    A context manager; ``with`` binds how the block runs: ``"fp32"``, ``"autocast"`` or ``"cast"``.
    Outputs may be bf16 / fp16: convert them with ``.float()``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}.", param="precision")
    if cpu_mode not in CPU_BF16_MODES:
        raise ConfigError(f"cpu_mode must be one of {CPU_BF16_MODES}, got {cpu_mode!r}.", param="cpu_mode")
    dev = torch.device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(
            f"precision='fp16' runs only on CUDA GPUs, not on {dev.type!r}; use 'bf16' or 'fp32'.",
            param="precision",
        )
    return _context(model, dev, precision, cpu_mode)


@contextlib.contextmanager
def _context(model: nn.Module, dev: torch.device, precision: str, cpu_mode: str) -> Iterator[str]:
    if precision == "fp32":
        with torch.autocast(dev.type, enabled=False):
            yield "fp32"
        return
    dtype = _DTYPES[precision]
    mode = "autocast"
    if dev.type == "cpu":
        mode = cpu_bf16_mode(model) if cpu_mode == "auto" else cpu_mode
    if mode == "cast":
        with torch.autocast(dev.type, enabled=False), _cast_weights(model, dtype):
            yield "cast"
    else:
        with torch.autocast(dev.type, dtype=dtype):
            yield "autocast"
