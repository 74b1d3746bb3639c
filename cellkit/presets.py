"""Ready-made architectures (configs only; weights come from checkpoints or training).

The ``*_config`` functions turn a vocabulary and a few architecture numbers into a
:class:`~cellkit.CellModelConfig` that follows one family's conventions, including the input
conventions its tokenizer scheme reads (``config.input``, an :class:`~cellkit.InputSpec`);
:func:`build_model` builds a fresh, randomly initialised model for pretraining from scratch out
of a list of gene names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ._errors import ConfigError, VocabError
from .checkpoints.scgpt import encoder_config
from .core.config import bert_encoder_config
from .data.input_spec import InputSpec
from .data.vocab import GeneVocab
from .model import CellModel, CellModelConfig

__all__ = ["build_model", "geneformer_config", "perturbgene_config", "scgpt_config"]

#: family -> its default special tokens (role -> token) and whether they precede the genes
_SCGPT_SPECIALS = {"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}
_GENEFORMER_SPECIALS = {"pad": "<pad>", "mask": "<mask>"}
_GENEFORMER_V2_SPECIALS = {"cls": "<cls>", "eos": "<eos>"}
#: Geneformer generation -> defaults that differ between them (facts from the released config.json)
_GENEFORMER_VERSIONS: dict[str, dict[str, Any]] = {
    "V1": {"max_len": 2048, "activation": "relu", "dropout": 0.02},
    "V2": {"max_len": 4096, "activation": "gelu", "dropout": 0.1},
}
_BUILDERS = ("scgpt", "geneformer", "perturbgene")


def scgpt_config(
    vocab: GeneVocab,
    *,
    d_model: int = 512,
    n_heads: int = 8,
    n_layers: int = 12,
    d_ff: int = 512,
    dropout: float = 0.2,
    mvc: bool = True,
    value_encoder: str = "continuous",
    n_bins: int = 51,
    pad_value: float = -2.0,
    cls_value: float = -2.0,
) -> CellModelConfig:
    """scGPT's TransformerModel architecture (the whole-human shape by default).

    Post-norm, ReLU, LayerNorm eps 1e-5, LayerNorm on the gene embedding, no positions, CLS pooling,
    an expression decoder and (``mvc=True``) the inner-product MVC decoder.
    """
    category = value_encoder == "category"
    enc = encoder_config(
        len(vocab),
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=d_ff,
        dropout=dropout,
        pad_token_id=vocab.pad_id,
        value_encoder=value_encoder,
        n_value_bins=n_bins + 2 if category else 0,
        value_pad_id=int(pad_value) if category else None,
    )
    heads = {"expression": {}}
    if mvc:
        heads["mvc"] = {}
    return CellModelConfig(
        encoder=enc,
        heads=heads,
        pooling="cls",
        family="scgpt",
        specials=vocab.specials,
        input=InputSpec(n_bins=n_bins, pad_value=pad_value, cls_value=cls_value, mask_value=-1.0),
    )


def geneformer_config(
    vocab: GeneVocab,
    *,
    d_model: int = 256,
    n_heads: int = 4,
    n_layers: int = 6,
    d_ff: int = 512,
    dropout: float | None = None,
    activation: Literal["relu", "gelu"] | None = None,
    max_len: int | None = None,
    layer_norm_eps: float = 1e-12,
    version: Literal["V1", "V2"] = "V1",
    pooling: Literal["mean", "cls"] = "mean",
) -> CellModelConfig:
    """A Geneformer-style BERT masked-LM (``BertForMaskedLM``), V1-10M's shape by default.

    Learned absolute position embeddings (the position is the gene's rank), two token types as in
    BERT (always type 0), LayerNorm + dropout on the summed embeddings, post-norm layers, no
    expression values, and a tied masked-LM head. The input conventions
    (``version``, ``max_length``, ``special_token``) are those a Geneformer checkpoint gets,
    so :func:`cellkit.tokenize` applies the ``geneformer`` scheme the same way.

    Parameters
    ----------
    vocab
        Geneformer-style vocabulary: specials with roles ``pad`` and ``mask`` (``<pad>``,
        ``<mask>``; V2 also ``cls`` and ``eos``), then genes (Ensembl ids in Geneformer).
    d_model, n_heads, n_layers, d_ff
        Hidden size, attention heads, layers and intermediate size (V1-10M: 256 / 4 / 6 / 512;
        V2-104M: 768 / 12 / 12 / 3072).
    dropout
        Hidden and attention dropout (default: V1 0.02, V2 0.1).
    activation
        Feed-forward and MLM-transform activation (default: V1 ``"relu"``, V2 ``"gelu"``).
    max_len
        Position embeddings = tokens per cell, ``<cls>``/``<eos>`` included (default: V1 2048,
        V2 4096).
    layer_norm_eps
        Epsilon of every LayerNorm (BERT: 1e-12).
    version
        ``"V1"``: genes only; ``"V2"``: ``<cls>`` genes… ``<eos>``.
    pooling
        Cell embedding: ``"mean"`` over non-pad tokens leaving out ``<cls>``/``<eos>``
        (Geneformer's ``emb_mode="cell"``) or ``"cls"`` (V2's ``emb_mode="cls"``).

    Returns
    -------
    :class:`~cellkit.CellModelConfig` with ``family="geneformer"`` and an ``mlm`` head.

    Raises
    ------
    ConfigError
        For an unknown version, a vocabulary without the special tokens the version needs, or an
        invalid size.
    """
    if version not in _GENEFORMER_VERSIONS:
        raise ConfigError(f"version must be 'V1' or 'V2', got {version!r}.")
    defaults = _GENEFORMER_VERSIONS[version]
    required = dict(_GENEFORMER_SPECIALS) | (_GENEFORMER_V2_SPECIALS if version == "V2" else {})
    _require_specials(vocab, required, f"A Geneformer {version} model", "family='geneformer'")
    activation = defaults["activation"] if activation is None else activation
    dropout = defaults["dropout"] if dropout is None else dropout
    max_len = defaults["max_len"] if max_len is None else max_len
    special = version == "V2"
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < (3 if special else 1):
        raise ConfigError(
            f"max_len must be an integer >= {3 if special else 1} (tokens per cell"
            f"{', <cls> and <eos> included' if special else ''}), got {max_len!r}."
        )
    encoder = bert_encoder_config(
        len(vocab),
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=d_ff,
        activation=activation,
        dropout=dropout,
        pad_token_id=vocab.pad_id,
        max_position_embeddings=max_len,
        type_vocab_size=2,
        layer_norm_eps=layer_norm_eps,
    )
    return CellModelConfig(
        encoder=encoder,
        heads={"mlm": {"activation": activation, "tied": True}},
        pooling=pooling,
        family="geneformer",
        specials=vocab.specials,
        input=InputSpec(version=version, max_length=max_len, special_token=special),
    )


def perturbgene_config(
    vocab: GeneVocab,
    *,
    n_gene_types: int,
    n_categories: int = 0,
    d_model: int = 256,
    n_heads: int = 4,
    n_layers: int = 4,
    d_ff: int = 1024,
    dropout: float = 0.1,
    bin_edges: Sequence[float] | None = None,
    max_length: int | None = None,
) -> CellModelConfig:
    """PerturbGene's ``GeneBert`` masked-LM: bin tokens as words, gene identity as token type.

    Embeddings are word (bin / phenotype / special token) + token type (gene identity; no
    positions) → LayerNorm → dropout; the encoder is DistilBERT's (post-norm, GELU, eps 1e-12);
    the MLM head is DistilBERT's (dense, GELU, LayerNorm, projection tied to the word embedding).
    Token types follow the ``perturbgene`` scheme: 0 for specials, ``1 … n_categories`` for the
    phenotype categories, ``1 + n_categories + gene_index`` for genes, so
    ``type_vocab_size = 1 + n_categories + n_gene_types``.

    Parameters
    ----------
    vocab
        PerturbGene-style vocabulary (see :func:`cellkit.data.schemes.perturbgene.perturbgene_vocab`):
        specials with roles ``cls``, ``eos``, ``mask``, ``pad``, phenotype tokens and
        ``bin_0 … bin_n``.
    n_gene_types
        Number of genes in the model's gene list (a gene's index there is its token type).
    n_categories
        Number of phenotype categories of the model (tissue, cell type, …), included or not in a
        given dataset's sequences.
    d_model, n_heads, n_layers, d_ff, dropout
        DistilBERT's ``dim``, ``n_heads``, ``n_layers``, ``hidden_dim`` and dropout (used for
        attention too).
    bin_edges
        The shared expression bin edges the model is trained with (recorded as
        ``config.input.bin_edges`` so tokenization uses them by default); ``len(bin_edges)`` bins above ``bin_0`` must be in
        the vocabulary.
    max_length
        Default longest sequence (``[CLS]``, phenotypes and ``[EOS]`` included) the tokenizer
        produces; ``None``: no limit (there are no position embeddings).

    Returns
    -------
    :class:`~cellkit.CellModelConfig` with ``family="perturbgene"``, CLS pooling and an ``mlm`` head.

    Raises
    ------
    ConfigError
        For missing special or bin tokens, or invalid sizes / edges.
    """
    from .data.schemes.perturbgene import SPECIAL_TOKENS

    _require_specials(vocab, SPECIAL_TOKENS, "A PerturbGene model", "family='perturbgene'")
    for name, value, low in (("n_gene_types", n_gene_types, 1), ("n_categories", n_categories, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    n_bins = 0
    while f"bin_{n_bins + 1}" in vocab:
        n_bins += 1
    if "bin_0" not in vocab or n_bins < 1:
        raise ConfigError(
            "The vocabulary has no expression-bin tokens 'bin_0', 'bin_1', …; build it with "
            "cellkit.data.schemes.perturbgene.perturbgene_vocab(phenotypes, n_bins) or build_model(..., "
            "family='perturbgene')."
        )
    edges = None
    if bin_edges is not None:
        edges = _bin_edges(bin_edges)
        if len(edges) > n_bins:
            raise ConfigError(
                f"{len(edges)} bin edges make bins 1 … {len(edges)}, but the vocabulary stops at bin_{n_bins}; "
                f"use at most {n_bins} edges or a vocabulary with more bins."
            )
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2 + n_categories
    ):
        raise ConfigError(
            f"max_length must be an integer >= {2 + n_categories} ([CLS], up to {n_categories} phenotype "
            f"token(s), [EOS]) or None, got {max_length!r}."
        )
    encoder = bert_encoder_config(
        len(vocab),
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=d_ff,
        activation="gelu",
        dropout=dropout,
        pad_token_id=vocab.pad_id,
        max_position_embeddings=0,
        type_vocab_size=1 + n_categories + n_gene_types,
    )
    return CellModelConfig(
        encoder=encoder,
        heads={"mlm": {"activation": "gelu", "tied": True}},
        pooling="cls",
        family="perturbgene",
        specials=vocab.specials,
        input=InputSpec(
            gene_type_offset=1 + n_categories,
            n_gene_types=n_gene_types,
            bin_edges=edges,
            max_length=max_length,
        ),
    )


def build_model(
    genes: Any,
    *,
    family: Literal["scgpt", "geneformer", "perturbgene"] = "scgpt",
    specials: Mapping[str, str] | None = None,
    seed: int | None = None,
    resources: Mapping[str, Any] | None = None,
    phenotypes: Mapping[str, Sequence[str]] | None = None,
    **arch: Any,
) -> CellModel:
    """A fresh, randomly initialised model for pretraining from scratch.

    Parameters
    ----------
    genes
        The model's genes: a sequence of names, or anything with ``.var_names`` (an AnnData).
    family
        ``"scgpt"`` (:func:`scgpt_config`), ``"geneformer"`` (:func:`geneformer_config`) or
        ``"perturbgene"`` (:func:`perturbgene_config`).
    specials
        Role → token of the special tokens (default: the family's). scGPT: ``<pad>``, ``<cls>``,
        ``<eoc>`` after the genes; Geneformer: ``<pad>``, ``<mask>`` (V2 also ``<cls>``,
        ``<eos>``) before the genes; PerturbGene: ``[CLS] [EOS] [MASK] [PAD]`` first.
    seed
        Seed of the weight initialisation (the global torch generator is left as it was);
        ``None`` draws from the global generator.
    resources
        Tables the tokenizer needs, kept in ``model.resources`` and saved with the model, e.g.
        ``{"gene_median": {gene: median}}`` for Geneformer's rank encoding.
    phenotypes
        PerturbGene only: category → its values (as in PerturbGene's ``phenotypic_tokens_map.json``);
        they become phenotype tokens and the ``"phenotypes"`` resource.
    **arch
        Keyword arguments of the family's config function (``d_model``, ``n_layers``, …;
        Geneformer's ``version``; PerturbGene's ``bin_edges`` (required: they size the bin
        tokens) and ``max_length``).

    Returns
    -------
    :class:`~cellkit.CellModel` in training mode, initialised as the family's reference does
    (Geneformer / PerturbGene: BERT's N(0, 0.02); scGPT: PyTorch defaults with the gene table
    from U(-0.1, 0.1)). For ``"scgpt"`` and ``"geneformer"`` the
    vocabulary is the genes plus the specials; for ``"perturbgene"`` it is the specials, the
    phenotype tokens and ``bin_0 … bin_n``, and the genes become the ``"genes"`` resource (a
    gene's index there is its token type).

    Raises
    ------
    VocabError
        For duplicated gene names, or a gene named like a special token.
    ConfigError
        For an unknown family or invalid architecture options.

    Examples
    --------
    >>> model = build_model([f"G{i}" for i in range(100)], family="geneformer", d_model=32, n_heads=2,
    ...                     n_layers=2, d_ff=64, seed=0)
    >>> model.vocab.tokens[:3], model.config.input.max_length
    (['<pad>', '<mask>', 'G0'], 2048)
    """
    if family not in _BUILDERS:
        raise ConfigError(f"family must be one of {_BUILDERS}, got {family!r}.")
    if phenotypes is not None and family != "perturbgene":
        raise ConfigError(
            f"phenotypes= is a PerturbGene option; the {family!r} family has no phenotype tokens."
        )
    names = _gene_names(genes)
    if specials is not None and not isinstance(specials, Mapping):
        raise ConfigError(
            f"specials must be a mapping role → token, e.g. {{'pad': '<pad>', 'cls': '<cls>'}}; "
            f"got {type(specials).__name__}."
        )
    extra_resources: dict[str, Any] = {}
    if family == "scgpt":
        sp = dict(_SCGPT_SPECIALS if specials is None else specials)
        vocab = _vocab(names, sp, first=False)
        config = scgpt_config(vocab, **arch)
    elif family == "geneformer":
        version = arch.get("version", "V1")
        default = dict(_GENEFORMER_SPECIALS) | (_GENEFORMER_V2_SPECIALS if version == "V2" else {})
        sp = dict(default if specials is None else specials)
        vocab = _vocab(names, sp, first=True)
        config = geneformer_config(vocab, **arch)
    else:
        vocab, extra_resources = _perturbgene_parts(names, specials, phenotypes, arch)
        config = perturbgene_config(vocab, **arch)
    config.metadata = {"source": "cellkit.presets.build_model", "init": "random", "seed": seed}
    if seed is None:
        model = CellModel(config, vocab)
        _init_weights(model, family)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CellModel(config, vocab)
            _init_weights(model, family)
    model.resources = {**dict(resources or {}), **extra_resources}
    return model


# ---------------------------------------------------------------------------------------- helpers
#: BERT's ``initializer_range`` (Geneformer's config.json; DistilBERT, PerturbGene's encoder)
BERT_INIT_STD = 0.02
#: scGPT's ``init_weights``: the gene-token table is re-drawn from U(-0.1, 0.1) (pad row included)
SCGPT_GENE_INIT_RANGE = 0.1


@torch.no_grad()
def _init_weights(model: CellModel, family: str) -> None:
    """Initialise a fresh model the way its family's reference implementation does.

    Geneformer / PerturbGene (BERT, DistilBERT): every Linear and Embedding weight
    N(0, 0.02), biases 0, LayerNorm 1 / 0, the padding row 0 — PyTorch's default N(0, 1)
    embeddings would make the tied MLM decoder's first logits ~50x too large and the model
    fails to learn. scGPT: PyTorch's defaults except the gene-token table, drawn from
    U(-0.1, 0.1) as scGPT's ``init_weights`` does.
    """
    if family == "scgpt":
        model.encoder.embeddings.gene.weight.uniform_(-SCGPT_GENE_INIT_RANGE, SCGPT_GENE_INIT_RANGE)
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, BERT_INIT_STD)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
    # embeddings last: the MLM decoder shares the gene table, whose padding row must end up 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, BERT_INIT_STD)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def _require_specials(vocab: GeneVocab, required: Mapping[str, str], what: str, family: str) -> None:
    have = vocab.specials
    missing = {role: token for role, token in required.items() if role not in have}
    if missing:
        roles = ", ".join(f"{r!r} ({t})" for r, t in missing.items())
        raise ConfigError(
            f"{what} needs special tokens with the roles {roles}, but the vocabulary's specials are "
            f"{have or 'none'}. Add them, e.g. vocab.with_specials({{**vocab.specials, "
            f"{', '.join(f'{r!r}: {t!r}' for r, t in missing.items())}}}, append_missing=True), "
            f"or build the model with build_model(genes, {family})."
        )


def _gene_names(genes: Any) -> list[str]:
    names = getattr(genes, "var_names", genes)
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise ConfigError(
            f"genes must be a sequence of gene names or an AnnData (its var_names), got {type(genes).__name__}."
        )
    names = [str(g) for g in names]
    if not names:
        raise ConfigError("genes is empty; a model needs at least one gene.")
    seen: set[str] = set()
    dups = sorted({g for g in names if g in seen or seen.add(g)})
    if dups:
        raise VocabError(
            f"{len(dups):,} gene name(s) appear more than once, e.g. {dups[:5]}; every gene needs one token. "
            "Drop or rename the duplicates first (for an AnnData: adata.var_names_make_unique(), or keep the "
            "first of each with adata[:, ~adata.var_names.duplicated()])."
        )
    return names


def _vocab(genes: list[str], specials: Mapping[str, str], *, first: bool) -> GeneVocab:
    tokens = list(dict.fromkeys(specials.values()))
    clash = sorted(set(tokens) & set(genes))
    if clash:
        raise VocabError(
            f"Gene name(s) {clash[:5]} are also special tokens ({dict(specials)}); rename the genes or pass "
            "other specials=."
        )
    return GeneVocab(tokens + genes if first else genes + tokens, specials=specials)


def _bin_edges(edges: Any) -> list[float]:
    if isinstance(edges, (int, float)) and not isinstance(edges, bool):
        edges = [edges]
    try:
        out = [float(e) for e in edges]
    except (TypeError, ValueError):
        raise ConfigError(f"bin_edges must be a list of numbers, got {edges!r}.") from None
    if not out or not all(math.isfinite(e) for e in out) or any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(
            f"bin_edges must be a non-empty, strictly increasing list of finite numbers, got {out}."
        )
    return out


def _perturbgene_parts(
    genes: list[str],
    specials: Mapping[str, str] | None,
    phenotypes: Mapping[str, Sequence[str]] | None,
    arch: dict[str, Any],
) -> tuple[GeneVocab, dict[str, Any]]:
    """PerturbGene's vocabulary (specials, phenotypes, bins) and resources; fills ``arch``."""
    from .data.schemes.perturbgene import SPECIAL_TOKENS, perturbgene_vocab

    for key in ("n_gene_types", "n_categories"):
        if key in arch:
            raise ConfigError(
                f"build_model derives {key} from genes= and phenotypes=; do not pass it (got {key}={arch[key]!r})."
            )
    if arch.get("bin_edges") is None:
        raise ConfigError(
            "A PerturbGene model needs its expression bin edges (they decide the bin tokens): pass e.g. "
            "bin_edges=[0.1] (expressed or not) or the 10 edges of PerturbGene's bin_edges_v1.txt."
        )
    edges = _bin_edges(arch["bin_edges"])
    arch["bin_edges"] = edges
    pheno = {str(k): [str(v) for v in _values(k, vals)] for k, vals in dict(phenotypes or {}).items()}
    try:
        base = perturbgene_vocab(pheno, len(edges))
    except Exception as exc:  # DataError from the scheme: report it as a configuration problem
        raise ConfigError(f"Cannot build the PerturbGene vocabulary: {exc}") from None
    tokens = base.tokens
    sp = dict(SPECIAL_TOKENS if specials is None else specials)
    if specials is not None:
        tokens = list(dict.fromkeys(sp.values())) + tokens[len(SPECIAL_TOKENS) :]
    vocab = GeneVocab(tokens, specials=sp)
    arch["n_gene_types"] = len(genes)
    arch["n_categories"] = len(pheno)
    resources: dict[str, Any] = {"genes": genes}
    if pheno:
        resources["phenotypes"] = pheno
    return vocab, resources


def _values(category: Any, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"phenotypes[{category!r}] must be a list of values, got {values!r}.")
    return list(values)
