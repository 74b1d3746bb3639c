"""scGPT model directories: ``args.json`` + ``best_model.pt`` + ``vocab.json``.

Reading maps every tensor of scGPT's ``TransformerModel`` state dict onto cellkit's core and
heads, or ignores it with a stated reason, or fails naming it — unlike scGPT's own
``load_pretrained(strict=False)``, which silently drops whatever does not match. All three
attention namings are accepted (they differ by name only; the ``[q; k; v]`` row layout is the same):

=====================================  ======================================
``self_attn.Wqkv.*``                   flash-attn 1.x ``FlashMHA`` (released checkpoints)
``self_attn.in_proj_weight/_bias``     torch ``nn.MultiheadAttention``
``self_attn._impl.Wqkv.*``             scGPT HEAD's ``flash_attn_compat`` wrapper
=====================================  ======================================

Numerics follow scGPT 0.2.4's CPU (non-flash) path, the reference the parity tests compare with:
post-norm, ReLU, LayerNorm eps 1e-5, no positional encoding, the continuous value encoder clamped
at 512 from above only; ``pre_norm`` is ignored there, so it is ignored here (and noted).
``<cls>`` carries ``pad_value`` (-2) by default, as in pretraining and ``embed_data``.

Writing (``model.save(path, format="scgpt")``) produces a directory scGPT's own loaders accept.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from cellkit._errors import CheckpointError, ConfigError, VocabError
from cellkit._utils import atomic_directory, get_logger, read_json
from cellkit.core import EncoderConfig
from cellkit.data.input_spec import InputSpec
from cellkit.data.vocab import GeneVocab

from .report import ForeignCheckpoint, LoadReport

__all__ = ["detect", "encoder_config", "read", "write"]

log = get_logger(__name__)

ARGS, WEIGHTS, VOCAB = "args.json", "best_model.pt", "vocab.json"
SCGPT_SPECIALS = ("<pad>", "<cls>", "<eoc>")

#: top-level scGPT module prefix -> cellkit prefix (attention and numbered blocks handled separately)
_PREFIXES = {
    "encoder.embedding.": "encoder.embeddings.gene.",
    "encoder.enc_norm.": "encoder.embeddings.gene_norm.",
    "batch_encoder.embedding.": "encoder.batch_embedding.embedding.",
    "batch_encoder.enc_norm.": "encoder.batch_embedding.norm.",
    "decoder.fc.": "heads.expression.fc.",
    "decoder.zero_logit.": "heads.expression.zero_logit.",
    "mvc_decoder.": "heads.mvc.",
    "cls_decoder._decoder.": "heads.classifier.layers.",
    "cls_decoder.out_layer.": "heads.classifier.out.",
    "grad_reverse_discriminator._decoder.": "heads.adversarial.layers.",
    "grad_reverse_discriminator.out_layer.": "heads.adversarial.out.",
    "dsbn.bns.": "heads.dsbn.bns.",
}
_VALUE_PREFIXES = {
    "continuous": {
        "value_encoder.linear1.": "encoder.embeddings.values.linear1.",
        "value_encoder.linear2.": "encoder.embeddings.values.linear2.",
        "value_encoder.norm.": "encoder.embeddings.values.norm.",
    },
    "category": {
        "value_encoder.embedding.": "encoder.embeddings.values.embedding.",
        "value_encoder.enc_norm.": "encoder.embeddings.values.norm.",
    },
    "scaling": {},
}
_IGNORED = {
    "flag_encoder.weight": "generative-pretraining flag embedding; scGPT's TransformerModel never uses it "
    "(its own load_pretrained drops it too)",
}
_LAYER = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_LAYER_INDEX = re.compile(r"^encoder\.layers\.(\d+)\.")
_LAYER_PARTS = {
    "self_attn.Wqkv.weight": "self_attn.qkv.weight",
    "self_attn.Wqkv.bias": "self_attn.qkv.bias",
    "self_attn.out_proj.weight": "self_attn.out_proj.weight",
    "self_attn.out_proj.bias": "self_attn.out_proj.bias",
    **{f"{m}.{p}": f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in ("weight", "bias")},
}


def detect(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding ``args.json`` and ``best_model.pt``."""
    path = Path(path)
    return (path / ARGS).is_file() and (path / WEIGHTS).is_file()


def _canonical_attention(key: str) -> str:
    """Rename the three attention namings to the ``Wqkv`` one."""
    key = key.replace("self_attn._impl.Wqkv.", "self_attn.Wqkv.").replace(
        "self_attn._impl.out_proj.", "self_attn.out_proj."
    )
    return key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
        "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
    )


def _to_cellkit_key(key: str, value_style: str) -> str | None:
    m = _LAYER.match(key)
    if m:
        part = _LAYER_PARTS.get(m.group(2))
        return None if part is None else f"encoder.layers.{m.group(1)}.{part}"
    for src, dst in {**_PREFIXES, **_VALUE_PREFIXES[value_style]}.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it contains objects other than tensors "
            f"({str(exc).splitlines()[0][:200]}). cellkit never unpickles arbitrary code; a genuine scGPT "
            "best_model.pt is a plain state_dict."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated or corrupt."
        ) from None
    if isinstance(obj, dict) and "model_state_dict" in obj and isinstance(obj["model_state_dict"], dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors).")
    return dict(obj)


def _read_args(path: Path) -> dict[str, Any]:
    return read_json(path / ARGS, what="scGPT args file", expect=dict, error=CheckpointError)


def _num_arg(
    args: dict[str, Any], key: str, default: Any, path: Path, *, integer: bool = False, optional: bool = False
) -> Any:
    """A numeric training argument (``integer``: a whole number; ``optional``: null allowed)."""
    value = args.get(key, default)
    if value is None and optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        want = "an integer" if integer else "a number"
        raise CheckpointError(
            f"{path / ARGS}: {key}={value!r:.80} must be {want}{' or null' if optional else ''}. "
            "Fix the value if the file was edited by hand."
        )
    return int(value) if integer else value


def _choice(args: dict[str, Any], key: str, default: Any, allowed: tuple, path: Path, why: str = "") -> Any:
    value = args.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise CheckpointError(
            f"{path / ARGS}: {key}={value!r} is not supported{why}; cellkit reproduces scGPT with "
            f"{key} in {list(allowed)}. Fix the value if the file was edited by hand."
        )
    return value


def _int_arg(args: dict[str, Any], key: str, path: Path) -> int:
    if key not in args:
        raise CheckpointError(
            f"{path / ARGS} has no {key!r}; an scGPT args.json needs embsize, nheads, d_hid and nlayers."
        )
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path / ARGS}: {key}={value!r} must be a positive integer.")
    return value


def _count_linears(state: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(1 for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2)


def encoder_config(
    vocab_size: int,
    *,
    d_model: int,
    n_heads: int,
    n_layers: int,
    d_ff: int,
    dropout: float,
    pad_token_id: int,
    value_encoder: str = "continuous",
    n_value_bins: int = 0,
    value_pad_id: int | None = None,
    n_batch_labels: int = 0,
) -> EncoderConfig:
    """The core configuration of scGPT's ``TransformerModel`` (its CPU, non-flash numerics).

    Post-norm, ReLU, LayerNorm eps 1e-5 everywhere, LayerNorm on the gene embedding, no positions,
    the continuous value encoder clamped at 512 from above.
    """
    return EncoderConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=d_ff,
        activation="relu",
        norm_scheme="post",
        layer_norm_eps=1e-5,
        dropout=dropout,
        attention_dropout=dropout,
        pad_token_id=pad_token_id,
        gene_norm=True,
        value_encoder=value_encoder,
        value_max=512.0,
        n_value_bins=n_value_bins,
        value_pad_id=value_pad_id,
        n_batch_labels=n_batch_labels,
    )


def _input_spec(
    path: Path, max_len: int | None, n_bins: int, pad_value: float, mask_value: float, cls_value: float
) -> InputSpec:
    """The model's tokenization conventions from ``args.json`` (``max_seq_len`` is ``max_length``)."""
    try:
        return InputSpec(
            max_length=max_len, n_bins=n_bins, pad_value=pad_value, mask_value=mask_value, cls_value=cls_value
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path / ARGS}: {exc}") from None


def read(path: str | os.PathLike[str], *, cls_value: float | None = None) -> ForeignCheckpoint:
    """Read an scGPT model directory.

    Parameters
    ----------
    path
        Directory with ``args.json``, ``best_model.pt`` and ``vocab.json``.
    cls_value
        Value the tokenizer puts at ``<cls>`` (default ``pad_value``, the pretraining and
        ``embed_data`` convention; scGPT's tutorials use 0).

    Returns
    -------
    :class:`~cellkit.checkpoints.ForeignCheckpoint`
    """
    path = Path(path)
    _check_model_files(path)
    args = _read_args(path)
    report = LoadReport("scgpt", str(path))
    d_model, n_heads = _int_arg(args, "embsize", path), _int_arg(args, "nheads", path)
    d_ff, n_layers = _int_arg(args, "d_hid", path), _int_arg(args, "nlayers", path)
    if d_model % n_heads:
        raise CheckpointError(f"{path / ARGS}: embsize {d_model} is not divisible by nheads {n_heads}.")
    value_style = _choice(args, "input_emb_style", "continuous", ("continuous", "category", "scaling"), path)
    cell_emb_style = _choice(args, "cell_emb_style", "cls", ("cls", "avg-pool", "w-pool"), path)
    mvc_style = _choice(
        args,
        "mvc_decoder_style",
        "inner product",
        ("inner product", "inner product, detach"),
        path,
        " (scGPT's 'concat query'/'sum query' MVC styles crash in its own forward)",
    )
    _choice(
        args,
        "fast_transformer_backend",
        "flash",
        ("flash",),
        path,
        " (the linear-attention backend computes different attention)",
    )
    if args.get("pre_norm"):
        report.notes.append(
            "pre_norm=true ignored: scGPT 0.2.4's non-flash (CPU) path ignores it, and released models are post-norm"
        )
    if args.get("USE_GENERATIVE_TRAINING"):
        report.notes.append(
            "USE_GENERATIVE_TRAINING only affected pretraining; the encoder is loaded as TransformerModel"
        )
    pad_value = _num_arg(args, "pad_value", -2, path)
    mask_value = _num_arg(args, "mask_value", -1, path)
    n_bins = _num_arg(args, "n_bins", 51, path, integer=True)
    if n_bins < 1:
        raise CheckpointError(f"{path / ARGS}: n_bins={n_bins} must be a positive integer.")
    max_len = _num_arg(args, "max_seq_len", None, path, integer=True, optional=True)
    # checked here; the scGPT export reads it back from metadata["scgpt_args"]
    _num_arg(args, "n_layers_cls", 3, path, integer=True)
    dropout = _num_arg(args, "dropout", 0.2, path)
    pad_token = args.get("pad_token", "<pad>")
    if not isinstance(pad_token, str) or not pad_token:
        raise CheckpointError(
            f"{path / ARGS}: pad_token={pad_token!r:.80} must be a token string such as '<pad>'."
        )
    input_style = args.get("input_style", "binned")
    if not isinstance(input_style, str):
        raise CheckpointError(
            f"{path / ARGS}: input_style={input_style!r:.80} must be a string such as 'binned'."
        )

    vocab = _read_vocab(path, pad_token, report)
    state, renamed_attention = _map_tensors(path, value_style, report)
    _check_gene_embedding(path, state, len(vocab), d_model)

    # heads and options are read off the tensors that exist
    heads = _heads_from_state(state, d_model, mvc_style)
    n_batch = (
        state["encoder.batch_embedding.embedding.weight"].shape[0]
        if "encoder.batch_embedding.embedding.weight" in state
        else 0
    )
    n_value_bins, value_pad_id = _value_categories(path, state, value_style, pad_value)
    _check_layer_count(path, state, n_layers)
    try:
        encoder = encoder_config(
            len(vocab),
            d_model=d_model,
            n_heads=n_heads,
            n_layers=n_layers,
            d_ff=d_ff,
            dropout=dropout,
            pad_token_id=vocab[pad_token],
            value_encoder=value_style,
            n_value_bins=n_value_bins,
            value_pad_id=value_pad_id,
            n_batch_labels=int(n_batch),
        )
    except ConfigError as exc:
        raise CheckpointError(
            f"{path / ARGS} describes an architecture cellkit cannot build: {exc}"
        ) from None
    pooling = {"cls": "cls", "avg-pool": "mean", "w-pool": "weighted"}[cell_emb_style]
    if cell_emb_style != "cls":
        report.notes.append(
            f"cell_emb_style={cell_emb_style!r} maps to cellkit pooling {pooling!r}, which excludes padding "
            "(scGPT's own pooling includes padded positions, so its result depends on the padding)"
        )
    if renamed_attention:
        report.notes.append("attention tensors renamed to the Wqkv layout (values unchanged)")
    config = {
        "encoder": encoder,
        "heads": heads,
        "pooling": pooling,
        "family": "scgpt",
        "specials": vocab.specials,
        "input": _input_spec(
            path, max_len, n_bins, pad_value, mask_value, pad_value if cls_value is None else cls_value
        ),
        "metadata": {"source": str(path), "scgpt_args": args},
    }
    report.architecture = {
        "embsize": d_model,
        "nheads": n_heads,
        "d_hid": d_ff,
        "nlayers": n_layers,
        "input_emb_style": value_style,
        "ntoken": len(vocab),
    }
    return ForeignCheckpoint(config, state, vocab, report)


def _check_model_files(path: Path) -> None:
    """An scGPT model directory holds args.json, best_model.pt and vocab.json."""
    for name in (ARGS, WEIGHTS, VOCAB):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path} is missing {name}; an scGPT model directory holds {ARGS}, {WEIGHTS} and {VOCAB} "
                "(as downloaded, e.g. the scGPT_human folder)."
            )


def _read_vocab(path: Path, pad_token: str, report: LoadReport) -> GeneVocab:
    """The vocabulary with scGPT's specials; loaders append missing specials, as scGPT's do."""
    raw = read_json(path / VOCAB, what="scGPT vocabulary file", expect=dict, error=CheckpointError)
    try:
        vocab = GeneVocab.from_dict(raw)
    except VocabError as exc:
        raise CheckpointError(f"{path / VOCAB}: {exc}") from None
    missing_specials = [t for t in dict.fromkeys((pad_token, *SCGPT_SPECIALS)) if t not in vocab]
    vocab = vocab.with_specials({"pad": pad_token, "cls": "<cls>", "eos": "<eoc>"}, append_missing=True)
    if missing_specials:
        report.notes.append(
            f"appended special tokens {missing_specials} to the vocabulary, as scGPT's loaders do"
        )
    return vocab


def _map_tensors(path: Path, value_style: str, report: LoadReport) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights under cellkit's names, and whether attention tensors were renamed to the Wqkv layout.

    Every tensor is placed, recorded as ignored, or the whole load fails (nothing is loaded partly).
    """
    raw_state = _load_tensors(path / WEIGHTS)
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    renamed_attention = False
    for key, tensor in raw_state.items():
        if key in _IGNORED:
            report.ignored[key] = _IGNORED[key]
            continue
        canon = _canonical_attention(key)
        renamed_attention |= canon != key
        if canon.startswith("bn."):
            raise CheckpointError(
                f"{path / WEIGHTS} has a plain batch norm ({key}) from scGPT < 0.1.5, which cellkit does not "
                "support; re-save the model with a current scGPT or drop the bn.* tensors if it was never trained."
            )
        target = _to_cellkit_key(canon, value_style)
        if target is None:
            unknown.append(key)
            continue
        state[target] = tensor
        report.mapped[key] = target
    if unknown:
        raise CheckpointError(
            f"{path / WEIGHTS} has tensors cellkit cannot place: {sorted(unknown)[:12]}. They belong to an scGPT "
            "variant cellkit does not reproduce (e.g. SimDecoder, generative layers); nothing was loaded."
        )
    return state, renamed_attention


def _check_gene_embedding(path: Path, state: dict[str, torch.Tensor], n_tokens: int, d_model: int) -> None:
    """The gene embedding exists and matches the vocabulary (+ specials) × embsize."""
    emb = state.get("encoder.embeddings.gene.weight")
    if emb is None:
        raise CheckpointError(
            f"{path / WEIGHTS} has no encoder.embedding.weight; this is not a TransformerModel state_dict."
        )
    if emb.shape != (n_tokens, d_model):
        raise CheckpointError(
            f"{path}: the gene embedding has {emb.shape[0]:,} rows × {emb.shape[1]} but {VOCAB} (+ specials) has "
            f"{n_tokens:,} tokens and args.json says embsize {d_model}; the vocabulary does not belong to these weights."
        )


def _heads_from_state(
    state: dict[str, torch.Tensor], d_model: int, mvc_style: str
) -> dict[str, dict[str, Any]]:
    """The heads present in the weights and their options, read off the tensors' names and shapes."""
    heads: dict[str, dict[str, Any]] = {}
    if "heads.expression.fc.0.weight" in state:
        heads["expression"] = {
            "explicit_zero_prob": "heads.expression.zero_logit.0.weight" in state,
            "use_batch_labels": state["heads.expression.fc.0.weight"].shape[1] == 2 * d_model,
        }
    if "heads.mvc.W.weight" in state:
        heads["mvc"] = {
            "detach": mvc_style.endswith("detach"),
            "explicit_zero_prob": "heads.mvc.W_zero_logit.weight" in state,
            "use_batch_labels": state["heads.mvc.W.weight"].shape[0] == 2 * d_model,
        }
    if "heads.classifier.out.weight" in state:
        heads["classifier"] = {
            "n_classes": int(state["heads.classifier.out.weight"].shape[0]),
            "n_layers": _count_linears(state, "heads.classifier.layers.") + 1,
        }
    if "heads.adversarial.out.weight" in state:
        heads["adversarial"] = {
            "n_batches": int(state["heads.adversarial.out.weight"].shape[0]),
            "n_layers": _count_linears(state, "heads.adversarial.layers.") + 1,
        }
    dsbn = {int(k.split(".")[3]) for k in state if k.startswith("heads.dsbn.bns.")}
    if dsbn:
        heads["dsbn"] = {"n_domains": max(dsbn) + 1, "affine": "heads.dsbn.bns.0.weight" in state}
    return heads


def _value_categories(
    path: Path, state: dict[str, torch.Tensor], value_style: str, pad_value: float
) -> tuple[int, int | None]:
    """Number of value categories and the pad category (``input_emb_style='category'``; else ``0, None``)."""
    if value_style != "category":
        return 0, None
    n_value_bins = int(state["encoder.embeddings.values.embedding.weight"].shape[0])
    value_pad_id = int(pad_value)
    if not 0 <= value_pad_id < n_value_bins:
        raise CheckpointError(
            f"{path / ARGS}: pad_value {pad_value} is not a valid category id (0 … {n_value_bins - 1})."
        )
    return n_value_bins, value_pad_id


def _check_layer_count(path: Path, state: dict[str, torch.Tensor], n_layers: int) -> None:
    """The weights hold exactly encoder layers 0 … nlayers - 1."""
    layers = {int(m.group(1)) for k in state if (m := _LAYER_INDEX.match(k))}
    if len(layers) != n_layers or max(layers, default=-1) != n_layers - 1:  # no set(range(n_layers))
        raise CheckpointError(
            f"{path / ARGS}: nlayers={n_layers} but {path / WEIGHTS} holds {len(layers)} encoder layers; "
            "the args do not belong to these weights."
        )


# ---------------------------------------------------------------------------------------- export
def _check_exportable(enc: dict[str, Any], heads: dict[str, Any]) -> None:
    wrong = []
    want = {
        "activation": "relu",
        "norm_scheme": "post",
        "gene_norm": True,
        "embedding_norm": False,
        "max_position_embeddings": 0,
        "type_vocab_size": 0,
        "final_norm": False,
        "layer_norm_eps": 1e-5,
    }
    for key, value in want.items():
        if enc[key] != value:
            wrong.append(f"{key}={enc[key]!r} (scGPT needs {value!r})")
    if enc["value_encoder"] == "none":
        wrong.append("value_encoder='none' (scGPT needs values)")
    if "mlm" in heads:
        wrong.append("an MLM token head (scGPT has none)")
    if wrong:
        raise CheckpointError("This model cannot be written in scGPT's format: " + "; ".join(wrong) + ".")


def write(
    path: str | os.PathLike[str], config: dict[str, Any], state: dict[str, torch.Tensor], vocab: GeneVocab
) -> Path:
    """Write ``args.json`` + ``best_model.pt`` (Wqkv naming) + ``vocab.json`` for scGPT's loaders.

    The directory is written as a whole (:func:`cellkit._utils.atomic_directory`) and read back
    with cellkit's scGPT reader before it replaces ``path``; a vocabulary scGPT's loaders would not
    take as is (missing ``<pad>`` / ``<cls>`` / ``<eoc>``, another padding token, other special
    roles) is refused with the reason before anything is written.

    Parameters
    ----------
    config
        ``CellModelConfig.to_dict()`` of the model.
    state
        The model's state dict (cellkit keys).
    """
    enc, heads, inp = config["encoder"], config["heads"], config.get("input", {})
    _check_exportable(enc, heads)
    _check_exportable_vocab(vocab, int(enc["pad_token_id"]))
    inverse: dict[str, str] = {}
    value_prefixes = _VALUE_PREFIXES[enc["value_encoder"]]
    for src, dst in {**_PREFIXES, **value_prefixes}.items():
        inverse[dst] = src
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state.items():
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            part = {v: k for k, v in _LAYER_PARTS.items()}[m.group(2)]
            out[f"transformer_encoder.layers.{m.group(1)}.{part}"] = tensor.detach().cpu().clone()
            continue
        for dst, src in inverse.items():
            if key.startswith(dst):
                out[src + key[len(dst) :]] = tensor.detach().cpu().clone()
                break
        else:
            raise CheckpointError(
                f"Tensor {key} has no place in scGPT's layout; this model cannot be exported."
            )
    meta_args = dict(config.get("metadata", {}).get("scgpt_args") or {})
    pooling = {"cls": "cls", "mean": "avg-pool", "weighted": "w-pool"}[config["pooling"]]
    args = meta_args | {
        "embsize": enc["d_model"],
        "nheads": enc["n_heads"],
        "d_hid": enc["d_ff"],
        "nlayers": enc["n_layers"],
        "dropout": enc["dropout"],
        "pad_token": vocab.token(enc["pad_token_id"]),
        "pad_value": inp.get("pad_value", -2),
        "mask_value": inp.get("mask_value", -1),
        "n_bins": inp.get("n_bins", 51),
        "input_emb_style": enc["value_encoder"],
        "cell_emb_style": pooling,
        "MVC": "mvc" in heads,
        "fast_transformer": True,
        "pre_norm": False,
        "n_layers_cls": heads.get("classifier", {}).get("n_layers", meta_args.get("n_layers_cls", 3)),
    }
    if "mvc" in heads:
        args["mvc_decoder_style"] = "inner product, detach" if heads["mvc"]["detach"] else "inner product"
    if "classifier" in heads:
        args["n_cls"] = heads["classifier"]["n_classes"]
    if "adversarial" in heads or "dsbn" in heads or enc.get("n_batch_labels"):
        args["num_batch_labels"] = enc.get("n_batch_labels") or heads.get("dsbn", {}).get("n_domains")
    args["DSBN"] = "dsbn" in heads
    args["DAB"] = "adversarial" in heads
    args["explicit_zero_prob"] = bool(heads.get("expression", {}).get("explicit_zero_prob"))
    args["INPUT_BATCH_LABELS"] = bool(heads.get("expression", {}).get("use_batch_labels"))
    if enc["value_encoder"] == "category":
        args["n_input_bins"] = enc["n_value_bins"]

    from .native import replaceable_model_dir

    path = Path(path)
    with atomic_directory(path, may_replace=replaceable_model_dir, what="model directory") as tmp:
        torch.save(out, tmp / WEIGHTS)
        vocab.to_json(tmp / VOCAB)
        (tmp / ARGS).write_text(json.dumps(args, indent=2), encoding="utf-8")
        _check_reads_back(tmp, path, vocab)
    log.info("Wrote scGPT directory %s (%d tensors)", path, len(out))
    return path


def _check_exportable_vocab(vocab: GeneVocab, pad_token_id: int) -> None:
    """Refuse a vocabulary scGPT's loaders (and so cellkit's scGPT reader) would not take as is.

    scGPT's ``GeneVocab.from_file`` needs ids contiguous from 0 (cellkit's vocabularies always
    are) and every loader then appends whichever of ``<pad>``, ``<cls>``, ``<eoc>`` is missing, which
    changes the vocabulary size so the gene embedding no longer fits (``load_pretrained`` silently
    drops it; cellkit's reader refuses). The tutorials hard-code ``pad_token = "<pad>"`` and prepend
    ``<cls>``; scGPT has no other special roles.
    """
    problems = []
    missing = [t for t in SCGPT_SPECIALS if t not in vocab]
    if missing:
        problems.append(
            f"it lacks the special token(s) {missing}, which scGPT's loaders append (changing the vocabulary size, "
            "so the gene embedding would no longer fit)"
        )
    pad = vocab.token(pad_token_id) if 0 <= pad_token_id < len(vocab) else None
    if pad != "<pad>":
        problems.append(f"its padding token is {pad!r}, but scGPT pads with '<pad>'")
    roles = vocab.specials
    for role, token in (("cls", "<cls>"), ("eos", "<eoc>")):
        if role in roles and roles[role] != token:
            problems.append(f"its {role!r} token is {roles[role]!r}, but scGPT's is {token!r}")
    if roles.get("pad") not in (None, "<pad>"):
        problems.append(f"its 'pad' role is {roles['pad']!r}, but scGPT's is '<pad>'")
    extra = sorted(set(roles) - {"pad", "cls", "eos"})
    if extra:
        problems.append(
            f"it has special role(s) {extra} that scGPT's vocabulary has no place for (they would be lost)"
        )
    if problems:
        raise CheckpointError(
            "This model's vocabulary cannot be written in scGPT's format: "
            + "; ".join(problems)
            + ". Save it with format='cellkit' instead, or build the model on a vocabulary with scGPT's specials "
            "'<pad>', '<cls>', '<eoc>' (cellkit.presets.scgpt_config does)."
        )


def _check_reads_back(tmp: Path, path: Path, vocab: GeneVocab) -> None:
    """Read the written directory with cellkit's own scGPT reader before it replaces ``path``."""
    try:
        back = read(tmp)
    except CheckpointError as exc:
        raise CheckpointError(
            f"Not saved to {path}: the scGPT directory would not load again ({exc}). Save with format='cellkit'."
        ) from None
    if back.vocab.tokens != vocab.tokens:
        raise CheckpointError(
            f"Not saved to {path}: the vocabulary would read back differently in scGPT's format. Save with "
            "format='cellkit'."
        )
