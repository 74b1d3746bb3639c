"""Architecture-only configuration of the cellkit transformer core.

:class:`EncoderConfig` describes *what the network is*, never how it is run: device, batch size,
attention backend, learning rate and so on are call arguments. One config expresses the three
families cellkit loads:

========================  ==========================================================================
family                    typical settings
========================  ==========================================================================
scGPT TransformerModel    ``gene_norm=True``, ``value_encoder="continuous"`` (or category/scaling),
                          no positions, ``embedding_norm=False``, post-norm, ReLU, eps 1e-5
Geneformer (HF BERT)      ``gene_norm=False``, no values, ``max_position_embeddings=2048/4096``,
                          ``type_vocab_size=2``, ``embedding_norm=True``, post-norm, eps 1e-12
PerturbGene GeneBert      no values, no positions, ``type_vocab_size`` = gene types,
                          ``embedding_norm=True``, post-norm, GELU, eps 1e-12
========================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from cellkit._errors import ConfigError
from cellkit._utils import parse_json

__all__ = ["EncoderConfig", "bert_encoder_config"]

ValueEncoderKind = Literal["none", "continuous", "category", "scaling"]
NormScheme = Literal["post", "pre"]
Activation = Literal["relu", "gelu"]


@dataclass
class EncoderConfig:
    """Architecture of the transformer core (serialises to/from JSON).

    Parameters
    ----------
    vocab_size
        Number of rows of the gene-token embedding.
    d_model
        Hidden size.
    n_heads
        Attention heads; ``d_model`` must be divisible by it.
    n_layers
        Encoder layers.
    d_ff
        Feed-forward width (scGPT's ``d_hid``; BERT's ``intermediate_size``).
    activation
        Feed-forward activation.
    norm_scheme
        ``"post"`` (``x = LN(x + f(x))``, scGPT/BERT) or ``"pre"`` (``x = x + f(LN(x))``).
    final_norm
        Apply a LayerNorm after the last layer (usual with pre-norm).
    layer_norm_eps
        Epsilon of every LayerNorm in the core.
    dropout
        Dropout on embeddings, residual branches and the feed-forward hidden layer.
    attention_dropout
        Dropout on attention probabilities.
    pad_token_id
        Row of the gene embedding used for padding (``padding_idx``; its gradient is zero).
    gene_norm
        LayerNorm right after the gene-token embedding (scGPT's ``encoder.enc_norm``).
    value_encoder
        How expression values enter: ``"continuous"`` (Linear-ReLU-Linear-LayerNorm-Dropout on the
        value clamped from above at ``value_max``), ``"category"`` (binned values as embedding ids),
        ``"scaling"`` (gene embedding multiplied by the value) or ``"none"``.
    value_max
        Upper clamp of the continuous value encoder (values below are untouched, so mask/pad
        sentinels such as -1/-2 pass through).
    n_value_bins
        Rows of the category value embedding (scGPT: ``n_bins + 2``).
    value_pad_id
        ``padding_idx`` of the category value embedding (scGPT: ``pad_value``).
    max_position_embeddings
        Learned absolute position embeddings when > 0 (Geneformer: the rank).
    type_vocab_size
        Token-type embeddings when > 0 (BERT segment ids; PerturbGene gene identity).
    embedding_norm
        LayerNorm on the summed embeddings (BERT style).
    embedding_dropout
        Apply dropout to the summed embeddings (BERT style; scGPT has none there).
    n_batch_labels
        Size of the batch-label embedding (scGPT ``batch_encoder``) when > 0. The embedding is *not*
        added to the input; heads concatenate it.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 12
    d_ff: int = 512
    activation: Activation = "relu"
    norm_scheme: NormScheme = "post"
    final_norm: bool = False
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    gene_norm: bool = True
    value_encoder: ValueEncoderKind = "continuous"
    value_max: float = 512.0
    n_value_bins: int = 0
    value_pad_id: int | None = None
    max_position_embeddings: int = 0
    type_vocab_size: int = 0
    embedding_norm: bool = False
    embedding_dropout: bool = False
    n_batch_labels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems: list[str] = []
        ok = {name: _check_field(self, name, kind, problems) for name, kind in _FIELD_KINDS.items()}
        if ok["d_model"] and ok["n_heads"] and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        choices = {
            "activation": ("relu", "gelu"),
            "norm_scheme": ("post", "pre"),
            "value_encoder": ("none", "continuous", "category", "scaling"),
        }
        for name, allowed in choices.items():
            if ok[name] and getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dropout", "attention_dropout"):
            if ok[name] and not 0.0 <= float(getattr(self, name)) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if (
            ok["value_encoder"]
            and ok["n_value_bins"]
            and self.value_encoder == "category"
            and self.n_value_bins < 1
        ):
            problems.append("value_encoder='category' needs n_value_bins >= 1")
        if (
            ok["pad_token_id"]
            and ok["vocab_size"]
            and self.pad_token_id is not None
            and not 0 <= self.pad_token_id < self.vocab_size
        ):
            problems.append(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if (
            ok["value_pad_id"]
            and ok["n_value_bins"]
            and self.value_pad_id is not None
            and self.n_value_bins > 0
            and not 0 <= self.value_pad_id < self.n_value_bins
        ):
            problems.append(
                f"value_pad_id {self.value_pad_id} is outside 0 … {self.n_value_bins - 1} (n_value_bins)"
            )
        if ok["layer_norm_eps"] and self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if problems:
            raise ConfigError("Invalid EncoderConfig: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def uses_values(self) -> bool:
        """Whether the forward pass needs expression values."""
        return self.value_encoder != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """Build from :meth:`to_dict` output; unknown keys, missing required keys and values of the
        wrong type are errors (strict), each naming the field.
        """
        if not isinstance(data, dict):
            raise ConfigError(
                f"An EncoderConfig is a JSON object / dict of fields, got {type(data).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(
                f"Unknown EncoderConfig keys {unknown}; this file was written by a newer or different "
                f"cellkit. Known keys: {sorted(known)}."
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"Invalid EncoderConfig: required field(s) {missing} missing.")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """Inverse of :meth:`to_json` (nesting and size bounded; errors are :class:`cellkit.ConfigError`)."""
        data = parse_json(
            text, what="EncoderConfig JSON", max_bytes=_MAX_JSON_CHARS, expect=dict, error=ConfigError
        )
        return cls.from_dict(data)


def bert_encoder_config(
    vocab_size: int,
    *,
    d_model: int,
    n_heads: int,
    n_layers: int,
    d_ff: int,
    activation: Activation,
    dropout: float,
    pad_token_id: int | None,
    max_position_embeddings: int,
    type_vocab_size: int,
    attention_dropout: float | None = None,
    layer_norm_eps: float = 1e-12,
) -> EncoderConfig:
    """The core configuration of a BERT-family encoder (Geneformer's BERT, PerturbGene's DistilBERT).

    The one place that says what "BERT-like" means in :class:`EncoderConfig` terms: post-norm
    layers, no expression values, no LayerNorm on the gene embedding, learned absolute positions
    (``max_position_embeddings > 0``) and/or token types (``type_vocab_size > 0``) added to the
    token embedding, then LayerNorm and dropout on the sum.

    Parameters
    ----------
    vocab_size, d_model, n_heads, n_layers, d_ff
        BERT's ``vocab_size``, ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers`` and
        ``intermediate_size``.
    activation
        Feed-forward activation (BERT's ``hidden_act``).
    dropout
        Hidden dropout (BERT's ``hidden_dropout_prob``).
    pad_token_id
        Row of the token embedding used for padding.
    max_position_embeddings
        Learned absolute positions (0: none, as in PerturbGene).
    type_vocab_size
        Token-type embeddings (BERT segments: 2; PerturbGene: gene identities).
    attention_dropout
        Dropout on attention probabilities (default: ``dropout``).
    layer_norm_eps
        Epsilon of every LayerNorm (BERT: 1e-12).

    Returns
    -------
    EncoderConfig

    Raises
    ------
    ConfigError
        For invalid sizes (see :class:`EncoderConfig`).
    """
    return EncoderConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=d_ff,
        activation=activation,
        norm_scheme="post",
        layer_norm_eps=layer_norm_eps,
        dropout=dropout,
        attention_dropout=dropout if attention_dropout is None else attention_dropout,
        pad_token_id=pad_token_id,
        gene_norm=False,
        value_encoder="none",
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        embedding_norm=True,
        embedding_dropout=True,
    )


_MAX_JSON_CHARS = 1_000_000

#: field -> kind checked before any value check: "pos" (int >= 1), "nonneg" (int >= 0),
#: "int?" (int or None), "num" (finite real), "bool", "str", "dict"
_FIELD_KINDS: dict[str, str] = {
    "vocab_size": "pos",
    "d_model": "pos",
    "n_heads": "pos",
    "n_layers": "pos",
    "d_ff": "pos",
    "activation": "str",
    "norm_scheme": "str",
    "final_norm": "bool",
    "layer_norm_eps": "num",
    "dropout": "num",
    "attention_dropout": "num",
    "pad_token_id": "int?",
    "gene_norm": "bool",
    "value_encoder": "str",
    "value_max": "num",
    "n_value_bins": "nonneg",
    "value_pad_id": "int?",
    "max_position_embeddings": "nonneg",
    "type_vocab_size": "nonneg",
    "embedding_norm": "bool",
    "embedding_dropout": "bool",
    "n_batch_labels": "nonneg",
    "extra": "dict",
}


def _check_field(cfg: EncoderConfig, name: str, kind: str, problems: list[str]) -> bool:
    """Append a problem when ``cfg.<name>`` has the wrong type; True when it is usable."""
    value = getattr(cfg, name)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):  # numpy integers
        value = int(value)
        setattr(cfg, name, value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool | int | float):  # numpy floats
        value = float(value)
        setattr(cfg, name, value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "pos":
        ok = is_int and value >= 1
        want = "a positive integer"
    elif kind == "nonneg":
        ok = is_int and value >= 0
        want = "an integer >= 0"
    elif kind == "int?":
        ok = value is None or (is_int and value >= 0)
        want = "an integer >= 0 or null"
    elif kind == "num":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == "str":
        ok = isinstance(value, str)
        want = "a string"
    else:
        ok = isinstance(value, dict)
        want = "an object (dict)"
    if not ok:
        problems.append(f"{name} must be {want}, got {value!r:.80}")
    return ok
