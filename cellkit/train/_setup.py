"""What a run is built from: the device, the optimizer, frozen parameters, data loaders, DDP."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._errors import ConfigError, DataError
from .config import TrainerConfig
from .distributed import DistInfo, dist_info
from .objectives import Objective
from .sampling import EpochBatchSampler

__all__ = [
    "apply_freeze",
    "batches_per_epoch",
    "build_optimizer",
    "check_batch",
    "make_loader",
    "resolve_device",
    "wrap_distributed",
]

_MISSING_KEY_HINTS = {
    "labels": "build the dataset with label_key=...",
    "batch_labels": "build the dataset with batch_key=...",
    "mlm_labels": "use a Collator with masking='tokens' or 'phenotypic'",
    "target_values": "use a Collator with masking='values'",
    "mlm_mask": "use a Collator with masking='values'",
}


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` (this rank's CUDA device when there is one, else the CPU) or a torch device spec."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info().local_rank)
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available here; use device='cpu' or 'auto'.")
    return dev


def check_batch(objectives: Sequence[Objective], batch: Mapping[str, Any]) -> None:
    """Raise a :class:`DataError` naming the fix when a batch lacks a key an objective needs."""
    for o in objectives:
        missing = [k for k in o.batch_keys if k not in batch]
        if missing:
            hint = _MISSING_KEY_HINTS.get(missing[0], "")
            raise DataError(
                f"The {o.name!r} objective needs batch key(s) {missing}, which the batches lack; {hint}."
            )


def build_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW / Adam over the trainable parameters (no weight decay on biases and norms)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("Nothing to train: every parameter is frozen.")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    opt = cls(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    for g in opt.param_groups:
        g["initial_lr"] = config.lr
    return opt


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def apply_freeze(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Parameter]:
    """Freeze the trainable parameters under ``prefixes``; returns them (to unfreeze after the run)."""
    frozen: list[nn.Parameter] = []
    if prefixes:
        names = [n for n, _ in model.named_parameters()]
        unknown = [p for p in prefixes if not any(_matches(n, p) for n in names)]
        if unknown:
            raise ConfigError(f"freeze prefix(es) {unknown} match no parameter of the model.")
        for n, p in model.named_parameters():
            if p.requires_grad and any(_matches(n, q) for q in prefixes):
                p.requires_grad_(requires_grad=False)
                frozen.append(p)
    return frozen


def _stream_loader(
    data: IterableDataset,
    config: TrainerConfig,
    dist: DistInfo,
    *,
    train: bool,
    collate_fn: Any,
    epoch: int,
    skip: int,
) -> Iterator[Any]:
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch) if train else data.set_epoch(0)
    batched = bool(getattr(data, "batch_size", None))
    loader = DataLoader(
        data,
        batch_size=None if batched else (config.batch_size // dist.world_size),
        collate_fn=None if batched else collate_fn,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + epoch),
    )
    it: Iterator[Any] = iter(loader)
    for _ in range(skip):
        next(it, None)
    return it


def make_loader(
    data: Dataset,
    config: TrainerConfig,
    dist: DistInfo,
    *,
    train: bool,
    collate_fn: Callable | None,
    epoch: int,
    skip: int,
) -> Any:
    """The batches of ``epoch`` on this rank, the first ``skip`` left out (a resumed epoch)."""
    c = config
    if isinstance(data, IterableDataset):
        return _stream_loader(data, c, dist, train=train, collate_fn=collate_fn, epoch=epoch, skip=skip)
    n = len(data)  # type: ignore[arg-type]
    lengths = getattr(data, "lengths", None) if c.bucket_by_length and train else None
    if c.bucket_by_length and train and lengths is None:
        raise ConfigError(
            "bucket_by_length=True needs a dataset with a `lengths` attribute (CellDataset has one)."
        )
    sampler = EpochBatchSampler(
        n,
        c.batch_size if train else (c.eval_batch_size or c.batch_size) * dist.world_size,
        shuffle=c.shuffle and train,
        seed=c.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        drop_last=c.drop_last and train,
        lengths=lengths,
        lockstep=train,
    )
    sampler.set_epoch(epoch)
    sampler.skip(skip)
    return DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=c.num_workers,
        generator=torch.Generator().manual_seed(c.seed + epoch),
    )


def batches_per_epoch(data: Dataset, config: TrainerConfig, dist: DistInfo) -> int | None:
    """Training batches per epoch on each rank (``None`` for a stream of unknown length)."""
    if isinstance(data, IterableDataset):
        return None
    sampler = EpochBatchSampler(
        len(data),  # type: ignore[arg-type]
        config.batch_size,
        world_size=dist.world_size,
        drop_last=config.drop_last,
    )
    return len(sampler)


def wrap_distributed(model: nn.Module, device: torch.device, dist: DistInfo) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when training is distributed, else itself."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
