"""``InputSpec``: a model's tokenization conventions, one typed record in its config.

A model states how its cells must be tokenized (how long a cell may be, how values are binned,
which values padding and ``<cls>`` carry, how the training data was preprocessed) in
``CellModelConfig.input``, an :class:`InputSpec`. Checkpoint readers and the presets build it
once; :func:`cellkit.tokenize` and the schemes read its typed attributes as defaults the caller's
scheme options override. Every field is optional: ``None`` means the model does not state it
and the scheme's own default applies. Which scheme applies is the model's family
(``CellModelConfig.family``), not a field here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._errors import ConfigError

__all__ = ["LEGACY_MAX_LENGTH_KEYS", "InputSpec"]

#: how configs written by earlier cellkit versions spelled the maximum length (scGPT's ``max_len``
#: from ``max_seq_len``, Geneformer's ``model_input_size``, TEDDY's ``max_seq_len``); read as
#: ``max_length`` by :meth:`InputSpec.from_dict`
LEGACY_MAX_LENGTH_KEYS = ("max_len", "model_input_size", "max_seq_len")
#: keys earlier versions wrote that are not tokenization conventions and are dropped on reading:
#: scGPT's ``input_style`` and ``n_layers_cls`` (both still in ``metadata["scgpt_args"]``)
_LEGACY_DROPPED = ("input_style", "n_layers_cls")


def _number(value: Any, name: str, *, low: float | None = None, integer: bool = False) -> Any:
    """``value`` checked as a (finite, ``>= low``) number, numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    if ok and low is not None and value < low:
        ok = False
    if not ok:
        bound = "" if low is None else f" >= {low:g}"
        raise ConfigError(f"InputSpec.{name} must be {what}{bound} or None, got {value!r:.80}.")
    return value


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, bool):
        raise ConfigError(f"InputSpec.{name} must be true, false or None, got {value!r:.80}.")
    return value


def _edges(value: Any) -> tuple[float, ...]:
    if isinstance(value, int | float | np.number) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ConfigError(f"InputSpec.bin_edges must be a list of numbers, got {value!r:.80}.")
    try:
        out = tuple(float(e) for e in value)
    except (TypeError, ValueError):
        raise ConfigError(f"InputSpec.bin_edges must be a list of numbers, got {value!r:.80}.") from None
    if not out or not all(math.isfinite(e) for e in out) or any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(
            f"InputSpec.bin_edges must be a non-empty, strictly increasing list of finite numbers, got {list(out)}."
        )
    return out


@dataclass(frozen=True, repr=False)
class InputSpec:
    """How a model's cells are tokenized: the conventions its tokenizer scheme takes as defaults.

    Every field is optional; ``None`` means the model does not state it and the scheme's default
    (or the caller's option) applies. Instances are immutable: change one with
    :func:`dataclasses.replace` (``config.input = dataclasses.replace(config.input, use_raw=True)``).

    Parameters
    ----------
    max_length
        The maximum number of tokens per cell the model takes, special tokens included (``<cls>``,
        ``<eos>``, TEDDY's annotation tokens, PerturbGene's ``[CLS]``, phenotype tokens and
        ``[EOS]``). The ``geneformer``, ``teddy`` and ``perturbgene`` schemes truncate to it by
        default (their options ``model_input_size``, ``max_seq_len``, ``max_length`` override it);
        the ``scgpt`` scheme keeps every gene by default, as scGPT's tokenizer does, and training
        batches are cut to it. Sources: scGPT's ``max_seq_len``, Geneformer's
        ``max_position_embeddings``.
    n_bins
        Expression bins of the ``scgpt`` scheme (values ``0 … n_bins - 1``); ``0``: continuous
        values. Default (``None``): 51.
    pad_value
        Value at padded positions (``scgpt``: default -2; ``teddy``: default 0).
    cls_value
        Value at ``<cls>`` (``scgpt``; default ``pad_value``, scGPT's pretraining convention).
    mask_value
        Value of masked positions in value-masking objectives (default -1).
    normalize_total
        Target sum the ``scgpt`` scheme normalises each cell to (an int keeps scGPT's
        "median total" quirk in ``mode="compat"``); ``False``: the model's inputs are not
        normalised (the scheme's ``normalize_total=None``). Default (``None``): the scheme's 1e4.
    log1p
        Whether the ``scgpt`` scheme applies ``log1p`` after normalising.
    use_raw
        Whether :func:`cellkit.tokenize` reads ``adata.raw`` when the caller does not say
        (``use_raw=None``).
    special_token
        Geneformer: whether cells are ``<cls>`` … ``<eos>`` (V2). Default: whether the
        vocabulary has both tokens.
    version
        Geneformer generation, ``"V1"`` or ``"V2"`` (provenance; ``special_token`` and
        ``max_length`` carry what tokenization needs).
    bin_edges
        PerturbGene: the shared expression bin edges (strictly increasing, finite).
    gene_type_offset
        PerturbGene: the token type of the first gene (``1 + n_categories``).
    n_gene_types
        PerturbGene: the number of genes in the model's gene list.

    Raises
    ------
    cellkit.ConfigError
        For a value of the wrong type or out of range; the message names the field.

    Examples
    --------
    >>> spec = InputSpec(max_length=1200, n_bins=51, pad_value=-2.0)
    >>> spec.to_dict()
    {'max_length': 1200, 'n_bins': 51, 'pad_value': -2.0}
    >>> InputSpec.from_dict({"model_input_size": 2048, "special_token": False}).max_length
    2048
    """

    max_length: int | None = None
    n_bins: int | None = None
    pad_value: float | None = None
    cls_value: float | None = None
    mask_value: float | None = None
    normalize_total: float | Literal[False] | None = None
    log1p: bool | None = None
    use_raw: bool | None = None
    special_token: bool | None = None
    version: Literal["V1", "V2"] | None = None
    bin_edges: tuple[float, ...] | None = None
    gene_type_offset: int | None = None
    n_gene_types: int | None = None

    def __post_init__(self) -> None:
        checks: dict[str, Any] = {
            "max_length": lambda v: _number(v, "max_length", low=1, integer=True),
            "n_bins": lambda v: _number(v, "n_bins", low=0, integer=True),
            "pad_value": lambda v: _number(v, "pad_value"),
            "cls_value": lambda v: _number(v, "cls_value"),
            "mask_value": lambda v: _number(v, "mask_value"),
            "normalize_total": _normalize_total,
            "log1p": lambda v: _flag(v, "log1p"),
            "use_raw": lambda v: _flag(v, "use_raw"),
            "special_token": lambda v: _flag(v, "special_token"),
            "version": _version,
            "bin_edges": _edges,
            "gene_type_offset": lambda v: _number(v, "gene_type_offset", low=1, integer=True),
            "n_gene_types": lambda v: _number(v, "n_gene_types", low=1, integer=True),
        }
        for name, check in checks.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check(value))

    def __repr__(self) -> str:
        """Only the stated fields (``InputSpec(n_bins=51, pad_value=-2.0)``)."""
        return f"InputSpec({', '.join(f'{k}={v!r}' for k, v in self.stated().items())})"

    def preprocessing_options(self) -> dict[str, Any]:
        """The stated preprocessing conventions as scheme option values (``normalize_total``, ``log1p``).

        :func:`cellkit.tokenize` (and the studio's data panel) use them as the defaults of a
        scheme that has these options; ``normalize_total=False`` is the option's ``None`` (no
        normalisation). Unstated conventions are left out.
        """
        out: dict[str, Any] = {}
        if self.normalize_total is not None:
            out["normalize_total"] = None if self.normalize_total is False else self.normalize_total
        if self.log1p is not None:
            out["log1p"] = self.log1p
        return out

    def stated(self) -> dict[str, Any]:
        """The fields the model states (not ``None``), as Python values (``bin_edges`` a tuple)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        """The stated fields as JSON-able values (``bin_edges`` a list); ``None`` fields are left out."""
        out = self.stated()
        if "bin_edges" in out:
            out["bin_edges"] = list(out["bin_edges"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; strict, and reads configs written by earlier cellkit versions.

        Unknown keys are a :class:`~cellkit.ConfigError` naming them. Earlier versions stored
        the conventions as a free dict; their spellings are mapped here, once:

        - ``max_len`` (scGPT), ``model_input_size`` (Geneformer) and ``max_seq_len`` become
          ``max_length`` (several of them must agree);
        - ``input_style`` and ``n_layers_cls`` (scGPT; kept in ``metadata["scgpt_args"]``) are
          dropped;
        - ``"normalize_total": null`` meant "not normalised" and becomes ``False``; any other
          ``null`` is "not stated".

        Parameters
        ----------
        data
            ``{field: value}``, e.g. the ``input`` object of a model's ``config.json``.

        Returns
        -------
        :class:`InputSpec`
        """
        if isinstance(data, InputSpec):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"InputSpec is an object (dict) of fields, got {type(data).__name__}.")
        fields = dict(data)
        unknown = sorted(map(str, set(fields) - _KNOWN - set(LEGACY_MAX_LENGTH_KEYS) - set(_LEGACY_DROPPED)))
        if unknown:
            raise ConfigError(f"Unknown InputSpec keys {unknown}; known: {sorted(_KNOWN)}.")
        for key in _LEGACY_DROPPED:
            fields.pop(key, None)
        spellings = {
            k: fields.pop(k) for k in ("max_length", *LEGACY_MAX_LENGTH_KEYS) if fields.get(k) is not None
        }
        for k in LEGACY_MAX_LENGTH_KEYS:
            fields.pop(k, None)
        if len({repr(v) for v in spellings.values()}) > 1:
            raise ConfigError(
                f"InputSpec: the maximum length is given twice with different values: {spellings}."
            )
        if spellings:
            fields["max_length"] = next(iter(spellings.values()))
        if "normalize_total" in fields and fields["normalize_total"] is None:
            fields["normalize_total"] = False
        return cls(**fields)


_KNOWN = frozenset(f.name for f in dataclasses.fields(InputSpec))


def _normalize_total(value: Any) -> float | Literal[False]:
    if isinstance(value, np.generic):
        value = value.item()
    if value is False:
        return False
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            "InputSpec.normalize_total must be a positive number (the target sum), False (not normalised) "
            f"or None, got {value!r:.80}."
        )
    return value


def _version(value: Any) -> str:
    if value not in ("V1", "V2"):
        raise ConfigError(f"InputSpec.version must be 'V1' or 'V2' (Geneformer) or None, got {value!r:.80}.")
    return value
