"""The cellkit transformer core: pure torch, no AnnData, no widgets, no foreign formats."""

from __future__ import annotations

from .attention import ATTN_BACKENDS, MultiheadSelfAttention
from .config import EncoderConfig
from .embeddings import BatchLabelEmbedding, CategoryValueEncoder, CellEmbeddings, ContinuousValueEncoder
from .encoder import CellEncoder, EncoderLayer
from .outputs import EncoderOutput
from .precision import PRECISIONS, cpu_bf16_units, precision_context, resolve_precision
from .varlen import Packing, pack, unpack, varlen_attention

__all__ = [
    "ATTN_BACKENDS",
    "PRECISIONS",
    "BatchLabelEmbedding",
    "CategoryValueEncoder",
    "CellEmbeddings",
    "CellEncoder",
    "ContinuousValueEncoder",
    "EncoderConfig",
    "EncoderLayer",
    "EncoderOutput",
    "MultiheadSelfAttention",
    "Packing",
    "cpu_bf16_units",
    "pack",
    "precision_context",
    "resolve_precision",
    "unpack",
    "varlen_attention",
]
