"""The settings of a training run (:class:`TrainerConfig`) and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .._errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainerConfig", "lr_factor"]

SCHEDULES = ("constant", "step", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam")


@dataclass
class TrainerConfig:
    """Everything that shapes a run (saved in every checkpoint; JSON round-trip).

    Parameters
    ----------
    epochs
        Passes over the training data.
    batch_size
        Cells per optimizer micro-step over all processes together (each of ``world_size``
        processes takes ``batch_size / world_size``).
    eval_batch_size
        Cells per validation batch (default ``batch_size``).
    grad_accum
        Micro-steps per optimizer step.
    optimizer
        ``"adamw"`` or ``"adam"``.
    lr, weight_decay, betas, eps
        Optimizer settings (scGPT fine-tuning: Adam, lr 1e-4, eps 1e-4 under AMP).
    schedule
        ``"constant"``; ``"step"`` multiplies the lr by ``step_gamma`` after every epoch (scGPT's
        StepLR); ``"linear"`` / ``"cosine"`` decay to 0 at the last step. All after a linear
        warm-up of ``warmup_steps`` optimizer steps.
    step_gamma, warmup_steps
        See ``schedule``.
    max_grad_norm
        Clip the gradient norm (``None``: no clipping).
    amp
        ``None``, ``"bf16"`` (CUDA or CPU) or ``"fp16"`` (CUDA, with a grad scaler).
    seed
        Seeds the data order and torch's RNG (dropout) at the start of a fresh run.
    shuffle, drop_last
        Training-data order.
    bucket_by_length
        Batch cells of similar length together (less padding); needs a dataset with ``lengths``.
    num_workers
        DataLoader workers.
    max_steps
        Stop after this many optimizer steps (``None``: run all epochs).
    eval_every_steps
        Also validate every this many steps (validation always runs at the end of each epoch).
    monitor, monitor_mode
        Metric for best-model selection and early stopping (``"val/loss"``, ``"val/macro_f1"``,
        ...; ``"train/loss"`` without validation data) and whether lower (``"min"``) or higher
        (``"max"``) is better; ``"auto"``: ``min`` for losses, ``max`` otherwise.
    early_stopping_patience
        Stop after this many validations without improvement (``None``: never).
    restore_best
        At the end, load the weights of the best validation into the model.
    checkpoint_dir
        Write resumable checkpoints here (at every epoch end, every ``checkpoint_every_steps``,
        when stopped and at the end); ``None``: none.
    checkpoint_every_steps, keep_checkpoints
        Checkpoint cadence and how many recent ones to keep (plus the best).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    attn_backend
        Attention backend for the forward passes (see :class:`cellkit.core.CellEncoder`).
    freeze
        Parameter-name prefixes to keep frozen during the run (e.g. ``"encoder.embeddings"``).
    progress
        Show a tqdm progress bar.
    micro_batch
        ``None`` (default): one forward and backward pass per batch. An ``int``: each batch (its
        masks drawn, its cells padded together) runs as pieces of this many cells, each piece's
        loss terms weighted by its share of what the term averages over (cells, labelled cells,
        masked positions): the same update as the whole batch up to float rounding (~1e-7), with
        the memory of a piece. ``"auto"``: the whole batch first; after an out-of-memory error the
        step starts over from the same state (gradients zeroed, the RNG put back, so dropout draws
        the same) in pieces of half the size, down to one cell. The size that worked is kept for
        the next steps, logged, and in each step record (``micro_batch``); the results are exactly
        those of ``micro_batch=`` that size. Objectives that compare the cells of a batch with
        each other (``ecs``, ``cce``) cannot be split.
    """

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    step_gamma: float = 0.9
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    amp: str | None = None
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    bucket_by_length: bool = False
    num_workers: int = 0
    max_steps: int | None = None
    eval_every_steps: int | None = None
    monitor: str = "val/loss"
    monitor_mode: str = "auto"
    early_stopping_patience: int | None = None
    restore_best: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    device: str = "auto"
    attn_backend: str = "sdpa"
    freeze: tuple[str, ...] = ()
    progress: bool = True
    micro_batch: int | str | None = None

    def __post_init__(self) -> None:
        from ._micro import check_micro_batch

        check_micro_batch(self.micro_batch)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.freeze = tuple(self.freeze)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"The learning rate must be a positive number, got lr={self.lr!r}.")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("eval_batch_size", "max_steps", "eval_every_steps", "checkpoint_every_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(
                f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}.")
        if self.monitor_mode not in ("auto", "min", "max"):
            raise ConfigError(f"monitor_mode must be 'auto', 'min' or 'max', got {self.monitor_mode!r}.")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("weight_decay, warmup_steps and num_workers must be >= 0.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.")
        if not 0 < self.step_gamma <= 1:
            raise ConfigError(f"step_gamma must be in (0, 1], got {self.step_gamma}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"], d["freeze"] = list(self.betas), list(self.freeze)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown trainer option(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)

    @property
    def mode(self) -> str:
        if self.monitor_mode != "auto":
            return self.monitor_mode
        return "min" if "loss" in self.monitor.rsplit("/", 1)[-1] or self.monitor.endswith("loss") else "max"


def lr_factor(config: TrainerConfig, step: int, epoch: int, total_steps: int | None) -> float:
    """Learning-rate multiplier of ``config``'s schedule for optimizer step ``step`` (0-based) in ``epoch``.

    Parameters
    ----------
    config
        The run's settings (``schedule``, ``warmup_steps``, ``step_gamma``).
    step, epoch
        The optimizer step (0-based) and its epoch.
    total_steps
        Planned optimizer steps (``None``: unknown; only ``"constant"`` and ``"step"`` work then).
    """
    c = config
    if c.warmup_steps and step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return 1.0
    if c.schedule == "step":
        return c.step_gamma**epoch
    if total_steps is None:
        raise ConfigError(f"schedule={c.schedule!r} needs a known number of steps; set max_steps=... .")
    span = max(1, total_steps - c.warmup_steps)
    t = min(1.0, (step - c.warmup_steps) / span)
    return 1.0 - t if c.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
