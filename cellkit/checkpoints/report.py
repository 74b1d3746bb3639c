"""What a loader did with every tensor of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cellkit.data.vocab import GeneVocab

__all__ = ["ForeignCheckpoint", "LoadReport"]


@dataclass
class LoadReport:
    """Account of a checkpoint load: nothing is dropped without being listed here.

    Attributes
    ----------
    format
        ``"cellkit"``, ``"scgpt"`` or ``"geneformer"``.
    source
        The directory loaded.
    mapped
        ``{file key: cellkit key}`` for every tensor copied into the model.
    ignored
        ``{file key: reason}`` for tensors deliberately not used.
    created
        ``{head name: reason}`` for heads initialised fresh (absent from the file).
    notes
        Other decisions worth knowing (settings ignored, conventions chosen).
    architecture
        Summary of the architecture read from the file.
    """

    format: str
    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    architecture: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.format} checkpoint {self.source}: {len(self.mapped)} tensors mapped"]
        for key, why in self.ignored.items():
            lines.append(f"  ignored {key}: {why}")
        for head, why in self.created.items():
            lines.append(f"  created fresh: {head} ({why})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class ForeignCheckpoint:
    """What a format reader hands to :func:`cellkit.load_model`.

    Attributes
    ----------
    config
        Keyword arguments of :class:`cellkit.CellModelConfig` (``encoder`` an
        :class:`~cellkit.core.EncoderConfig`), describing only the heads present in the file.
    state
        Tensors renamed to cellkit's keys (every one of the model's keys, tied aliases excepted).
    vocab
        The gene vocabulary, with its special-token roles.
    report
        What was mapped, ignored and noted.
    resources
        Named JSON-able tables the model's tokenizer needs (e.g. Geneformer's ``gene_median``),
        kept with the model and saved to ``resources.json``.
    """

    config: dict[str, Any]
    state: dict[str, Tensor]
    vocab: GeneVocab
    report: LoadReport
    resources: dict[str, Any] = field(default_factory=dict)
