"""Reader for Geneformer checkpoints: a Hugging Face BERT directory plus Geneformer's dictionaries.

A Geneformer model directory holds ``config.json`` (``model_type: "bert"``), the weights
(``model.safetensors`` or the older ``pytorch_model.bin``) and, next to it or elsewhere, the
pickled dictionaries the tokenizer needs:

``token_dictionary*.pkl``
    Ensembl id → token id, with ``<pad>``, ``<mask>`` (and for V2 ``<cls>``, ``<eos>``). Required.
``gene_median_dictionary*.pkl``
    Ensembl id → non-zero median expression used to normalise before ranking.
``gene_name_id_dict*.pkl``
    Gene symbol → Ensembl id.
``ensembl_mapping_dict*.pkl``
    Ensembl id → canonical id used to merge duplicate genes (V2).

The BERT encoder maps onto :class:`cellkit.core.CellEncoder` by renaming alone (query, key and
value projections are stacked into one ``qkv`` projection); ``BertForMaskedLM``'s prediction head
becomes the ``mlm`` head. Every tensor in the file is either mapped or listed in
``report.ignored`` with a reason; anything unrecognised is an error. Pickles are read only through
:func:`cellkit.checkpoints.safe_pickle.safe_load_pickle`, and ``pytorch_model.bin`` only with
``torch.load(..., weights_only=True)``, so opening a checkpoint never runs code from it.

Geneformer's embedding conventions, for reference:

- ``emb_mode="cls"`` (V2): the hidden state at position 0 (the ``<cls>`` token);
- ``emb_mode="cell"``: the mean over non-pad tokens, leaving out ``<cls>``/``<eos>`` when present;
- ``emb_layer`` counts from the top: ``0`` is the last layer, ``-1`` (Geneformer's default) the
  second-to-last; :func:`hidden_state_index` converts it to an index into
  :attr:`cellkit.CellModelOutput.hidden_states`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cellkit._errors import CellkitError, CheckpointError, ConfigError, VocabError
from cellkit._utils import get_logger, read_json
from cellkit.core import EncoderConfig
from cellkit.core.config import bert_encoder_config
from cellkit.data.input_spec import InputSpec
from cellkit.data.vocab import GeneVocab

from .report import ForeignCheckpoint, LoadReport
from .safe_pickle import safe_load_pickle

__all__ = ["detect", "hidden_state_index", "read"]

log = get_logger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"

#: option name -> (glob pattern in the model directory, resource name or None for the vocabulary)
_DICTIONARIES: dict[str, tuple[str, str | None]] = {
    "token_dictionary": ("token_dictionary*.pkl", None),
    "gene_median_dictionary": ("gene_median_dictionary*.pkl", "gene_median"),
    "gene_name_id_dictionary": ("gene_name_id_dict*.pkl", "gene_name_id"),
    "ensembl_mapping_dictionary": ("ensembl_mapping_dict*.pkl", "ensembl_mapping"),
}

#: Geneformer's special tokens, by cellkit role
_SPECIAL_TOKENS = {"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "eos": "<eos>"}

#: Hugging Face BertConfig defaults for keys a config.json may leave out
_BERT_DEFAULTS: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}
_REQUIRED_CONFIG = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)

#: BERT embedding key -> cellkit key
_EMBEDDING_KEYS = {
    "embeddings.word_embeddings.weight": "encoder.embeddings.gene.weight",
    "embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "encoder.embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "encoder.embeddings.norm.bias",
}
#: per-layer BERT sub-key -> cellkit sub-key (query/key/value are stacked separately)
_LAYER_KEYS = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_QKV = ("query", "key", "value")
#: masked-LM prediction head key -> cellkit key
_MLM_KEYS = {
    "cls.predictions.transform.dense.weight": "heads.mlm.dense.weight",
    "cls.predictions.transform.dense.bias": "heads.mlm.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "heads.mlm.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "heads.mlm.norm.bias",
}
_MLM_BIAS = "cls.predictions.bias"
_MLM_DECODER_BIAS = "cls.predictions.decoder.bias"
_MLM_DECODER_WEIGHT = "cls.predictions.decoder.weight"
#: key prefix -> reason it is not used
_IGNORED_PREFIXES = {
    "embeddings.position_ids": "buffer of position indices 0…L-1, recomputed at run time",
    "embeddings.token_type_ids": "buffer of zero token-type ids, recomputed at run time",
    "pooler.": "BERT pooler (dense + tanh on position 0); Geneformer's embeddings do not use it",
    "cls.seq_relationship.": "next-sentence-prediction head; Geneformer is trained with masked LM only",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------- public API
def detect(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face BERT directory (and not a cellkit one).

    Parameters
    ----------
    path
        A directory.

    Returns
    -------
    True when ``path/config.json`` is a JSON object with ``model_type == "bert"`` and no
    ``"format": "cellkit"``.
    """
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        data = read_json(cfg, what="model config", error=CheckpointError)
    except CheckpointError:
        return False
    return isinstance(data, dict) and data.get("model_type") == "bert" and data.get("format") != "cellkit"


def hidden_state_index(emb_layer: int, n_layers: int) -> int:
    """Index into ``hidden_states`` for Geneformer's ``emb_layer`` convention.

    Geneformer counts layers from the top: ``emb_layer=0`` is the last layer's output and the
    default ``-1`` the second-to-last; it reads ``hidden_states[n_layers + emb_layer]`` of the
    ``n_layers + 1`` states (input embeddings first). :attr:`cellkit.CellModelOutput.hidden_states`
    has the same layout, so the index can be used on it directly.

    Parameters
    ----------
    emb_layer
        ``0`` (last layer), ``-1`` (second-to-last), … down to ``-n_layers`` (the input embeddings).
    n_layers
        Number of encoder layers of the model (``model.config.encoder.n_layers``).

    Returns
    -------
    ``n_layers + emb_layer``, in ``0 … n_layers``.

    Examples
    --------
    >>> hidden_state_index(-1, 6)
    5
    >>> hidden_state_index(0, 6)
    6
    """
    for name, value in (("emb_layer", emb_layer), ("n_layers", n_layers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CellkitError(f"{name} must be an integer, got {value!r}.")
    if n_layers < 1:
        raise CellkitError(f"n_layers must be >= 1, got {n_layers}.")
    if not -n_layers <= emb_layer <= 0:
        raise CellkitError(
            f"emb_layer={emb_layer} is out of range for a {n_layers}-layer model: use 0 (last layer), "
            f"-1 (second-to-last, Geneformer's default) … down to {-n_layers} (the input embeddings)."
        )
    return int(n_layers + emb_layer)


def read(
    path: str | os.PathLike[str],
    *,
    token_dictionary: str | os.PathLike[str] | None = None,
    gene_median_dictionary: str | os.PathLike[str] | None = None,
    gene_name_id_dictionary: str | os.PathLike[str] | None = None,
    ensembl_mapping_dictionary: str | os.PathLike[str] | None = None,
    **unknown: Any,
) -> ForeignCheckpoint:
    """Read a Geneformer (Hugging Face BERT) directory.

    Parameters
    ----------
    path
        The model directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).
    token_dictionary
        Geneformer's ``token_dictionary*.pkl``. Default: the single match of that pattern in
        ``path``; required.
    gene_median_dictionary
        ``gene_median_dictionary*.pkl`` (default: found in ``path``; optional). Kept as the
        ``gene_median`` resource, which Geneformer-style tokenization needs.
    gene_name_id_dictionary
        ``gene_name_id_dict*.pkl`` (default: found in ``path``; optional) → resource ``gene_name_id``.
    ensembl_mapping_dictionary
        ``ensembl_mapping_dict*.pkl`` (default: found in ``path``; optional) → resource
        ``ensembl_mapping``.

    Returns
    -------
    :class:`~cellkit.checkpoints.ForeignCheckpoint` with the :class:`cellkit.CellModelConfig`
    keyword arguments, the renamed tensors, the vocabulary, the report and the resources.

    Raises
    ------
    CheckpointError
        For a missing, ambiguous, unsafe or inconsistent file, an unsupported architecture
        setting, or any tensor that cannot be accounted for.
    VocabError
        For a token dictionary with gaps or duplicate ids.
    """
    if unknown:
        raise ConfigError(
            f"Unknown options for a Geneformer checkpoint: {sorted(unknown)}; known: {sorted(_DICTIONARIES)}."
        )
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the Geneformer model directory.")
    notes: list[str] = []
    hf = _read_config(path)
    encoder, hf_used = _encoder_config(hf, path, notes)

    # ---- dictionaries (safe unpickling only)
    given = {
        "token_dictionary": token_dictionary,
        "gene_median_dictionary": gene_median_dictionary,
        "gene_name_id_dictionary": gene_name_id_dictionary,
        "ensembl_mapping_dictionary": ensembl_mapping_dictionary,
    }
    files = {name: _find_dictionary(path, name, given[name]) for name in _DICTIONARIES}
    token_file = files["token_dictionary"]
    assert token_file is not None  # _find_dictionary raises for a missing token dictionary
    vocab = _read_vocab(token_file)
    notes.append(f"token_dictionary: {token_file} ({len(vocab):,} tokens; specials {vocab.specials})")
    resources: dict[str, Any] = {}
    absent = [name for name, (_, res) in _DICTIONARIES.items() if res is not None and files[name] is None]
    if absent:
        notes.append(f"not given and not found in {path}: {', '.join(absent)} (their resources are absent)")
    for name, (_, resource) in _DICTIONARIES.items():
        file = files[name]
        if resource is None or file is None:
            continue
        resources[resource] = _read_table(file, want_float=resource == "gene_median")
        notes.append(f"{name}: {file} ({len(resources[resource]):,} entries) → resource {resource!r}")
    if "gene_median" not in resources:
        notes.append(
            "Geneformer tokenization normalises by gene medians: pass gene_median_dictionary=… "
            "(gene_median_dictionary*.pkl) to tokenize AnnData with this model"
        )

    # ---- weights
    raw, weights_file = _read_weights(path)
    if encoder.n_layers > len(raw):  # every layer owns tensors; never loop over a number from the file
        raise CheckpointError(
            f"{path / CONFIG}: num_hidden_layers={encoder.n_layers:,} but {weights_file} holds only {len(raw):,} "
            "tensors; the config does not describe these weights."
        )
    state, mapped, ignored, tied = _map_state(raw, encoder, weights_file, path / CONFIG, hf)
    rows = state["encoder.embeddings.gene.weight"].shape[0]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()} - {"float32"})
    if dtypes:
        notes.append(f"{weights_file.name} stores {', '.join(dtypes)} tensors; the model is built in float32")
    if len(vocab) != rows:
        raise CheckpointError(
            f"The token dictionary {token_file} has {len(vocab):,} tokens but the word embeddings in "
            f"{weights_file} have {rows:,} rows: the dictionary belongs to another Geneformer generation "
            "(V1 gc30M: 25,426 tokens; V2 gc104M: 20,275). Pass the matching file with token_dictionary=…."
        )
    pad_id = vocab.pad_id
    if encoder.pad_token_id != pad_id:
        notes.append(
            f"config.json pad_token_id={encoder.pad_token_id} but {token_file} has <pad>={pad_id}; "
            "cellkit pads with the dictionary's <pad> token"
        )
        encoder = EncoderConfig.from_dict({**encoder.to_dict(), "pad_token_id": pad_id})

    # ---- conventions
    v2 = "cls" in vocab.specials
    version = "V2" if v2 else "V1"
    heads: dict[str, dict[str, Any]] = {}
    if tied is not None:
        heads["mlm"] = {"activation": encoder.activation, "tied": tied, "eps": encoder.layer_norm_eps}
    notes.append(
        f"Geneformer {version} input: {'<cls> genes… <eos>' if v2 else 'genes… (no special tokens)'}, "
        f"up to {encoder.max_position_embeddings:,} tokens ranked by normalised expression"
    )
    notes.append(
        "default pooling "
        + (
            "'cls' (hidden state of <cls>, Geneformer's emb_mode='cls')"
            if v2
            else "'mean' over non-pad tokens (Geneformer's emb_mode='cell'; V1 has no <cls>)"
        )
    )
    notes.append(
        "Geneformer's EmbExtractor default emb_layer=-1 is the second-to-last layer: use "
        f"hidden_states[hidden_state_index(-1, {encoder.n_layers})]; cellkit's cell_embedding uses the last layer"
    )
    if tied is None:
        notes.append("no masked-LM head in the file (a BertModel checkpoint); the model has no 'mlm' head")
    config = {
        "encoder": encoder,
        "heads": heads,
        "pooling": "cls" if v2 else "mean",
        "family": "geneformer",
        "specials": vocab.specials,
        # the position embeddings bound the tokens per cell (0: no positions, the scheme's default applies)
        "input": InputSpec(
            version=version, max_length=encoder.max_position_embeddings or None, special_token=v2
        ),
        "metadata": {"source": str(path), "hf_config": hf},
    }
    architecture = {
        "model_type": "bert",
        "architectures": hf.get("architectures"),
        "geneformer_version": version,
        "weights_file": weights_file.name,
        "token_dictionary": str(token_file),
        "transformers_version": hf.get("transformers_version"),
        **{f"hf_{k}": v for k, v in hf_used.items()},
    }
    report = LoadReport(
        format="geneformer",
        source=str(path),
        mapped=mapped,
        ignored=ignored,
        notes=notes,
        architecture=architecture,
    )
    log.debug("read Geneformer %s checkpoint %s (%d tensors mapped)", version, path, len(mapped))
    return ForeignCheckpoint(config=config, state=state, vocab=vocab, report=report, resources=resources)


# ---------------------------------------------------------------------------------------- config
def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / CONFIG
    if not cfg.exists():
        raise CheckpointError(f"{path} has no {CONFIG}; a Geneformer directory needs the BERT config.json.")
    data = read_json(cfg, what="Geneformer (BERT) config", error=CheckpointError)
    if not isinstance(data, dict) or data.get("model_type") != "bert":
        kind = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{cfg} has model_type {kind!r}; a Geneformer checkpoint is a BERT ('bert') model."
        )
    return data


def _encoder_config(hf: dict[str, Any], path: Path, notes: list[str]) -> tuple[EncoderConfig, dict[str, Any]]:
    """EncoderConfig from a BERT config.json, and the BERT values used (defaults filled in)."""
    cfg = path / CONFIG
    missing = [k for k in _REQUIRED_CONFIG if k not in hf]
    if missing:
        raise CheckpointError(f"{cfg} lacks {missing}; these BERT settings are required to build the model.")
    used = {k: hf[k] for k in _REQUIRED_CONFIG}
    defaulted = []
    for key, default in _BERT_DEFAULTS.items():
        if hf.get(key) is None:
            used[key] = default
            defaulted.append(key)
        else:
            used[key] = hf[key]
    if defaulted:
        notes.append(f"config.json leaves out {defaulted}; Hugging Face BERT defaults used")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _hf_check(cfg, key, used[key], "a positive integer", lambda v: _is_int(v) and v >= 1)
    for key in ("max_position_embeddings", "type_vocab_size", "pad_token_id"):
        _hf_check(cfg, key, used[key], "an integer >= 0", lambda v: _is_int(v) and v >= 0)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps"):
        _hf_check(
            cfg, key, used[key], "a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
        )
    act = used["hidden_act"]
    if not isinstance(act, str) or act not in ("relu", "gelu"):
        raise CheckpointError(
            f"{cfg}: hidden_act={act!r} is not supported; cellkit's BERT core implements 'relu' and 'gelu' "
            "(exact erf GELU). Geneformer models use 'relu' (V1) or 'gelu' (V2)."
        )
    if not isinstance(used["position_embedding_type"], str) or used["position_embedding_type"] != "absolute":
        raise CheckpointError(
            f"{cfg}: position_embedding_type={used['position_embedding_type']!r} is not supported; "
            "cellkit implements BERT's learned 'absolute' position embeddings (all Geneformer models)."
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"{cfg}: {flag}=true is not supported; Geneformer is a BERT encoder.")
    if hf.get("tie_word_embeddings") is False:
        notes.append("config.json has tie_word_embeddings=false")
    try:
        encoder = bert_encoder_config(
            int(used["vocab_size"]),
            d_model=int(used["hidden_size"]),
            n_heads=int(used["num_attention_heads"]),
            n_layers=int(used["num_hidden_layers"]),
            d_ff=int(used["intermediate_size"]),
            activation=act,
            dropout=float(used["hidden_dropout_prob"]),
            attention_dropout=float(used["attention_probs_dropout_prob"]),
            pad_token_id=int(used["pad_token_id"]),
            max_position_embeddings=int(used["max_position_embeddings"]),
            type_vocab_size=int(used["type_vocab_size"]),
            layer_norm_eps=float(used["layer_norm_eps"]),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg} describes an architecture cellkit cannot build: {exc}") from None
    return encoder, used


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hf_check(cfg: Path, key: str, value: Any, want: str, ok: Any) -> None:
    if not ok(value):
        raise CheckpointError(
            f"{cfg}: {key}={value!r:.80} must be {want}. Fix the value if the file was edited."
        )


# ---------------------------------------------------------------------------------------- dictionaries
def _find_dictionary(path: Path, name: str, given: str | os.PathLike[str] | None) -> Path | None:
    pattern = _DICTIONARIES[name][0]
    if given is not None:
        file = Path(given)
        if not file.is_file():
            raise CheckpointError(f"{name}={str(given)!r} does not exist or is not a file.")
        return file
    found = sorted(p for p in path.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise CheckpointError(
            f"{path} holds several {pattern} files ({', '.join(p.name for p in found)}); "
            f"pass the one matching this model explicitly, e.g. load_model(path, {name}='{found[0]}')."
        )
    if found:
        return found[0]
    if name == "token_dictionary":
        nearby = [
            str(p)
            for root in (path / "geneformer", path.parent / "geneformer")
            if root.is_dir()
            for p in sorted(root.rglob(pattern))
        ][:6]
        hint = f" Candidates nearby: {nearby}." if nearby else ""
        raise CheckpointError(
            f"No token dictionary ({pattern}) in {path}. Geneformer keeps its dictionaries in the "
            "repository's geneformer/ folder (V1: gene_dictionaries_30m/token_dictionary_gc30M.pkl, "
            "V2: token_dictionary_gc104M.pkl); pass the one matching this model with "
            f"token_dictionary='…/token_dictionary_gc104M.pkl' or copy it into the model directory.{hint}"
        )
    return None


def _plain(value: Any, file: Path, key: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CheckpointError(
            f"{file}: entry {key!r} has a value of type {type(value).__name__}; expected a number or a string."
        )
    return value


def _load_dict(file: Path) -> dict[Any, Any]:
    data = safe_load_pickle(file)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{file} holds a {type(data).__name__}; a Geneformer dictionary is a dict.")
    return dict(data)


def _read_table(file: Path, *, want_float: bool) -> dict[str, Any]:
    """A dictionary pickle as a plain JSON-able ``{str: int|float|str}``."""
    out: dict[str, Any] = {}
    for key, value in _load_dict(file).items():
        value = _plain(value, file, key)
        if want_float:
            if isinstance(value, str):
                raise CheckpointError(f"{file}: gene {key!r} has a non-numeric median {value!r}.")
            value = float(value)
        out[str(_plain(key, file, key))] = value
    return out


def _read_vocab(file: Path) -> GeneVocab:
    table = _load_dict(file)
    mapping: dict[str, int] = {}
    for key, value in table.items():
        value = _plain(value, file, key)
        if not isinstance(value, int):
            raise CheckpointError(f"{file}: token {key!r} has a non-integer id {value!r}.")
        mapping[str(_plain(key, file, key))] = value
    if _SPECIAL_TOKENS["pad"] not in mapping:
        raise CheckpointError(
            f"{file} has no '<pad>' token; it is not a Geneformer token dictionary "
            "(expected '<pad>', '<mask>' and Ensembl gene ids)."
        )
    specials = {role: tok for role, tok in _SPECIAL_TOKENS.items() if tok in mapping}
    try:
        return GeneVocab.from_dict(mapping, specials=specials)
    except VocabError as exc:
        raise VocabError(f"{file}: {exc}") from None


# ---------------------------------------------------------------------------------------- weights
def _read_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    if (path / SAFETENSORS).is_file():
        return _read_safetensors(path / SAFETENSORS), path / SAFETENSORS
    if (path / SAFETENSORS_INDEX).is_file():
        return _read_sharded(path / SAFETENSORS_INDEX), path / SAFETENSORS_INDEX
    if (path / TORCH_BIN).is_file():
        return _read_torch_bin(path / TORCH_BIN), path / TORCH_BIN
    present = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(
        f"{path} has no weights: expected {SAFETENSORS} (or {SAFETENSORS_INDEX} with its shards) or "
        f"{TORCH_BIN} next to {CONFIG}; the directory holds {present}. Download the model's weights file too."
    )


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{file} cannot be read as safetensors ({exc}); it is truncated or corrupt — download it again."
        ) from None


def _read_sharded(index: Path) -> dict[str, Tensor]:
    doc = read_json(index, what="safetensors index", expect=dict, error=CheckpointError)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: field 'weight_map' must be an object {{tensor name: shard file name}}, got {weight_map!r:.80}."
        )
    shards = sorted(set(weight_map.values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        file = index.parent / str(shard)
        if Path(str(shard)).name != str(shard) or not file.is_file():
            raise CheckpointError(f"{index} lists shard {shard!r}, which is not a file in {index.parent}.")
        state.update(_read_safetensors(file))
    return state


def _read_torch_bin(file: Path) -> dict[str, Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file} was refused: it contains objects other than tensors ({first[:300]}). cellkit loads "
            "pytorch_model.bin only with torch.load(weights_only=True) and never executes code from it; "
            f"convert trusted weights to {SAFETENSORS} or obtain the file from a trusted source."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{file} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); it is truncated or corrupt — "
            "download it again."
        ) from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict ({{name: tensor}}).")
    return dict(data)


# ---------------------------------------------------------------------------------------- key mapping
def _normalise(key: str) -> str:
    """Drop the ``bert.`` prefix and rename TF-era ``LayerNorm.gamma/beta``."""
    key = key.removeprefix("bert.")
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def _expected_shapes(c: EncoderConfig, untied: bool) -> dict[str, tuple[int, ...]]:
    d, f, v = c.d_model, c.d_ff, c.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embeddings.position.weight": (c.max_position_embeddings, d),
        "encoder.embeddings.token_type.weight": (c.type_vocab_size, d),
        "encoder.embeddings.norm.weight": (d,),
        "encoder.embeddings.norm.bias": (d,),
        "heads.mlm.dense.weight": (d, d),
        "heads.mlm.dense.bias": (d,),
        "heads.mlm.norm.weight": (d,),
        "heads.mlm.norm.bias": (d,),
    }
    if untied:
        shapes["heads.mlm.decoder.weight"] = (v, d)
    for i in range(c.n_layers):
        p = f"encoder.layers.{i}."
        shapes |= {
            p + "self_attn.qkv.weight": (3 * d, d),
            p + "self_attn.qkv.bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (f, d),
            p + "linear1.bias": (f,),
            p + "linear2.weight": (d, f),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    return shapes


@dataclass
class _StateMap:
    """The tensors of one weights file on their way to cellkit keys (the working state of :func:`_map_state`)."""

    raw: dict[str, Tensor]
    by_norm: dict[str, str]  # normalised key -> file key
    state: dict[str, Tensor] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)  # file key -> cellkit key
    ignored: dict[str, str] = field(default_factory=dict)  # file key -> reason
    qkv: dict[tuple[int, str], dict[str, str]] = field(
        default_factory=dict
    )  # (layer, weight|bias) -> {q|k|v: key}
    layers_seen: set[int] = field(default_factory=set)
    mlm_present: bool = False
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def put(self, norm: str, target: str) -> None:
        """Map the tensor with normalised key ``norm`` to ``target``, unchanged."""
        self.place(self.by_norm[norm], target)

    def place(self, key: str, target: str) -> None:
        """Map the tensor with file key ``key`` to ``target``, unchanged."""
        self.state[target] = self.raw[key]
        self.mapped[key] = target


def _map_state(
    raw: dict[str, Tensor], c: EncoderConfig, weights_file: Path, config_file: Path, hf: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str], bool | None]:
    """Rename BERT tensors to cellkit keys.

    Returns the state, ``{file key: cellkit key}``, ``{file key: reason}`` and the MLM head's
    ``tied`` option (``None`` when the file has no MLM head).
    """
    m = _StateMap(raw, _by_normalised_key(raw, weights_file))
    _refuse_classifier(m.by_norm, weights_file)
    for norm, key in m.by_norm.items():
        _sort_tensor(m, norm, key, c)
    _check_layers_and_unknown(m, c, weights_file, config_file)
    for i in range(c.n_layers):
        _pack_qkv(m, i, weights_file)
        _note_missing_layer_tensors(m, i)
    m.missing += [k for k in _EMBEDDING_KEYS if k not in m.by_norm]
    if c.max_position_embeddings == 0:
        m.missing = [k for k in m.missing if "position_embeddings" not in k]
    tied: bool | None = None
    if m.mlm_present:
        m.missing += [k for k in _MLM_KEYS if k not in m.by_norm]
        _map_mlm_bias(m, hf, weights_file)
        tied = _map_mlm_decoder(m, hf)
    if m.missing:
        raise CheckpointError(
            f"{weights_file} lacks tensors the architecture in {config_file} needs: {sorted(m.missing)[:12]}"
            + (f" … (+{len(m.missing) - 12} more)" if len(m.missing) > 12 else "")
            + ". The file is incomplete or config.json does not describe it."
        )
    _check_shapes(m, c, tied, weights_file, config_file)
    return m.state, m.mapped, m.ignored, tied


def _by_normalised_key(raw: dict[str, Tensor], weights_file: Path) -> dict[str, str]:
    """``{normalised key: file key}``; two file keys that name the same tensor are refused."""
    by_norm: dict[str, str] = {}
    for key in raw:
        norm = _normalise(key)
        if norm in by_norm:
            raise CheckpointError(
                f"{weights_file} holds both {by_norm[norm]!r} and {key!r}, which name the same tensor."
            )
        by_norm[norm] = key
    return by_norm


def _refuse_classifier(by_norm: dict[str, str], weights_file: Path) -> None:
    """Fine-tuned classifier checkpoints are not supported (yet): say so and how to get a classifier."""
    classifier = sorted(k for n, k in by_norm.items() if n.startswith("classifier."))
    if classifier:
        raise CheckpointError(
            f"{weights_file} is a fine-tuned Geneformer classifier (keys {classifier}); fine-tuned "
            "classifier heads (BertForSequenceClassification / BertForTokenClassification) are not "
            "supported yet. Load the pretrained Geneformer model instead and add a head with "
            "load_model(path, heads={'classifier': {'n_classes': …}})."
        )


def _sort_tensor(m: _StateMap, norm: str, key: str, c: EncoderConfig) -> None:
    """Map, ignore, set aside (query/key/value, MLM biases and decoder) or mark unknown one file tensor."""
    if norm in _EMBEDDING_KEYS:
        m.put(norm, _EMBEDDING_KEYS[norm])
        return
    reason = next((why for pre, why in _IGNORED_PREFIXES.items() if norm.startswith(pre)), None)
    if reason is not None:
        m.ignored[key] = reason
        return
    if norm.startswith("cls.predictions."):
        m.mlm_present = True
        if norm in _MLM_KEYS:
            m.put(norm, _MLM_KEYS[norm])
        elif norm not in (_MLM_BIAS, _MLM_DECODER_BIAS, _MLM_DECODER_WEIGHT):
            m.unknown.append(key)
        return
    match = _LAYER_RE.match(norm)
    if match is None:
        m.unknown.append(key)
        return
    _sort_layer_tensor(m, norm, key, int(match.group(1)), match.group(2), c)


def _sort_layer_tensor(m: _StateMap, norm: str, key: str, i: int, sub: str, c: EncoderConfig) -> None:
    """One tensor of encoder layer ``i`` (``sub`` is its key inside the layer)."""
    m.layers_seen.add(i)
    module, _, param = sub.rpartition(".")
    if i >= c.n_layers:
        return  # reported with the layer count
    if param not in ("weight", "bias"):
        m.unknown.append(key)
    elif module.startswith("attention.self.") and module.removeprefix("attention.self.") in _QKV:
        m.qkv.setdefault((i, param), {})[module.removeprefix("attention.self.")] = key
    elif module in _LAYER_KEYS:
        m.put(norm, f"encoder.layers.{i}.{_LAYER_KEYS[module]}.{param}")
    else:
        m.unknown.append(key)


def _check_layers_and_unknown(m: _StateMap, c: EncoderConfig, weights_file: Path, config_file: Path) -> None:
    """No layer beyond the config's count, and no tensor cellkit does not know how to use."""
    if m.layers_seen and max(m.layers_seen) >= c.n_layers:
        raise CheckpointError(
            f"{weights_file} has tensors for {max(m.layers_seen) + 1} layers (encoder.layer.0 … "
            f"encoder.layer.{max(m.layers_seen)}) but {config_file} says num_hidden_layers={c.n_layers}; "
            "the config does not describe these weights."
        )
    if m.unknown:
        shown = sorted(m.unknown)
        raise CheckpointError(
            f"{weights_file} holds tensors cellkit does not know how to use: {shown[:12]}"
            + (f" … (+{len(shown) - 12} more)" if len(shown) > 12 else "")
            + ". cellkit reads Geneformer's BertForMaskedLM / BertModel checkpoints; this file has another "
            "architecture and was not loaded."
        )


def _pack_qkv(m: _StateMap, i: int, weights_file: Path) -> None:
    """Layer ``i``'s query/key/value -> one packed projection, rows [q; k; v] (absent parts noted missing)."""
    for param in ("weight", "bias"):
        parts = m.qkv.get((i, param), {})
        absent = [n for n in _QKV if n not in parts]
        if absent:
            m.missing += [f"encoder.layer.{i}.attention.self.{n}.{param}" for n in absent]
            continue
        shapes = {tuple(m.raw[parts[n]].shape) for n in _QKV}
        if len(shapes) != 1:
            raise CheckpointError(
                f"{weights_file}: layer {i} query/key/value {param}s have different shapes {sorted(shapes)}."
            )
        target = f"encoder.layers.{i}.self_attn.qkv.{param}"
        m.state[target] = torch.cat([m.raw[parts[n]] for n in _QKV], dim=0)
        for n in _QKV:
            m.mapped[parts[n]] = target


def _note_missing_layer_tensors(m: _StateMap, i: int) -> None:
    """Note the weights and biases of layer ``i``'s other modules that the file lacks."""
    for module in _LAYER_KEYS:
        m.missing += [
            f"encoder.layer.{i}.{module}.{p}"
            for p in ("weight", "bias")
            if f"encoder.layer.{i}.{module}.{p}" not in m.by_norm
        ]


def _map_mlm_bias(m: _StateMap, hf: dict[str, Any], weights_file: Path) -> None:
    """The MLM output bias: BERT's ``cls.predictions.bias`` or its decoder copy (one tensor, unless untied)."""
    bias_key = m.by_norm.get(_MLM_BIAS)
    dec_bias_key = m.by_norm.get(_MLM_DECODER_BIAS)
    if bias_key is not None and dec_bias_key is not None and not _same(m.raw[dec_bias_key], m.raw[bias_key]):
        if hf.get("tie_word_embeddings") is not False:
            raise CheckpointError(
                f"{weights_file}: {dec_bias_key} differs from {bias_key}; in BERT they are one tensor, "
                "so the file is inconsistent."
            )
        # transformers >= 5 unties the two biases with tie_word_embeddings=false and applies the decoder's
        m.place(dec_bias_key, "heads.mlm.bias")
        m.ignored[bias_key] = (
            f"unused: with tie_word_embeddings=false, transformers applies {dec_bias_key} instead"
        )
    elif bias_key is not None:
        m.place(bias_key, "heads.mlm.bias")
        if dec_bias_key is not None:
            m.ignored[dec_bias_key] = f"duplicate of {bias_key} (BERT shares the decoder bias)"
    elif dec_bias_key is not None:
        m.place(dec_bias_key, "heads.mlm.bias")
    else:
        m.missing.append(_MLM_BIAS)


def _map_mlm_decoder(m: _StateMap, hf: dict[str, Any]) -> bool:
    """The MLM decoder weight; returns whether it is tied to the word embeddings."""
    dec_key = m.by_norm.get(_MLM_DECODER_WEIGHT)
    word = m.state.get("encoder.embeddings.gene.weight")
    if dec_key is None:
        if hf.get("tie_word_embeddings") is False:
            m.missing.append(_MLM_DECODER_WEIGHT)
        return True
    if word is not None and _same(m.raw[dec_key], word):
        m.ignored[dec_key] = "tied to the word embeddings (identical tensor); cellkit shares one weight"
        return True
    m.place(dec_key, "heads.mlm.decoder.weight")
    return False


def _check_shapes(
    m: _StateMap, c: EncoderConfig, tied: bool | None, weights_file: Path, config_file: Path
) -> None:
    """Every mapped tensor against config.json's shapes (naming the file key), floating point."""
    state = m.state
    expected = _expected_shapes(c, untied=tied is False)
    word_rows = state["encoder.embeddings.gene.weight"].shape
    if tuple(word_rows) != (c.vocab_size, c.d_model):
        raise CheckpointError(
            f"{config_file} says vocab_size={c.vocab_size:,}, hidden_size={c.d_model} but the word embeddings "
            f"in {weights_file} have shape {tuple(word_rows)} ({word_rows[0]:,} rows); the config does not "
            "describe these weights."
        )
    file_key = {t: k for k, t in m.mapped.items()}
    for target, tensor in state.items():
        want = expected.get(target)
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{weights_file}: {file_key.get(target, target)} has shape {tuple(tensor.shape)} but "
                f"{config_file} implies {want}; the config does not describe these weights."
            )
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{weights_file}: {file_key.get(target, target)} is not a floating-point tensor."
            )
    if "heads.mlm.bias" in state and state["heads.mlm.bias"].shape != (word_rows[0],):
        raise CheckpointError(
            f"{weights_file}: {file_key['heads.mlm.bias']} has shape {tuple(state['heads.mlm.bias'].shape)} "
            f"but the word embeddings have {word_rows[0]} rows."
        )


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.dtype)))
