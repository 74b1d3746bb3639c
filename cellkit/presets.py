"""Ready-made architectures (configs only; weights come from checkpoints or training)."""

from __future__ import annotations

from .checkpoints.scgpt import encoder_config
from .data.vocab import GeneVocab
from .model import CellModelConfig

__all__ = ["scgpt_config"]


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
        input={"n_bins": n_bins, "pad_value": pad_value, "cls_value": cls_value, "mask_value": -1.0},
    )
