"""``CellModel`` = architecture config + gene vocabulary + core encoder + task heads.

One class serves every family cellkit loads (scGPT, Geneformer, PerturbGene-style, its own
models); the differences live in :class:`~cellkit.core.EncoderConfig` and in which heads exist.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import CellkitError, CheckpointError, ConfigError
from ._utils import atomic_directory, atomic_write_text, get_logger, recover_directory
from ._utils._run import RUN_FILE, RunRecord, load_run
from .checkpoints import (
    LoadReport,
    detect_format,
    foreign_reader,
    load_state_strict,
    read_native,
)
from .checkpoints.native import replaceable_model_dir, write_native_files
from .core import CellEncoder, EncoderConfig
from .data.input_spec import InputSpec
from .data.vocab import GeneVocab
from .heads import (
    POOLING_MODES,
    AdversarialDiscriminator,
    ClassifierHead,
    DomainSpecificBatchNorm,
    ExpressionDecoder,
    MLMHead,
    MVCDecoder,
    pool_cells,
)

__all__ = [
    "HEAD_KINDS",
    "CellModel",
    "CellModelConfig",
    "CellModelOutput",
    "inspect_checkpoint",
    "load_model",
]

log = get_logger(__name__)

#: Head name -> (allowed options with defaults). Options are architecture, saved in config.json.
HEAD_KINDS: dict[str, dict[str, Any]] = {
    "expression": {"explicit_zero_prob": False, "use_batch_labels": False},
    "mvc": {"detach": False, "explicit_zero_prob": False, "use_batch_labels": False},
    "classifier": {"n_classes": None, "n_layers": 3, "labels": None},
    "adversarial": {"n_batches": None, "n_layers": 3, "lambd": 1.0},
    "dsbn": {"n_domains": None, "eps": 6.1e-5, "momentum": 0.1, "affine": False},
    "mlm": {"activation": "gelu", "tied": True, "eps": None},
}
FAMILIES = ("cellkit", "scgpt", "geneformer", "perturbgene")


@dataclass
class CellModelConfig:
    """Everything needed to rebuild a :class:`CellModel` (architecture only; JSON round-trip).

    Parameters
    ----------
    encoder
        The core's architecture.
    heads
        Head name (see ``HEAD_KINDS``) → its options.
    pooling
        Cell-embedding pooling: ``"cls"``, ``"mean"`` (non-pad tokens) or ``"weighted"``.
    family
        Which model family's conventions the model follows (tokenizers read this).
    specials
        Special-token role → token (e.g. ``{"pad": "<pad>", "cls": "<cls>"}``).
    input
        The tokenization conventions the model states (:class:`~cellkit.InputSpec`: maximum
        length, bins, pad / ``<cls>`` / mask values, preprocessing, ...); a dict of its fields is
        read with :meth:`InputSpec.from_dict <cellkit.InputSpec.from_dict>` (including the key
        spellings of earlier cellkit versions).
    metadata
        Free-form provenance (source checkpoint, training data, ...).
    """

    encoder: EncoderConfig
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    pooling: str = "cls"
    family: str = "cellkit"
    specials: dict[str, str] = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if not isinstance(self.encoder, EncoderConfig):
            raise ConfigError(
                f"encoder must be an EncoderConfig or its dict, got {type(self.encoder).__name__}."
            )
        if not isinstance(self.heads, dict):
            raise ConfigError(f"heads must map head names to options, got {type(self.heads).__name__}.")
        if isinstance(self.input, dict):
            try:
                self.input = InputSpec.from_dict(self.input)
            except ConfigError as exc:
                raise ConfigError(f"Field 'input': {exc}") from None
        if not isinstance(self.input, InputSpec):
            raise ConfigError(f"input must be an InputSpec or its dict, got {type(self.input).__name__}.")
        for name, kind in (("specials", dict), ("metadata", dict)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"{name} must be an object (dict), got {type(getattr(self, name)).__name__}."
                )
        bad = {k: v for k, v in self.specials.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ConfigError(
                f"specials must map roles to token strings, e.g. {{'pad': '<pad>'}}; got {bad}."
            )
        if not isinstance(self.pooling, str) or self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}.")
        self.heads = {name: _check_head(name, opts) for name, opts in self.heads.items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder"] = self.encoder.to_dict()
        d["input"] = self.input.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellModelConfig:
        """Inverse of :meth:`to_dict`; strict (unknown or missing keys, wrong types), naming the field.

        Raises
        ------
        cellkit.ConfigError
            The message names the offending field, e.g. ``encoder.d_model`` or
            ``heads.classifier.n_classes``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A CellModelConfig is an object (dict) of fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(f"Unknown CellModelConfig keys {unknown}; known: {sorted(known)}.")
        if "encoder" not in data:
            raise ConfigError("The model config has no 'encoder' field (the core's architecture).")
        if not isinstance(data["encoder"], dict | EncoderConfig):
            raise ConfigError(
                f"Field 'encoder' must be an object of EncoderConfig fields, got {type(data['encoder']).__name__}."
            )
        try:
            encoder = (
                EncoderConfig.from_dict(data["encoder"])
                if isinstance(data["encoder"], dict)
                else data["encoder"]
            )
        except ConfigError as exc:
            raise ConfigError(f"Field 'encoder': {exc}") from None
        heads = data.get("heads", {})
        if not isinstance(heads, dict):
            raise ConfigError(
                f"Field 'heads' must be an object {{head name: options}}, got {type(heads).__name__}."
            )
        for name, opts in heads.items():
            try:
                _check_head(name, opts)
            except ConfigError as exc:
                raise ConfigError(f"Field 'heads.{name}': {exc}") from None
        return cls(**{**data, "encoder": encoder})


#: head option -> the kind of value it takes (checked by _check_head)
_HEAD_OPTION_KINDS: dict[str, str] = {
    "explicit_zero_prob": "bool",
    "use_batch_labels": "bool",
    "detach": "bool",
    "affine": "bool",
    "tied": "bool",
    "n_classes": "pos",
    "n_batches": "pos",
    "n_domains": "pos",
    "n_layers": "pos",
    "labels": "labels",
    "lambd": "num",
    "momentum": "num",
    "eps": "num?",
    "activation": "activation",
}


def _head_option_problem(key: str, value: Any) -> str | None:
    kind = _HEAD_OPTION_KINDS.get(key)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool" and not isinstance(value, bool):
        return "true or false"
    if kind == "pos" and not (is_int and value >= 1):
        return "a positive integer"
    if kind == "num" and not is_num:
        return "a finite number"
    if kind == "num?" and value is not None and not (is_num and value > 0):
        return "a positive number or null"
    if kind == "activation" and value not in ("gelu", "relu"):
        return "'gelu' or 'relu'"
    if (
        kind == "labels"
        and value is not None
        and not (
            isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) for v in value)
        )
    ):
        return "a list of class names or null"
    return None


def _check_head(name: str, opts: dict[str, Any] | None) -> dict[str, Any]:
    if not isinstance(name, str) or name not in HEAD_KINDS:
        raise ConfigError(f"Unknown head {name!r}; available heads: {sorted(HEAD_KINDS)}.")
    if opts is not None and not isinstance(opts, dict):
        raise ConfigError(
            f"The options of head {name!r} must be an object (dict), got {type(opts).__name__}."
        )
    opts = dict(opts or {})
    unknown = sorted(map(str, set(opts) - set(HEAD_KINDS[name])))
    if unknown:
        raise ConfigError(
            f"Unknown options {unknown} for head {name!r}; allowed: {sorted(HEAD_KINDS[name])}."
        )
    full = {**HEAD_KINDS[name], **opts}
    for key in ("n_classes", "n_batches", "n_domains"):
        if key in full and (not isinstance(full[key], int) or isinstance(full[key], bool) or full[key] < 1):
            raise ConfigError(f"Head {name!r} needs a positive integer {key}, got {full[key]!r}.")
    for key, value in opts.items():
        want = _head_option_problem(key, value)
        if want is not None:
            raise ConfigError(f"Head {name!r} option {key} must be {want}, got {value!r:.80}.")
    if name == "classifier" and full["labels"] is not None and len(full["labels"]) != full["n_classes"]:
        raise ConfigError(
            f"classifier has {full['n_classes']} classes but {len(full['labels'])} label names."
        )
    return full


@dataclass
class CellModelOutput:
    """Outputs of :meth:`CellModel.forward` (fields are ``None`` when not computed).

    Attributes
    ----------
    last_hidden_state
        ``(B, L, d)``.
    cell_embedding
        ``(B, d)`` pooled per the model's ``pooling`` (unnormalised for ``cls``/``mean``).
    gene_embeddings
        ``(B, L, d)`` gene-token embeddings before values.
    hidden_states, attentions
        As in :class:`~cellkit.core.EncoderOutput`.
    expression, expression_zero_probs
        ``(B, L)`` expression-decoder prediction and non-zero probability.
    mvc, mvc_zero_probs
        ``(B, L)`` MVC prediction from the cell embedding and its non-zero probability.
    class_logits
        ``(B, n_classes)``.
    batch_logits
        ``(B, n_batches)`` adversarial discriminator output.
    token_logits
        ``(B, L, V)`` masked-LM logits.
    """

    last_hidden_state: Tensor
    cell_embedding: Tensor
    gene_embeddings: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    expression: Tensor | None = None
    expression_zero_probs: Tensor | None = None
    mvc: Tensor | None = None
    mvc_zero_probs: Tensor | None = None
    class_logits: Tensor | None = None
    batch_logits: Tensor | None = None
    token_logits: Tensor | None = None
    padding_mask: Tensor | None = None


class CellModel(nn.Module):
    """A single-cell transformer: core encoder plus task heads, with its gene vocabulary.

    Parameters
    ----------
    config
        Architecture (:class:`CellModelConfig`).
    vocab
        Gene vocabulary; its size must equal ``config.encoder.vocab_size``.

    Examples
    --------
    >>> from cellkit import CellModel, CellModelConfig, EncoderConfig, GeneVocab
    >>> vocab = GeneVocab([f"G{i}" for i in range(20)] + ["<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    >>> cfg = CellModelConfig(EncoderConfig(vocab_size=22, d_model=16, n_heads=2, n_layers=1, d_ff=32, pad_token_id=20),
    ...                       heads={"expression": {}}, specials=vocab.specials)
    >>> model = CellModel(cfg, vocab)
    """

    def __init__(self, config: CellModelConfig, vocab: GeneVocab) -> None:
        super().__init__()
        if len(vocab) != config.encoder.vocab_size:
            raise ConfigError(
                f"The vocabulary has {len(vocab):,} tokens but the encoder's vocab_size is "
                f"{config.encoder.vocab_size:,}; they must match."
            )
        self.config = config
        self.vocab = vocab
        #: named tables the tokenizer needs (e.g. Geneformer gene medians); saved in resources.json
        self.resources: dict[str, Any] = {}
        #: what the last load did (set by :func:`load_model`)
        self.load_report: LoadReport | None = None
        #: the record of the run that made this model (set by finetune / pretrain; saved as run.json)
        self.run: RunRecord | None = None
        self.encoder = CellEncoder(config.encoder)
        self.heads = nn.ModuleDict()
        for name, opts in config.heads.items():
            self.heads[name] = self._build_head(name, opts)

    # ------------------------------------------------------------------ heads
    def _build_head(self, name: str, o: dict[str, Any]) -> nn.Module:
        c = self.config.encoder
        needs_batch = o.get("use_batch_labels", False)
        if needs_batch and not c.n_batch_labels:
            raise ConfigError(f"Head {name!r} uses batch labels but the encoder has n_batch_labels=0.")
        if name == "expression":
            return ExpressionDecoder(
                c.d_model, explicit_zero_prob=o["explicit_zero_prob"], use_batch_labels=needs_batch
            )
        if name == "mvc":
            return MVCDecoder(
                c.d_model,
                detach=o["detach"],
                explicit_zero_prob=o["explicit_zero_prob"],
                use_batch_labels=needs_batch,
            )
        if name == "classifier":
            return ClassifierHead(c.d_model, o["n_classes"], n_layers=o["n_layers"], eps=c.layer_norm_eps)
        if name == "adversarial":
            return AdversarialDiscriminator(
                c.d_model, o["n_batches"], n_layers=o["n_layers"], lambd=o["lambd"], eps=c.layer_norm_eps
            )
        if name == "dsbn":
            return DomainSpecificBatchNorm(
                c.d_model, o["n_domains"], eps=o["eps"], momentum=o["momentum"], affine=o["affine"]
            )
        if name == "mlm":
            eps = o["eps"] if o["eps"] is not None else c.layer_norm_eps
            tie = self.encoder.embeddings.gene if o["tied"] else None
            return MLMHead(c.d_model, c.vocab_size, activation=o["activation"], eps=eps, tie_to=tie)
        raise ConfigError(f"Unknown head {name!r}.")  # pragma: no cover - guarded by _check_head

    def add_head(self, name: str, **options: Any) -> nn.Module:
        """Create a fresh head (e.g. a classifier for fine-tuning) and record it in the config."""
        if name in self.heads:
            raise ConfigError(
                f"The model already has a {name!r} head; remove it first with remove_head({name!r})."
            )
        opts = _check_head(name, options)
        head = self._build_head(name, opts)
        ref = next(self.encoder.parameters())
        head.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        self.heads[name] = head
        self.config.heads[name] = opts
        return head

    def remove_head(self, name: str) -> None:
        """Drop a head from the model and its config."""
        if name not in self.heads:
            raise ConfigError(f"The model has no {name!r} head (heads: {sorted(self.heads)}).")
        del self.heads[name]
        del self.config.heads[name]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        batch_labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        heads: Iterable[str] | None = None,
        attn_backend: str = "sdpa",
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CellModelOutput:
        """Encode cells and run the requested heads.

        Parameters
        ----------
        gene_ids
            ``(B, L)`` int64 token ids.
        values
            ``(B, L)`` float values (models with a value encoder).
        padding_mask
            ``(B, L)`` bool, True at padding.
        batch_labels
            ``(B,)`` int64 batch/domain labels (DSBN, batch-label decoders).
        position_ids, token_type_ids
            ``(B, L)`` int64 (models with position / token-type embeddings).
        heads
            Which heads to run (default: all except ``dsbn``, which always applies; ``()`` = none).
        attn_backend
            See :meth:`cellkit.core.CellEncoder.forward`.
        output_hidden_states, output_attentions
            Also return per-layer states / attention probabilities.

        Returns
        -------
        :class:`CellModelOutput`
        """
        run = set(self.heads) if heads is None else set(heads)
        unknown = run - set(self.heads)
        if unknown:
            raise ConfigError(f"The model has no head(s) {sorted(unknown)}; it has {sorted(self.heads)}.")
        x, g = self.encoder.embed(gene_ids, values, position_ids=position_ids, token_type_ids=token_type_ids)
        if "dsbn" in self.heads:
            if batch_labels is None:
                raise ConfigError("This model applies domain-specific batch norm; pass batch_labels.")
            x = self.heads["dsbn"](x, batch_labels)
        last, hidden, attns = self.encoder.encode(
            x,
            padding_mask,
            attn_backend=attn_backend,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        cell = pool_cells(
            last,
            mode=self.config.pooling,
            padding_mask=padding_mask,
            values=values,
            exclude_mask=self._boundary_tokens(gene_ids) if self.config.pooling == "mean" else None,
        )
        out = CellModelOutput(last, cell, g, hidden, attns, padding_mask=padding_mask)
        batch_emb = None
        if self.encoder.batch_embedding is not None and batch_labels is not None:
            batch_emb = self.encoder.batch_embedding(batch_labels)
        if "expression" in run:
            r = self.heads["expression"](last, batch_emb)
            out.expression, out.expression_zero_probs = r["pred"], r.get("zero_probs")
        if "mvc" in run:
            r = self.heads["mvc"](cell, g, batch_emb)
            out.mvc, out.mvc_zero_probs = r["pred"], r.get("zero_probs")
        if "classifier" in run:
            out.class_logits = self.heads["classifier"](cell)
        if "adversarial" in run:
            out.batch_logits = self.heads["adversarial"](cell)
        if "mlm" in run:
            out.token_logits = self.heads["mlm"](last)
        return out

    def token_embeddings(self, ids: Tensor | None = None) -> Tensor:
        """Context-free gene-token embeddings (after ``gene_norm``), scGPT's ``GeneEmbedding`` input.

        Parameters
        ----------
        ids
            ``(N,)`` token ids (default: the whole vocabulary).

        Returns
        -------
        ``(N, d)`` embeddings.
        """
        emb = self.encoder.embeddings
        if ids is None:
            ids = torch.arange(len(self.vocab), device=emb.gene.weight.device)
        g = emb.gene(ids)
        return emb.gene_norm(g) if emb.gene_norm is not None else g

    def _boundary_tokens(self, gene_ids: Tensor) -> Tensor | None:
        """``(B, L)`` True at ``<cls>``/``<eos>`` tokens, which mean pooling leaves out."""
        ids = [self.vocab.special_id(r) for r in ("cls", "eos") if r in self.vocab.specials]
        if not ids:
            return None
        return torch.isin(gene_ids, torch.tensor(ids, device=gene_ids.device))

    # ------------------------------------------------------------------ info
    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Number of (unique) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def tied_keys(self) -> list[str]:
        """State-dict keys that alias another tensor (not stored twice on disk)."""
        return ["heads.mlm.decoder.weight"] if "mlm" in self.heads and self.heads["mlm"].tied else []

    def __repr__(self) -> str:
        c = self.config.encoder
        return (
            f"CellModel(family={self.config.family!r}, {c.n_layers} layers × d={c.d_model}, {c.n_heads} heads, "
            f"vocab {len(self.vocab):,}, heads={sorted(self.heads)}, {self.num_parameters():,} parameters)"
        )

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str], *, format: str = "cellkit") -> Path:
        """Save the model.

        Parameters
        ----------
        path
            Directory to write. It is replaced as a whole: written next to ``path`` first, then
            swapped in, so a crash at any moment leaves the old model or the new one. An existing
            ``path`` must be a saved model or empty (anything else is refused).
        format
            ``"cellkit"``: ``config.json`` + ``model.safetensors`` + ``vocab.json`` (+ ``resources.json``);
            ``"scgpt"``: ``args.json`` + ``best_model.pt`` + ``vocab.json`` that scGPT's own loaders
            accept (scGPT-family architectures only).

            A model that carries a run record (``model.run``, set by :func:`cellkit.finetune` /
            :func:`cellkit.pretrain`) also gets ``run.json`` (see :func:`cellkit.load_run`): in the
            cellkit format inside the same swap as the weights; in the scGPT format added after
            (scGPT's loaders ignore it).

        Returns
        -------
        The directory written.
        """
        tied = set(self.tied_keys())
        state = {k: v for k, v in self.state_dict().items() if k not in tied}
        cfg = self.config.to_dict()
        cfg["specials"] = self.vocab.specials
        run = getattr(self, "run", None)
        if format == "cellkit":
            with atomic_directory(path, may_replace=replaceable_model_dir, what="model directory") as tmp:
                write_native_files(tmp, cfg, state, self.vocab, self.resources)
                if run is not None:
                    (tmp / RUN_FILE).write_text(run.to_json() + "\n", encoding="utf-8")
            return Path(path)
        if format == "scgpt":
            out = foreign_reader("scgpt").write(path, cfg, state, self.vocab)
            if run is not None:
                atomic_write_text(Path(out) / RUN_FILE, run.to_json() + "\n")
            return out
        raise ConfigError(f"Unknown save format {format!r}; supported: 'cellkit', 'scgpt'.")

    @classmethod
    def from_parts(
        cls, config: CellModelConfig, vocab: GeneVocab, state: dict[str, Tensor], *, source: str
    ) -> CellModel:
        """Build a model and load ``state`` strictly (every tensor present, no extras, shapes checked).

        The model is built on the meta device and takes the loaded tensors as its parameters, so
        loading needs one copy of the weights in memory and no random initialisation. Weights
        holding NaN or inf are refused (:class:`~cellkit.CheckpointError` naming the tensors).
        """
        broken = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if broken:
            raise CheckpointError(
                f"{source}: {len(broken)} weight tensor(s) hold NaN or infinite values: {broken[:10]}. The model "
                "cannot give meaningful outputs (a training run that diverged, or a damaged file); load an "
                "earlier checkpoint or retrain with a lower learning rate."
            )
        with torch.device("meta"):
            model = cls(config, vocab)
        load_state_strict(model, state, source=source, allow_missing=model.tied_keys(), assign=True)
        model._retie()
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # pragma: no cover - load_state_strict already names missing tensors
            raise CheckpointError(f"{source}: tensors were not loaded: {leftover[:10]}")
        return model.eval()

    def _retie(self) -> None:
        """Point tied weights at their source again (after parameters were replaced)."""
        if "mlm" in self.heads and self.heads["mlm"].tied:
            self.heads["mlm"].decoder.weight = self.encoder.embeddings.gene.weight


def load_model(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    heads: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> CellModel:
    """Load a model directory: cellkit's own format, scGPT or Geneformer (detected).

    Parameters
    ----------
    path
        The model directory.
    format
        ``"auto"`` (detect), ``"cellkit"``, ``"scgpt"`` or ``"geneformer"``.
    heads
        Heads to create fresh when the file has none, e.g. ``{"classifier": {"n_classes": 8}}``
        for fine-tuning. A head that *is* in the file is loaded from it; asking for different
        options for it is an error. Created heads are listed in ``model.load_report.created``.
    device
        Where to put the model (default: CPU).
    **options
        Format-specific options (e.g. Geneformer's ``token_dictionary=``); see
        :mod:`cellkit.checkpoints.scgpt` and :mod:`cellkit.checkpoints.geneformer`.

    Returns
    -------
    The model in eval mode, with ``model.load_report`` (:class:`~cellkit.checkpoints.LoadReport`)
    saying what was mapped, ignored and created, and ``model.run`` (the record of the run that
    made it, from the directory's ``run.json``; ``None`` without one — a damaged ``run.json`` is
    logged as a warning and skipped, the weights still load).
    """
    path = recover_directory(path)  # a save interrupted between its two renames left the old copy aside
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "cellkit":
        if options:
            raise ConfigError(f"Unknown options for a cellkit directory: {sorted(options)}.")
        cfg_dict, state, vocab, resources = read_native(path)
        where = f"{path / 'config.json'} (field 'model')"
        try:
            config = CellModelConfig.from_dict(cfg_dict)
        except ConfigError as exc:
            raise CheckpointError(f"{where} is not a valid model config: {exc}") from None
        report = LoadReport("cellkit", str(path), mapped={k: k for k in state})
    else:
        ckpt = foreign_reader(fmt).read(path, **options)
        where = f"{path} (the {fmt} configuration)"
        try:
            config = CellModelConfig(**ckpt.config)
        except ConfigError as exc:
            raise CheckpointError(f"{where} describes a model cellkit cannot build: {exc}") from None
        state, vocab, report = ckpt.state, ckpt.vocab, ckpt.report
        resources = ckpt.resources
    _check_size_against_weights(config, state, where)
    try:
        model = CellModel.from_parts(config, vocab, state, source=str(path))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    model.resources = resources
    for name, opts in (heads or {}).items():
        if name in model.heads:
            wanted = _check_head(name, opts)
            if wanted != model.config.heads[name]:
                raise ConfigError(
                    f"{path} already has a {name!r} head with options {model.config.heads[name]}, not {opts}. "
                    f"Load without heads=..., then model.remove_head({name!r}) and model.add_head({name!r}, ...)."
                )
            continue
        model.add_head(name, **opts)
        report.created[name] = "absent from the checkpoint; initialised fresh as requested"
    model.load_report = report
    model.run = _read_run(path)
    for line in report.summary().splitlines():
        log.info(line)
    model.eval()
    return model.to(device) if device is not None else model


def _read_run(path: Path) -> RunRecord | None:
    """The run record saved with a model (``run.json``), or ``None``; a damaged one is only warned about."""
    if not (path / RUN_FILE).exists():
        return None
    try:
        return load_run(path / RUN_FILE)
    except CellkitError as exc:
        log.warning("%s; the model loads without its run record.", exc)
        return None


def _check_size_against_weights(config: CellModelConfig, state: dict[str, Tensor], where: str) -> None:
    """Refuse a config whose layer counts the weights cannot hold, before building anything.

    Every layer of the encoder and of a head owns at least one tensor, so a config asking for more
    layers than the file has tensors is malformed (and building it would take time and memory
    proportional to the number in the file, not to the file's size).
    """
    n = len(state)
    counts = {"encoder.n_layers": config.encoder.n_layers}
    counts.update({f"heads.{h}.n_layers": o["n_layers"] for h, o in config.heads.items() if "n_layers" in o})
    for field_name, value in counts.items():
        if value > n:
            raise CheckpointError(
                f"{where}: field {field_name} = {value:,}, but the weights hold only {n:,} tensors; the config "
                "does not belong to these weights."
            )


def inspect_checkpoint(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Describe a checkpoint directory without keeping the model.

    Returns
    -------
    dict
        ``{"format", "architecture", "vocab_size", "n_parameters", "heads", "mapped", "ignored",
        "created", "notes"}`` — ``mapped`` is the number of tensors copied, ``ignored`` maps file keys
        to the reason they were not used.
    """
    model = load_model(path, **options)
    r = model.load_report
    return {
        "format": r.format,
        "source": r.source,
        "family": model.config.family,
        "architecture": model.config.encoder.to_dict() | r.architecture,
        "vocab_size": len(model.vocab),
        "specials": model.vocab.specials,
        "n_parameters": model.num_parameters(),
        "heads": sorted(model.heads),
        "mapped": len(r.mapped),
        "ignored": dict(r.ignored),
        "created": dict(r.created),
        "notes": list(r.notes),
    }
