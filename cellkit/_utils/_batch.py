"""The batch contract between the collator and the model (one fact, read by both sides).

:class:`cellkit.data.collate.Collator` produces batches whose keys in :data:`FORWARD_KEYS` are
keyword arguments of :meth:`cellkit.CellModel.forward`; every other key (``labels``,
``target_values``, ``mlm_mask``, ``index``, …) is a target or bookkeeping. The tuple lives here,
below both, because ``data`` (which produces the keys) and ``train`` (which feeds them to the model)
may not import each other (``tests/test_import_rules.py``); it is published as
``cellkit.data.collate.FORWARD_KEYS`` beside the collator.
"""

from __future__ import annotations

__all__ = ["FORWARD_KEYS"]

#: batch keys passed to the model's forward (the rest are targets)
FORWARD_KEYS: tuple[str, ...] = (
    "gene_ids",
    "values",
    "padding_mask",
    "batch_labels",
    "position_ids",
    "token_type_ids",
)
