"""The data boundary: vocabularies now; tokenizers, datasets and collators build on it."""

from __future__ import annotations

from .vocab import SPECIAL_ROLES, Coverage, GeneVocab

__all__ = ["SPECIAL_ROLES", "Coverage", "GeneVocab"]
