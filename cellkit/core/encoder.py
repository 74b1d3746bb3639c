"""The transformer encoder: one layer class, one stack, one forward.

Shapes: ``B`` cells, ``L`` tokens per cell (padded), ``d`` hidden size, ``H`` heads,
``T`` real (unpadded) tokens in a batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellkit._errors import ConfigError

from .attention import ATTN_BACKENDS, MultiheadSelfAttention
from .config import EncoderConfig
from .embeddings import BatchLabelEmbedding, CellEmbeddings
from .outputs import EncoderOutput
from .varlen import pack, unpack, varlen_kernel_available

__all__ = ["CellEncoder", "EncoderLayer"]


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward block, post-norm or pre-norm.

    post: ``x = LN1(x + Drop(Attn(x)))``; ``x = LN2(x + Drop(W2 · Drop(act(W1 · x))))``
    pre:  ``x = x + Drop(Attn(LN1(x)))``; ``x = x + Drop(W2 · Drop(act(W1 · LN2(x))))``
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.norm_first = c.norm_scheme == "pre"
        self.self_attn = MultiheadSelfAttention(c.d_model, c.n_heads, dropout=c.attention_dropout)
        self.linear1 = nn.Linear(c.d_model, c.d_ff)
        self.linear2 = nn.Linear(c.d_ff, c.d_model)
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.activation = F.gelu if c.activation == "gelu" else F.relu

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        backend: str = "sdpa",
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(B, L, d) -> (B, L, d)`` and optionally ``(B, H, L, L)`` probabilities."""
        if self.norm_first:
            a, probs = self.self_attn(self.norm1(x), padding_mask, backend=backend, need_weights=need_weights)
            x = x + self.dropout(a)
            x = x + self._ff(self.norm2(x))
        else:
            a, probs = self.self_attn(x, padding_mask, backend=backend, need_weights=need_weights)
            x = self.norm1(x + self.dropout(a))
            x = self.norm2(x + self._ff(x))
        return x, probs

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, impl: str) -> Tensor:
        """The same block on packed tokens ``(T, d)``."""
        if self.norm_first:
            x = x + self.dropout(
                self.self_attn.forward_packed(self.norm1(x), cu_seqlens, max_seqlen, impl=impl)
            )
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout(self.self_attn.forward_packed(x, cu_seqlens, max_seqlen, impl=impl)))
        return self.norm2(x + self._ff(x))


class CellEncoder(nn.Module):
    """The cellkit transformer core: embeddings + ``n_layers`` encoder layers.

    Parameters
    ----------
    config
        Architecture (see :class:`~cellkit.core.EncoderConfig`).

    Examples
    --------
    >>> import torch
    >>> from cellkit.core import CellEncoder, EncoderConfig
    >>> enc = CellEncoder(EncoderConfig(vocab_size=100, d_model=32, n_heads=4, n_layers=2, d_ff=64))
    >>> ids = torch.randint(0, 100, (3, 7)); vals = torch.rand(3, 7)
    >>> enc(ids, vals).last_hidden_state.shape
    torch.Size([3, 7, 32])
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CellEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.final_norm else None
        )
        self.batch_embedding = (
            BatchLabelEmbedding(config.n_batch_labels, config.d_model, eps=config.layer_norm_eps)
            if config.n_batch_labels
            else None
        )

    def embed(
        self,
        gene_ids: Tensor,
        values: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Input embeddings ``(B, L, d)`` and the gene-token part alone (see :class:`CellEmbeddings`)."""
        return self.embeddings(gene_ids, values, position_ids=position_ids, token_type_ids=token_type_ids)

    def encode(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        attn_backend: str = "sdpa",
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        layers: int | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """Run the layer stack on embeddings ``x`` ``(B, L, d)``.

        ``layers`` stops after that many layers (``final_norm`` is then not applied). Returns the
        last hidden state, the hidden states (embeddings first) and the attention probabilities.
        """
        if attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"Unknown attn_backend {attn_backend!r}; choose one of {ATTN_BACKENDS}.")
        n_run = self._n_layers_to_run(layers)
        padding_mask = _checked_padding_mask(padding_mask, x)
        if attn_backend in ("flash", "varlen") and not output_attentions:
            return self._encode_packed(x, padding_mask, attn_backend, output_hidden_states, n_run)
        if attn_backend == "native" and not output_attentions:
            if self.training and torch.is_grad_enabled():
                raise ConfigError(
                    "attn_backend='native' is an inference path; call model.eval() and use torch.no_grad()."
                )
            if self._native_applies(x):
                return self._encode_native(x, padding_mask, output_hidden_states, n_run)
        if attn_backend in ("flash", "varlen", "native"):
            attn_backend = "sdpa"  # probabilities need the padded explicit path
        return self._encode_padded(
            x, padding_mask, attn_backend, output_hidden_states, output_attentions, n_run
        )

    def _n_layers_to_run(self, layers: int | None) -> int:
        """How many layers ``encode(layers=...)`` runs: all of them, or a checked prefix."""
        n_run = len(self.layers) if layers is None else layers
        if not 0 <= n_run <= len(self.layers):
            raise ConfigError(f"layers={layers} is out of range: this model has {len(self.layers)} layers.")
        return n_run

    def _encode_padded(
        self,
        x: Tensor,
        padding_mask: Tensor | None,
        attn_backend: str,
        output_hidden_states: bool,
        output_attentions: bool,
        n_run: int,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """The explicit padded path, one layer at a time (the only one that returns probabilities)."""
        hidden: list[Tensor] = [x] if output_hidden_states else []
        attns: list[Tensor] = []
        for layer in self.layers[:n_run]:
            x, probs = layer(x, padding_mask, backend=attn_backend, need_weights=output_attentions)
            if output_hidden_states:
                hidden.append(x)
            if output_attentions:
                attns.append(probs)
        if self.final_norm is not None and n_run == len(self.layers):
            x = self.final_norm(x)
            if output_hidden_states:
                hidden[-1] = x
        return (
            x,
            (tuple(hidden) if output_hidden_states else None),
            (tuple(attns) if output_attentions else None),
        )

    def _native_layers(self) -> list[nn.TransformerEncoderLayer]:
        """torch ``nn.TransformerEncoderLayer`` views that *share* this encoder's parameters."""
        cached = self.__dict__.get("_native_cache")
        if cached is not None:
            return cached
        c = self.config
        views = []
        for layer in self.layers:
            t = nn.TransformerEncoderLayer(
                c.d_model,
                c.n_heads,
                c.d_ff,
                dropout=0.0,
                activation=c.activation,
                layer_norm_eps=c.layer_norm_eps,
                batch_first=True,
                norm_first=c.norm_scheme == "pre",
                device=layer.linear1.weight.device,
                dtype=layer.linear1.weight.dtype,
            )
            t.self_attn.in_proj_weight = layer.self_attn.qkv.weight
            t.self_attn.in_proj_bias = layer.self_attn.qkv.bias
            for mine, theirs in (
                (layer.self_attn.out_proj, t.self_attn.out_proj),
                (layer.linear1, t.linear1),
                (layer.linear2, t.linear2),
                (layer.norm1, t.norm1),
                (layer.norm2, t.norm2),
            ):
                theirs.weight, theirs.bias = mine.weight, mine.bias
            views.append(t.eval())
        self.__dict__["_native_cache"] = views  # plain attribute: not a submodule, not in state_dict
        return views

    def _apply(self, fn, recurse=True):  # device/dtype moves: rebuild the native views lazily
        self.__dict__.pop("_native_cache", None)
        return super()._apply(fn, recurse)

    def _native_applies(self, x: Tensor) -> bool:
        """Whether torch's fused encoder-layer fast path accepts this call (else fall back to SDPA)."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.layers.parameters())
        return (
            not self.training
            and not grad
            and self.config.n_heads % 2 == 0
            and not torch.is_autocast_enabled(x.device.type)
            and x.device.type in ("cpu", "cuda")
        )

    def _encode_native(
        self, x: Tensor, padding_mask: Tensor | None, output_hidden_states: bool, n_run: int
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, None]:
        # torch's own inference fast path (nested tensors + fused encoder-layer kernel), i.e. what
        # nn.TransformerEncoder runs in eval mode: bit-identical to models built on it (scGPT on CPU).
        b, length, _ = x.shape
        lengths = [length] * b if padding_mask is None else (~padding_mask).sum(1).tolist()
        with warnings.catch_warnings():  # torch flags its strided nested-tensor API as a prototype
            warnings.simplefilter("ignore", UserWarning)
            h = torch.nested.nested_tensor([x[i, :n] for i, n in enumerate(lengths)])
        hidden: list[Tensor] = [x] if output_hidden_states else []
        for layer in self._native_layers()[:n_run]:
            h = layer(h)
            if output_hidden_states:
                hidden.append(h.to_padded_tensor(0.0, x.shape))
        out = h.to_padded_tensor(0.0, x.shape)
        if self.final_norm is not None and n_run == len(self.layers):
            out = self.final_norm(out)
            if output_hidden_states:
                hidden[-1] = out
        return out, (tuple(hidden) if output_hidden_states else None), None

    def _encode_packed(
        self, x: Tensor, padding_mask: Tensor | None, backend: str, output_hidden_states: bool, n_run: int
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, None]:
        if backend == "flash" or (varlen_kernel_available() and x.is_cuda):
            impl = "flash_attn"
        elif x.is_cuda:
            impl = "torch"
        else:
            impl = "reference"
        packed, packing = pack(x, padding_mask)  # (T, d)
        hidden: list[Tensor] = [x] if output_hidden_states else []
        for layer in self.layers[:n_run]:
            packed = layer.forward_packed(packed, packing.cu_seqlens, packing.max_seqlen, impl=impl)
            if output_hidden_states:
                hidden.append(unpack(packed, packing))
        if self.final_norm is not None and n_run == len(self.layers):
            packed = self.final_norm(packed)
            if output_hidden_states:
                hidden[-1] = unpack(packed, packing)
        out = unpack(packed, packing)
        return out, (tuple(hidden) if output_hidden_states else None), None

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        attn_backend: str = "sdpa",
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Encode a padded batch of cells.

        Parameters
        ----------
        gene_ids
            ``(B, L)`` int64 token ids.
        values
            ``(B, L)`` float expression values (binned or continuous), when the model uses values.
        padding_mask
            ``(B, L)`` bool, True at padding. Every cell needs at least one real token.
        position_ids, token_type_ids
            ``(B, L)`` int64, for models with position / token-type embeddings.
        attn_backend
            ``"sdpa"`` (default), ``"explicit"``, ``"flash"`` (flash-attn on CUDA), ``"varlen"``
            (packed path with the best available kernel; a slow per-cell loop on CPU) or
            ``"native"`` (inference only: torch's ``nn.TransformerEncoderLayer`` fast path on nested
            tensors — the kernels scGPT runs on, hence bit-identical to it; falls back to ``"sdpa"``
            where torch's fast path does not apply: odd head count, autograd on, autocast).
        output_hidden_states
            Also return every layer's output.
        output_attentions
            Also return per-layer ``(B, H, L, L)`` probabilities (uses the explicit path).

        Returns
        -------
        :class:`~cellkit.core.EncoderOutput`
        """
        x, g = self.embed(gene_ids, values, position_ids=position_ids, token_type_ids=token_type_ids)
        last, hidden, attns = self.encode(
            x,
            padding_mask,
            attn_backend=attn_backend,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return EncoderOutput(last, g, hidden, attns, padding_mask)


def _checked_padding_mask(padding_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """The padding mask as bool on ``x``'s device, shaped ``(B, L)``, with at least one token per cell."""
    if padding_mask is None:
        return None
    padding_mask = padding_mask.to(device=x.device, dtype=torch.bool)
    if padding_mask.shape != x.shape[:2]:
        raise ConfigError(f"padding_mask shape {tuple(padding_mask.shape)} != (B, L) {tuple(x.shape[:2])}.")
    if padding_mask.all(dim=1).any():
        raise ConfigError(
            "A cell in the batch has no tokens (all padding); drop empty cells before encoding."
        )
    return padding_mask
