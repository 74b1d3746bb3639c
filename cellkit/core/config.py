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
from dataclasses import dataclass, field
from typing import Any, Literal

from cellkit._errors import ConfigError

__all__ = ["EncoderConfig"]

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
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        choices = {
            "activation": ("relu", "gelu"),
            "norm_scheme": ("post", "pre"),
            "value_encoder": ("none", "continuous", "category", "scaling"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.value_encoder == "category" and self.n_value_bins < 1:
            problems.append("value_encoder='category' needs n_value_bins >= 1")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            problems.append(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        for name in ("max_position_embeddings", "type_vocab_size", "n_batch_labels", "n_value_bins"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
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
        """Build from :meth:`to_dict` output; unknown keys are an error (strict)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown EncoderConfig keys {unknown}; this file was written by a newer or different "
                f"cellkit. Known keys: {sorted(known)}."
            )
        return cls(**data)

    def to_json(self) -> str:
        """JSON text (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
