"""The training loop: a plain, tested PyTorch loop for fine-tuning and pretraining.

:class:`Trainer` runs weighted :mod:`objectives <cellkit.train.objectives>` over collated batches
(the :class:`cellkit.data.Collator` keys) on any model whose ``forward`` takes those keys plus
``heads=`` and returns the :class:`cellkit.CellModelOutput` fields. It knows nothing of AnnData or
widgets: :func:`cellkit.finetune` builds the data and the model, the studio subscribes to events.

What it does: AdamW / Adam; constant, step (scGPT's per-epoch StepLR), linear or cosine schedules
with linear warm-up; gradient clipping and accumulation; AMP (bf16, or fp16 with a grad scaler);
freezing by parameter-name prefix; validation with loss terms, accuracy and macro-F1; early
stopping and best-model selection on a named metric; atomic, resumable checkpoints (weights,
optimizer, RNG, counters, history); a cooperative stop (:meth:`Trainer.request_stop`, also
Ctrl-C) that ends at a step boundary; ``torch.distributed`` (DDP) under torchrun.

Determinism: on CPU, a run with the same seed, data and config gives identical weights and
history, and a run that is stopped and resumed gives the same as one that was not.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._errors import CellkitError, ConfigError, DataError
from .._utils import ensure_writable_dir, get_logger
from .._utils._batch import FORWARD_KEYS  # the collator's contract (cellkit.data.collate)
from .checkpoint import (
    CheckpointManager,
    checkpoint_is_intact,
    flatten_optimizer_state,
    load_weights,
    read_checkpoint,
)
from .distributed import all_gather_objects, all_reduce_sum, barrier, dist_info
from .events import Callback, Event, dispatch
from .metrics import macro_f1, macro_f1_from_confusion
from .objectives import IGNORE_INDEX, Objective, make_objectives
from .sampling import EpochBatchSampler

__all__ = [
    "FORWARD_KEYS",
    "History",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "exclusive_training_run",
]

log = get_logger(__name__)

SCHEDULES = ("constant", "step", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam")
STATE_VERSION = 1


class TrainingError(CellkitError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


_RUN_GUARD = threading.Lock()
_ACTIVE_RUN: dict[str, Any] | None = None


@contextlib.contextmanager
def exclusive_training_run(what: str = "training run") -> Iterator[None]:
    """Hold the process's single training slot; a second concurrent run is refused.

    Two runs in one process share torch's process-wide random state (dropout, head
    initialisation, masking), so each would silently give weights different from its standalone
    run. :meth:`Trainer.fit` holds the slot for the whole run; :func:`cellkit.finetune`,
    :func:`cellkit.pretrain` take it before they seed anything. The holding thread may re-enter
    (a task's fit nested in the task). Other code of the process that draws from torch's global
    RNG while a run is active (building a model, ``torch.manual_seed`` in a notebook cell) still
    changes that run's random stream; cellkit cannot guard that.

    Raises
    ------
    TrainingError
        Another thread of this process holds the slot.
    """
    global _ACTIVE_RUN
    me = threading.current_thread()
    with _RUN_GUARD:
        active = _ACTIVE_RUN
        if active is not None and active["thread"] is not me:
            raise TrainingError(
                f"Another cellkit training run is active in this process ({active['what']} in thread "
                f"{active['thread'].name!r}, started {time.strftime('%H:%M:%S', time.localtime(active['since']))}); "
                "wait for it to finish or stop it (trainer.request_stop(), the studio's Stop button), then start "
                "this one. Two runs in one process share torch's global random state, so neither would give the "
                "weights it gives alone."
            )
        if active is None:
            active = _ACTIVE_RUN = {"thread": me, "what": what, "since": time.time(), "depth": 0}
        active["depth"] += 1
    try:
        yield
    finally:
        with _RUN_GUARD:
            active["depth"] -= 1
            if active["depth"] == 0:
                _ACTIVE_RUN = None


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

    def __post_init__(self) -> None:
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


class History:
    """Per-step and per-epoch records of a run.

    Attributes
    ----------
    steps
        ``DataFrame``: ``step``, ``epoch``, ``loss``, ``loss/<objective>``, ``lr``, ``cells``
        (and ``accuracy``, ``macro_f1`` of the step's batch with a classification objective).
    epochs
        ``DataFrame``: ``epoch``, ``step``, ``lr``, ``train/...`` and ``val/...`` metrics.
    """

    def __init__(self, steps: list[dict[str, Any]] | None = None, epochs: list[dict[str, Any]] | None = None):
        self.step_records: list[dict[str, Any]] = list(steps or [])
        self.epoch_records: list[dict[str, Any]] = list(epochs or [])

    @property
    def steps(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.step_records)

    @property
    def epochs(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.epoch_records)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"steps": self.step_records, "epochs": self.epoch_records}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"History({len(self.step_records)} steps, {len(self.epoch_records)} epochs)"


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes
    ----------
    status
        ``"completed"``, ``"stopped"`` (stop flag), ``"interrupted"`` (Ctrl-C) or
        ``"early_stopped"``.
    history
        :class:`History`.
    metrics
        The last validation's metrics (``val/...``), or the last epoch's training metrics.
    best_metric, best_step
        Best value of ``monitor`` and the step it was reached at.
    checkpoint
        The last checkpoint written (resume from it), or ``None``.
    best_checkpoint
        The checkpoint of the best validation, or ``None``.
    """

    status: str
    history: History
    metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None
    best_checkpoint: Path | None = None


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


class _SigintToStop:
    """While active (main thread only): first Ctrl-C requests a stop, the second one aborts."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.previous = trainer, None

    def __enter__(self) -> _SigintToStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer._stop_reason is not None:
            raise KeyboardInterrupt
        log.warning("Interrupted: stopping at the end of this step (press Ctrl-C again to abort).")
        self.trainer.request_stop(reason="interrupted")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Trainer:
    """Train ``model`` on weighted objectives.

    Parameters
    ----------
    model
        The model (e.g. a :class:`cellkit.CellModel` with the heads the objectives need).
    objectives
        Objectives: instances, names, ``{name: weight}`` or ``{name: {option: value}}``
        (see :func:`cellkit.train.make_objectives`).
    config
        A :class:`TrainerConfig`, or ``None`` with its fields as keyword arguments.
    callbacks
        :class:`Callback` objects or callables receiving every :class:`Event` (rank 0 only).
    stop_event
        A :class:`threading.Event` another thread sets to stop the run at the next step (the
        studio's Stop button); same as :meth:`request_stop`. Cleared when a run starts.
    **options
        :class:`TrainerConfig` fields.

    Examples
    --------
    >>> trainer = Trainer(model, ["cls"], epochs=3, lr=1e-4, batch_size=32)  # doctest: +SKIP
    >>> result = trainer.fit(train_ds, val_ds, collate_fn=collator)  # doctest: +SKIP
    >>> result.history.epochs  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        objectives: Any,
        config: TrainerConfig | None = None,
        *,
        callbacks: Iterable[Callback | Callable[[Event], Any]] = (),
        stop_event: threading.Event | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = TrainerConfig.from_dict(options)
        elif options:
            config = TrainerConfig.from_dict({**config.to_dict(), **options})
        self.config = config
        self.model = model
        self.objectives: list[Objective] = make_objectives(objectives)
        self.callbacks = list(callbacks)
        self.heads = tuple(dict.fromkeys(h for o in self.objectives for h in o.heads))
        available = getattr(model, "heads", None)
        if isinstance(available, nn.ModuleDict | Mapping):
            missing = [h for h in self.heads if h not in available]
            if missing:
                raise ConfigError(
                    f"Objective(s) {[o.name for o in self.objectives if set(o.heads) & set(missing)]} need head(s) "
                    f"{missing}, which the model lacks (it has {sorted(available)}); add them with "
                    "model.add_head(...)."
                )
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._stop_reason: str | None = None
        self.dist = dist_info()
        self.device = self._resolve_device(config.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None
        self.state: dict[str, Any] | None = None  # counters of the run in progress (None: fresh)
        self.history = History()
        self._best_weights: dict[str, Tensor] | None = None
        self._boundary_rng: Tensor | None = None
        self._boundary_cuda_rng: Tensor | None = None
        self._t0 = time.time()
        self.ckpt = (
            CheckpointManager(config.checkpoint_dir, keep=config.keep_checkpoints)
            if config.checkpoint_dir
            else None
        )
        if self.ckpt is not None and self.dist.is_main:  # fail now, not after the first epoch
            ensure_writable_dir(self.ckpt.root, what="checkpoint_dir")

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "stopped") -> None:
        """Ask the run to stop at the next step boundary (thread-safe; the studio's Stop button).

        The run writes a checkpoint (when ``checkpoint_dir`` is set) and :meth:`fit` returns
        with ``status`` ``"stopped"``; call :meth:`fit` again with ``resume=True`` to go on.
        """
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @staticmethod
    def _resolve_device(spec: str) -> torch.device:
        if spec == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", dist_info().local_rank)
            return torch.device("cpu")
        dev = torch.device(spec)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={spec!r} but CUDA is not available here; use device='cpu' or 'auto'.")
        return dev

    # ------------------------------------------------------------------ set-up
    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        for o in self.objectives:
            missing = [k for k in o.batch_keys if k not in batch]
            if missing:
                hint = {
                    "labels": "build the dataset with label_key=...",
                    "batch_labels": "build the dataset with batch_key=...",
                    "mlm_labels": "use a Collator with masking='tokens' or 'phenotypic'",
                    "target_values": "use a Collator with masking='values'",
                    "mlm_mask": "use a Collator with masking='values'",
                }.get(missing[0], "")
                raise DataError(
                    f"The {o.name!r} objective needs batch key(s) {missing}, which the batches lack; {hint}."
                )

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = self._params()
        if not params:
            raise ConfigError("Nothing to train: every parameter is frozen.")
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=c.lr, betas=c.betas, eps=c.eps)
        for g in opt.param_groups:
            g["initial_lr"] = c.lr
        return opt

    def lr_factor(self, step: int, epoch: int, total_steps: int | None) -> float:
        """Learning-rate multiplier for optimizer step ``step`` (0-based) in ``epoch``."""
        c = self.config
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

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = self.config.amp
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _loader(
        self, data: Dataset, *, train: bool, collate_fn: Callable | None, epoch: int, skip: int
    ) -> Any:
        c = self.config
        if isinstance(data, IterableDataset):
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch) if train else data.set_epoch(0)
            loader = DataLoader(
                data,
                batch_size=None
                if getattr(data, "batch_size", None)
                else (c.batch_size // self.dist.world_size),
                collate_fn=None if getattr(data, "batch_size", None) else collate_fn,
                num_workers=c.num_workers,
                generator=torch.Generator().manual_seed(c.seed + epoch),
            )
            it: Iterator[Any] = iter(loader)
            for _ in range(skip):
                next(it, None)
            return it
        n = len(data)  # type: ignore[arg-type]
        lengths = getattr(data, "lengths", None) if c.bucket_by_length and train else None
        if c.bucket_by_length and train and lengths is None:
            raise ConfigError(
                "bucket_by_length=True needs a dataset with a `lengths` attribute (CellDataset has one)."
            )
        sampler = EpochBatchSampler(
            n,
            c.batch_size if train else (c.eval_batch_size or c.batch_size) * self.dist.world_size,
            shuffle=c.shuffle and train,
            seed=c.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
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

    def _batches_per_epoch(self, data: Dataset) -> int | None:
        if isinstance(data, IterableDataset):
            return None
        c = self.config
        return len(
            EpochBatchSampler(len(data), c.batch_size, world_size=self.dist.world_size, drop_last=c.drop_last)
        )  # type: ignore[arg-type]

    # ------------------------------------------------------------------ forward
    def _forward(self, model: nn.Module, batch: Mapping[str, Any], heads: Sequence[str]) -> Any:
        inputs = {k: batch[k] for k in FORWARD_KEYS if k in batch and batch[k] is not None}
        return model(**inputs, heads=tuple(heads), attn_backend=self.config.attn_backend)

    def _losses(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor], Any]:
        with self._autocast():
            out = self._forward(model, batch, self.heads)
            out2 = None
            if any(o.second_pass for o in self.objectives):
                out2 = self._forward(model, batch, ())
            terms = {o.name: o(out, batch, out2).float() for o in self.objectives}
        total = sum(o.weight * terms[o.name] for o in self.objectives)
        return total, terms, out  # type: ignore[return-value]

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train: Dataset,
        val: Dataset | None = None,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        val_collate_fn: Callable[[list[Any]], Any] | None = None,
        resume: bool | str | Path = False,
    ) -> TrainResult:
        """Train until the epochs (or ``max_steps``) are done, early stopping, or a stop request.

        Parameters
        ----------
        train, val
            Map-style datasets of per-cell items (with ``collate_fn``), or iterable datasets
            yielding collated batches (e.g. :class:`cellkit.data.ShardStreamDataset` with
            ``batch_size``).
        collate_fn, val_collate_fn
            Turn a list of items into a batch (``val_collate_fn`` defaults to ``collate_fn``;
            give it a fixed ``epoch`` so validation masks do not change between epochs).
        resume
            ``True``: go on from the latest checkpoint in ``checkpoint_dir`` or, without one, from
            where this trainer stopped; a path: from that checkpoint.

        Returns
        -------
        :class:`TrainResult`
        """
        if not isinstance(train, IterableDataset) and len(train) == 0:  # type: ignore[arg-type]
            raise DataError("The training data is empty; select at least one cell.")
        if val is not None and not isinstance(val, IterableDataset) and len(val) == 0:  # type: ignore[arg-type]
            raise DataError("The validation data is empty; pass val=None or select cells for it.")
        with contextlib.ExitStack() as held:
            # one run per process (torch's RNG is process-wide), one live run per checkpoint_dir
            held.enter_context(exclusive_training_run(type(self.model).__name__ + " training"))
            if self.ckpt is not None and self.dist.is_main:
                held.enter_context(self.ckpt.lock())
            self._stop.clear()
            self._stop_reason = None
            self._t0 = time.time()
            frozen = self._apply_freeze()
            try:
                self.model.to(self.device)
                if resume:
                    self._resume(resume)
                else:
                    self._fresh_start()
                with _SigintToStop(self):
                    return self._run(train, val, collate_fn, val_collate_fn or collate_fn)
            except BaseException as e:
                if self.dist.is_main:
                    dispatch(self.callbacks, self._event("error", error=e))
                raise
            finally:
                for p in frozen:
                    p.requires_grad_(requires_grad=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply_freeze(self) -> list[nn.Parameter]:
        frozen = []
        prefixes = self.config.freeze
        if prefixes:
            names = [n for n, _ in self.model.named_parameters()]
            unknown = [
                p for p in prefixes if not any(n == p or n.startswith(p.rstrip(".") + ".") for n in names)
            ]
            if unknown:
                raise ConfigError(f"freeze prefix(es) {unknown} match no parameter of the model.")
            for n, p in self.model.named_parameters():
                if p.requires_grad and any(n == q or n.startswith(q.rstrip(".") + ".") for q in prefixes):
                    p.requires_grad_(requires_grad=False)
                    frozen.append(p)
        return frozen

    def _fresh_start(self) -> None:
        torch.manual_seed(self.config.seed + self.dist.rank)
        self.optimizer = self._build_optimizer()
        self.scaler = (
            torch.amp.GradScaler(self.device.type)
            if self.config.amp == "fp16" and self.device.type == "cuda"
            else None
        )
        if self.config.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp='fp16' needs CUDA; on CPU use amp='bf16' or None.")
        self.history = History()
        self._best_weights = None
        self.state = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "acc": self._new_acc(),
            "last_metrics": {},
            "done": False,
        }
        self._snapshot_rng()

    def _new_acc(self) -> dict[str, float]:
        return {
            "cells": 0.0,
            "loss": 0.0,
            "correct": 0.0,
            "labelled": 0.0,
            **{f"loss/{o.name}": 0.0 for o in self.objectives},
        }

    def _snapshot_rng(self) -> None:
        self._boundary_rng = torch.get_rng_state()
        self._boundary_cuda_rng = (
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        )

    def _resume(self, resume: bool | str | Path) -> None:
        source: str | Path | None = None
        if isinstance(resume, str | Path):
            source = resume
        elif self.ckpt is not None and self.ckpt.latest is not None:
            source = self.ckpt.root
        if source is None:
            if self.state is None:
                where = f"in {self.ckpt.root}" if self.ckpt is not None else "(no checkpoint_dir was given)"
                raise ConfigError(
                    f"Nothing to resume: no intact checkpoint {where} and this trainer has not run yet. "
                    "Start with resume=False, or point checkpoint_dir at the run's checkpoint directory."
                )
            if self.state.get("done"):
                raise ConfigError("This run has finished; start a new one (resume=False) or raise epochs.")
            torch.set_rng_state(self._boundary_rng)  # type: ignore[arg-type]
            if self._boundary_cuda_rng is not None:
                torch.cuda.set_rng_state(self._boundary_cuda_rng, self.device)
            return
        path, tensors, state = read_checkpoint(source)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"The checkpoint {path} was written by an incompatible cellkit (state version {state.get('version')})."
            )
        names = [o.name for o in self.objectives]
        if state["objectives"] != names:
            raise ConfigError(
                f"The checkpoint trained objectives {state['objectives']}; this trainer has {names}."
            )
        if state["world_size"] != self.dist.world_size:
            log.warning(
                "The checkpoint was written by %d process(es), this run has %d: the data order changes.",
                state["world_size"],
                self.dist.world_size,
            )
        saved = {
            k: v
            for k, v in state["config"].items()
            if k
            not in (
                "epochs",
                "max_steps",
                "checkpoint_dir",
                "progress",
                "device",
                "num_workers",
                "early_stopping_patience",
            )
        }
        now = {k: v for k, v in self.config.to_dict().items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != now[k])
        if changed:
            log.warning(
                "resuming with changed settings: %s",
                ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed),
            )
        load_weights(self.model, path)
        self.optimizer = self._build_optimizer()
        from .checkpoint import unflatten_optimizer_state

        self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
        self.scaler = None
        if self.config.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler(self.device.type)
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self.history = History(state["history"]["steps"], state["history"]["epochs"])
        self.state = state["trainer"]
        rank = self.dist.rank
        key = f"rng.cpu.{rank}" if f"rng.cpu.{rank}" in tensors else "rng.cpu.0"
        torch.set_rng_state(tensors[key])
        if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)
        self._snapshot_rng()
        self._best_weights = None
        log.info("resumed from %s at epoch %d, step %d", path, self.state["epoch"], self.state["step"])

    # ------------------------------------------------------------------ the loop
    def _event(self, kind: str, **kw: Any) -> Event:
        s = self.state or {}
        return Event(
            kind,
            step=int(s.get("step", 0)),
            epoch=int(s.get("epoch", 0)),
            total_steps=getattr(self, "_total_steps", None),
            elapsed=time.time() - self._t0,
            **kw,
        )

    def _emit(self, kind: str, **kw: Any) -> None:
        if self.dist.is_main:
            dispatch(self.callbacks, self._event(kind, **kw))

    def _run(self, train: Dataset, val: Dataset | None, collate_fn: Any, val_collate_fn: Any) -> TrainResult:
        c, s = self.config, self.state
        assert s is not None
        assert self.optimizer is not None
        per_epoch_batches, per_epoch, total = self._plan_steps(train)
        self._total_steps = total
        model = self._wrapped_model()
        self._emit("train_start", metrics={"lr": self.optimizer.param_groups[0]["lr"]})
        status = "completed"
        checked = False
        while s["epoch"] < c.epochs and not self._max_steps_reached():
            epoch = s["epoch"]
            early, epoch_done, checked = self._train_epoch(
                model,
                train,
                val,
                collate_fn,
                val_collate_fn,
                epoch=epoch,
                n_batches=per_epoch_batches,
                per_epoch=per_epoch,
                total=total,
                checked=checked,
            )
            if early:
                status = "early_stopped"
            if (
                epoch_done
                and status != "early_stopped"
                and self._end_epoch(model, val, val_collate_fn, epoch)
            ):
                status = "early_stopped"
            if status == "early_stopped":
                break
            if self._stop.is_set():
                status = self._stop_reason or "stopped"
                break
        s["done"] = status in ("completed", "early_stopped")
        ckpt_path = self._checkpoint() if self.ckpt is not None else None
        if s["done"] and self.config.restore_best:
            self._restore_best()
        best_ckpt = self.ckpt.best if self.ckpt is not None else None
        self._emit("finish", status=status, metrics=dict(s["last_metrics"]))
        return TrainResult(
            status=status,
            history=self.history,
            metrics=dict(s["last_metrics"]),
            best_metric=s["best"],
            best_step=s["best_step"],
            checkpoint=ckpt_path,
            best_checkpoint=best_ckpt,
        )

    def _plan_steps(self, train: Dataset) -> tuple[int | None, int | None, int | None]:
        """Batches per epoch, optimizer steps per epoch and total optimizer steps (``None`` where unknown)."""
        c = self.config
        per_epoch_batches = self._batches_per_epoch(train)
        per_epoch = None if per_epoch_batches is None else math.ceil(per_epoch_batches / c.grad_accum)
        total = None if per_epoch is None else per_epoch * c.epochs
        if c.max_steps is not None:
            total = c.max_steps if total is None else min(total, c.max_steps)
        return per_epoch_batches, per_epoch, total

    def _wrapped_model(self) -> nn.Module:
        """The model to train: wrapped in ``DistributedDataParallel`` when training is distributed."""
        model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        return model

    def _max_steps_reached(self) -> bool:
        s = self.state
        assert s is not None
        return self.config.max_steps is not None and s["step"] >= self.config.max_steps

    def _train_epoch(
        self,
        model: nn.Module,
        train: Dataset,
        val: Dataset | None,
        collate_fn: Any,
        val_collate_fn: Any,
        *,
        epoch: int,
        n_batches: int | None,
        per_epoch: int | None,
        total: int | None,
        checked: bool,
    ) -> tuple[bool, bool, bool]:
        """The optimizer steps of one epoch, from where the state left off.

        Returns whether validation asked for an early stop, whether the epoch's batches are all
        done, and whether the first batch has been checked.
        """
        c, s = self.config, self.state
        assert s is not None
        if hasattr(collate_fn, "set_epoch"):
            collate_fn.set_epoch(epoch)
        loader = self._loader(train, train=True, collate_fn=collate_fn, epoch=epoch, skip=s["batch"])
        bar = self._progress(per_epoch, epoch, s["step"] - epoch * (per_epoch or 0))
        model.train()
        early = False
        window: list[Any] = []
        it = iter(loader)
        while True:
            batch = next(it, None)
            if batch is not None:
                if not checked:
                    self._check_batch(batch)
                    checked = True
                window.append(batch)
                consumed = s["batch"] + len(window)
                last_of_epoch = n_batches is not None and consumed >= n_batches
                if len(window) < c.grad_accum and not last_of_epoch:
                    continue
            elif not window:
                break
            self._optimizer_step(model, window, epoch, total)
            s["batch"] += len(window)
            window = []
            self._update_progress(bar)
            if self._after_step(model, val, val_collate_fn, epoch):
                early = True
            if early or self._stop.is_set() or self._max_steps_reached():
                break
        if bar is not None:
            bar.close()
        epoch_done = batch is None if n_batches is None else s["batch"] >= n_batches
        return early, epoch_done, checked

    def _update_progress(self, bar: Any) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{self.history.step_records[-1]['loss']:.4f}", refresh=False)

    def _after_step(self, model: nn.Module, val: Dataset | None, val_collate_fn: Any, epoch: int) -> bool:
        """Validation and checkpoint when due after an optimizer step; ``True`` when validation stops early."""
        c, s = self.config, self.state
        assert s is not None
        early = False
        due = c.eval_every_steps and s["step"] % c.eval_every_steps == 0 and val is not None
        if due and self._validate(model, val, val_collate_fn, epoch):
            early = True
        if c.checkpoint_every_steps and s["step"] % c.checkpoint_every_steps == 0:
            self._checkpoint()
        return early

    def _progress(self, per_epoch: int | None, epoch: int, done: int) -> Any:
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=per_epoch, initial=max(0, done), desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False
        )

    def _optimizer_step(self, model: nn.Module, window: list[Any], epoch: int, total: int | None) -> None:
        c, s, opt = self.config, self.state, self.optimizer
        assert s is not None
        assert opt is not None
        factor = self.lr_factor(s["step"], epoch, total)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(4 + len(self.objectives), dtype=torch.float64, device=self.device)
        confusion: Tensor | None = None
        for i, raw in enumerate(window):
            batch = _to_device(raw, self.device)
            sync = i == len(window) - 1
            ctx = (
                model.no_sync()
                if (self.dist.enabled and not sync and hasattr(model, "no_sync"))
                else contextlib.nullcontext()
            )
            with ctx:
                loss, terms, out = self._losses(model, batch)
                if self.scaler is None and not torch.isfinite(loss):
                    raise TrainingError(
                        f"The loss became {loss.item()} at step {s['step']} (epoch {epoch + 1}). Lower the learning "
                        "rate, enable gradient clipping (max_grad_norm), or check the inputs for NaN/inf."
                    )
                scaled = loss / len(window)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            n = self._batch_cells(batch)
            sums[0] += n
            sums[1] += loss.detach().double() * n
            for j, o in enumerate(self.objectives):
                sums[4 + j] += terms[o.name].detach().double() * n
            if "labels" in batch and getattr(out, "class_logits", None) is not None:
                lab = batch["labels"]
                ok = lab != IGNORE_INDEX
                pred = out.class_logits.detach().argmax(-1)
                sums[2] += (pred[ok] == lab[ok]).sum()
                sums[3] += ok.sum()
                k = out.class_logits.shape[-1]
                cm = torch.bincount(lab[ok] * k + pred[ok], minlength=k * k).reshape(k, k).double()
                confusion = cm if confusion is None else confusion + cm
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if c.max_grad_norm is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        s["step"] += 1
        sums = all_reduce_sum(sums).cpu()
        if confusion is not None:
            confusion = all_reduce_sum(confusion).cpu()
        cells = float(sums[0])
        rec: dict[str, Any] = {
            "step": s["step"],
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "cells": int(cells),
        }
        rec["loss"] = float(sums[1] / cells)
        for j, o in enumerate(self.objectives):
            rec[f"loss/{o.name}"] = float(sums[4 + j] / cells)
        if sums[3] > 0:
            rec["accuracy"] = float(sums[2] / sums[3])
        acc = s["acc"]
        if confusion is not None:
            rec["macro_f1"] = macro_f1_from_confusion(confusion.numpy())
            total = np.asarray(acc.get("confusion") or np.zeros_like(confusion.numpy())) + confusion.numpy()
            acc["confusion"] = total.tolist()
        acc["cells"] += cells
        acc["loss"] += float(sums[1])
        acc["correct"] += float(sums[2])
        acc["labelled"] += float(sums[3])
        for j, o in enumerate(self.objectives):
            acc[f"loss/{o.name}"] += float(sums[4 + j])
        self.history.step_records.append(rec)
        self._snapshot_rng()
        self._emit("step_end", metrics={k: v for k, v in rec.items() if k not in ("step", "epoch")})

    @staticmethod
    def _batch_cells(batch: Mapping[str, Any]) -> int:
        for k in ("gene_ids", "input_ids", "labels"):
            if k in batch and isinstance(batch[k], Tensor):
                return int(batch[k].shape[0])
        return 1

    def _end_epoch(self, model: nn.Module, val: Dataset | None, val_collate_fn: Any, epoch: int) -> bool:
        s = self.state
        assert s is not None
        acc = s["acc"]
        rec: dict[str, Any] = {"epoch": epoch, "step": s["step"], "lr": self.optimizer.param_groups[0]["lr"]}  # type: ignore[union-attr]
        if acc["cells"]:
            rec["train/loss"] = acc["loss"] / acc["cells"]
            for o in self.objectives:
                rec[f"train/loss/{o.name}"] = acc[f"loss/{o.name}"] / acc["cells"]
        if acc["labelled"]:
            rec["train/accuracy"] = acc["correct"] / acc["labelled"]
        if acc.get("confusion") is not None:
            rec["train/macro_f1"] = macro_f1_from_confusion(np.asarray(acc["confusion"]))
        stop = False
        if val is not None:
            metrics = self.evaluate(val, collate_fn=val_collate_fn, model=model)
            rec.update(metrics)
            self._emit("validation", metrics=metrics)
        s["last_metrics"] = {k: v for k, v in rec.items() if k not in ("epoch", "step")}
        stop = self._track_best(rec)
        self.history.epoch_records.append(rec)
        self._emit("epoch_end", metrics=dict(s["last_metrics"]))  # event.epoch: the epoch that ended
        s["epoch"] = epoch + 1
        s["batch"] = 0
        s["acc"] = self._new_acc()
        if self.ckpt is not None:
            self._checkpoint(best=s["best_step"] == s["step"] and s.get("_improved", False))
        return stop

    def _validate(self, model: nn.Module, val: Dataset, val_collate_fn: Any, epoch: int) -> bool:
        metrics = self.evaluate(val, collate_fn=val_collate_fn, model=model)
        self._emit("validation", metrics=metrics)
        self.state["last_metrics"] = metrics  # type: ignore[index]
        stop = self._track_best({**metrics, "step": self.state["step"]})  # type: ignore[index]
        if self.ckpt is not None and self.state.get("_improved"):  # type: ignore[union-attr]
            self._checkpoint(best=True)
        return stop

    def _track_best(self, rec: Mapping[str, Any]) -> bool:
        c, s = self.config, self.state
        assert s is not None
        s["_improved"] = False
        value = rec.get(c.monitor)
        if value is None:
            if c.monitor == "val/loss" and "train/loss" in rec:
                value = rec["train/loss"]
            else:
                return False
        better = s["best"] is None or (value < s["best"] if c.mode == "min" else value > s["best"])
        if better:
            s["best"], s["best_step"], s["bad_evals"], s["_improved"] = float(value), s["step"], 0, True
            if self.ckpt is None and c.restore_best:
                self._best_weights = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
            return False
        s["bad_evals"] += 1
        return c.early_stopping_patience is not None and s["bad_evals"] >= c.early_stopping_patience

    def _restore_best(self) -> None:
        s = self.state
        assert s is not None
        if s["best_step"] is None or s["best_step"] == s["step"]:
            return
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)
        elif self.ckpt is not None:
            # the checkpoint of the best step itself; the pointer only as a fallback
            by_step = self.ckpt.root / f"step-{s['best_step']:08d}"
            best = by_step if checkpoint_is_intact(by_step) else self.ckpt.best
            if best is None:
                return
            load_weights(self.model, best)
        else:
            return
        log.info(
            "restored the weights of step %d (best %s = %.4g)", s["best_step"], self.config.monitor, s["best"]
        )

    @torch.no_grad()
    def evaluate(
        self, data: Dataset, *, collate_fn: Callable | None = None, model: nn.Module | None = None
    ) -> dict[str, float]:
        """Loss terms (and accuracy / macro-F1 with a classification objective) on ``data``.

        Every rank evaluates its share; the metrics are reduced over ranks. Keys are prefixed
        ``val/``.
        """
        model = model or self.model
        was_training = model.training
        model.eval()
        try:
            loader = self._loader(data, train=False, collate_fn=collate_fn, epoch=0, skip=0)
            sums = torch.zeros(1 + len(self.objectives), dtype=torch.float64, device=self.device)
            preds: list[np.ndarray] = []
            labels: list[np.ndarray] = []
            for raw in loader:
                batch = _to_device(raw, self.device)
                _, terms, out = self._losses(model, batch)
                n = self._batch_cells(batch)
                sums[0] += n
                for j, o in enumerate(self.objectives):
                    sums[1 + j] += terms[o.name].double() * n
                if "labels" in batch and getattr(out, "class_logits", None) is not None:
                    preds.append(out.class_logits.argmax(-1).cpu().numpy())
                    labels.append(batch["labels"].cpu().numpy())
        finally:
            model.train(was_training)
        sums = all_reduce_sum(sums).cpu()
        cells = float(sums[0])
        metrics: dict[str, float] = {}
        if cells:
            metrics["val/loss"] = float(
                sum(o.weight * sums[1 + j] for j, o in enumerate(self.objectives)) / cells
            )
            for j, o in enumerate(self.objectives):
                metrics[f"val/loss/{o.name}"] = float(sums[1 + j] / cells)
        if preds or self.dist.enabled:
            parts = all_gather_objects(
                (
                    np.concatenate(preds) if preds else np.zeros(0, int),
                    np.concatenate(labels) if labels else np.zeros(0, int),
                )
            )
            p = np.concatenate([a for a, _ in parts])
            y = np.concatenate([b for _, b in parts])
            ok = y != IGNORE_INDEX
            if ok.any():
                metrics["val/accuracy"] = float((p[ok] == y[ok]).mean())
                metrics["val/macro_f1"] = macro_f1(y[ok], p[ok])
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, *, best: bool = False) -> Path | None:
        if self.ckpt is None:
            return None
        s, opt = self.state, self.optimizer
        assert s is not None
        assert opt is not None
        tensors, opt_meta = flatten_optimizer_state(opt.state_dict())
        rng = all_gather_objects(self._boundary_rng.numpy().tobytes())  # type: ignore[union-attr]
        for r, b in enumerate(rng):
            tensors[f"rng.cpu.{r}"] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        if self._boundary_cuda_rng is not None:
            crng = all_gather_objects(self._boundary_cuda_rng.cpu().numpy().tobytes())
            for r, b in enumerate(crng):
                tensors[f"rng.cuda.{r}"] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        path = None
        if self.dist.is_main:
            state = {
                "version": STATE_VERSION,
                "config": self.config.to_dict(),
                "objectives": [o.name for o in self.objectives],
                "world_size": self.dist.world_size,
                "optimizer": opt_meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainer": s,
                "history": self.history.to_dict(),
            }
            path = self.ckpt.save(
                f"step-{s['step']:08d}", model=self.model, tensors=tensors, state=state, best=best
            )
            self._emit("checkpoint", path=str(path))
        barrier()
        return path if path is not None else self.ckpt.latest
