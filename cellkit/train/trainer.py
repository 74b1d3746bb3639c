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

The loop runs batches, sums losses, emits events and feeds the objectives' metric objects; the
rest lives beside it: :mod:`~cellkit.train.config` (settings, lr schedule),
:mod:`~cellkit.train.state` (:class:`~cellkit.train.TrainerState`, the counters a checkpoint
saves; :class:`History`), :mod:`~cellkit.train.metrics` (accuracy, macro-F1),
``_setup`` (optimizer, freezing, loaders, DDP) and ``_guard`` (one run per process, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from .._errors import ConfigError, DataError
from .._utils import ensure_writable_dir, get_logger
from .._utils._batch import FORWARD_KEYS  # the collator's contract (cellkit.data.collate)
from ._guard import SigintToStop, TrainingError, exclusive_training_run
from ._micro import restore_rng, rng_state
from ._micro import rows as micro_rows
from ._oom import free_memory, injected_oom, is_out_of_memory
from ._setup import (
    apply_freeze,
    batches_per_epoch,
    build_optimizer,
    check_batch,
    make_loader,
    resolve_device,
    wrap_distributed,
)
from .checkpoint import (
    CheckpointManager,
    checkpoint_is_intact,
    flatten_optimizer_state,
    load_weights,
    read_checkpoint,
    unflatten_optimizer_state,
)
from .config import TrainerConfig, lr_factor
from .distributed import all_gather_objects, all_reduce_sum, barrier, dist_info
from .events import Callback, Event, dispatch
from .metrics import Metric, MetricSet
from .metrics import macro_f1_from_confusion as macro_f1_from_confusion  # re-export (tests, old imports)
from .objectives import Objective, make_objectives
from .state import History, TrainerState, TrainResult

__all__ = [
    "FORWARD_KEYS",
    "History",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainerState",
    "TrainingError",
    "exclusive_training_run",
]

log = get_logger(__name__)

STATE_VERSION = 1
#: settings a resumed run may change without a warning
_RESUME_MAY_CHANGE = (
    "epochs",
    "max_steps",
    "checkpoint_dir",
    "progress",
    "device",
    "num_workers",
    "early_stopping_patience",
)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _batch_cells(batch: Mapping[str, Any]) -> int:
    for k in ("gene_ids", "input_ids", "labels"):
        if k in batch and isinstance(batch[k], Tensor):
            return int(batch[k].shape[0])
    return 1


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
        self.device = resolve_device(config.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None
        self.state: TrainerState | None = None  # where the run in progress stands (None: fresh)
        self.history = History()
        self._best_weights: dict[str, Tensor] | None = None
        self._total_steps: int | None = None
        self._t0 = time.time()
        #: cells per forward pass with ``micro_batch`` (``None``: whole batches, until "auto" halves)
        self._micro: int | None = None
        self._piece_cells = 0  # the largest piece of the last step (its record's "micro_batch")
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

        Parameters
        ----------
        reason
            The :attr:`TrainResult.status` the run ends with (``"interrupted"`` for Ctrl-C).
        """
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def _state(self) -> TrainerState:
        """The state of the run in progress (set by :meth:`fit` before the loop runs)."""
        assert self.state is not None
        return self.state

    # ------------------------------------------------------------------ set-up
    def lr_factor(self, step: int, epoch: int, total_steps: int | None) -> float:
        """Learning-rate multiplier for optimizer step ``step`` (0-based) in ``epoch``.

        Parameters
        ----------
        step, epoch
            The optimizer step (0-based) and its epoch.
        total_steps
            Planned optimizer steps of the run (``None``: unknown).
        """
        return lr_factor(self.config, step, epoch, total_steps)

    def new_metrics(self) -> list[Metric]:
        """Fresh metric objects of the objectives (:meth:`Objective.metrics`), one per name."""
        found: dict[str, Metric] = {}
        for o in self.objectives:
            for m in o.metrics():
                found.setdefault(m.name, m)
        return list(found.values())

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = self.config.amp
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _loader(
        self, data: Dataset, *, train: bool, collate_fn: Callable | None, epoch: int, skip: int
    ) -> Any:
        return make_loader(
            data, self.config, self.dist, train=train, collate_fn=collate_fn, epoch=epoch, skip=skip
        )

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
            frozen = apply_freeze(self.model, self.config.freeze)
            try:
                self.model.to(self.device)
                if resume:
                    self._resume(resume)
                else:
                    self._fresh_start()
                with SigintToStop(self):
                    return self._run(train, val, collate_fn, val_collate_fn or collate_fn)
            except BaseException as e:
                if self.dist.is_main:
                    dispatch(self.callbacks, self._event("error", error=e))
                raise
            finally:
                for p in frozen:
                    p.requires_grad_(requires_grad=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _new_scaler(self) -> Any:
        if self.config.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp='fp16' needs CUDA; on CPU use amp='bf16' or None.")
        return torch.amp.GradScaler(self.device.type) if self.config.amp == "fp16" else None

    def _fresh_start(self) -> None:
        torch.manual_seed(self.config.seed + self.dist.rank)
        self.optimizer = build_optimizer(self.model, self.config)
        self.scaler = self._new_scaler()
        self.history = History()
        self._best_weights = None
        self.state = TrainerState.fresh(
            [o.name for o in self.objectives], MetricSet(self.new_metrics(), prefix="train/")
        )
        self._micro = None
        self._snapshot_rng()

    def _snapshot_rng(self) -> None:
        s = self._state
        s.rng_cpu = torch.get_rng_state()
        s.rng_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _resume(self, resume: bool | str | Path) -> None:
        source: str | Path | None = None
        if isinstance(resume, str | Path):
            source = resume
        elif self.ckpt is not None and self.ckpt.latest is not None:
            source = self.ckpt.root
        if source is None:
            self._resume_in_memory()
        else:
            self._resume_from(source)

    def _resume_in_memory(self) -> None:
        """Go on from where this trainer's last :meth:`fit` stopped (no checkpoint to read)."""
        s = self.state
        if s is None:
            where = f"in {self.ckpt.root}" if self.ckpt is not None else "(no checkpoint_dir was given)"
            raise ConfigError(
                f"Nothing to resume: no intact checkpoint {where} and this trainer has not run yet. "
                "Start with resume=False, or point checkpoint_dir at the run's checkpoint directory."
            )
        if s.done:
            raise ConfigError("This run has finished; start a new one (resume=False) or raise epochs.")
        torch.set_rng_state(s.rng_cpu)  # type: ignore[arg-type]
        if s.rng_cuda is not None:
            torch.cuda.set_rng_state(s.rng_cuda, self.device)

    def _check_resumable(self, path: Path, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of another format or objectives; warn about changed settings."""
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
        saved = {k: v for k, v in state["config"].items() if k not in _RESUME_MAY_CHANGE}
        now = {k: v for k, v in self.config.to_dict().items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != now[k])
        if changed:
            log.warning(
                "resuming with changed settings: %s",
                ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed),
            )

    def _resume_from(self, source: str | Path) -> None:
        """Load weights, optimizer, scaler, RNG, counters and history from a checkpoint."""
        path, tensors, state = read_checkpoint(source)
        self._check_resumable(path, state)
        load_weights(self.model, path)
        self.optimizer = build_optimizer(self.model, self.config)
        self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
        self.scaler = None
        if self.config.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler(self.device.type)
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self.history = History(state["history"]["steps"], state["history"]["epochs"])
        self.state = TrainerState.from_dict(state["trainer"], MetricSet(self.new_metrics(), prefix="train/"))
        self._micro = self.state.micro_batch
        rank = self.dist.rank
        key = f"rng.cpu.{rank}" if f"rng.cpu.{rank}" in tensors else "rng.cpu.0"
        torch.set_rng_state(tensors[key])
        if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)
        self._snapshot_rng()
        self._best_weights = None
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, **kw: Any) -> Event:
        s = self.state
        return Event(
            kind,
            step=s.step if s is not None else 0,
            epoch=s.epoch if s is not None else 0,
            total_steps=self._total_steps,
            elapsed=time.time() - self._t0,
            **kw,
        )

    def _emit(self, kind: str, **kw: Any) -> None:
        if self.dist.is_main:
            dispatch(self.callbacks, self._event(kind, **kw))

    # ------------------------------------------------------------------ the loop
    def _run(self, train: Dataset, val: Dataset | None, collate_fn: Any, val_collate_fn: Any) -> TrainResult:
        c, s = self.config, self._state
        assert self.optimizer is not None
        per_epoch_batches, per_epoch, total = self._plan_steps(train)
        self._total_steps = total
        model = wrap_distributed(self.model, self.device, self.dist)
        self._emit("train_start", metrics={"lr": self.optimizer.param_groups[0]["lr"]})
        status = "completed"
        checked = False
        while s.epoch < c.epochs and not self._max_steps_reached():
            epoch = s.epoch
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
            if early or (epoch_done and self._end_epoch(model, val, val_collate_fn, epoch)):
                status = "early_stopped"
                break
            if self._stop.is_set():
                status = self._stop_reason or "stopped"
                break
        return self._finish(status)

    def _finish(self, status: str) -> TrainResult:
        s = self._state
        s.done = status in ("completed", "early_stopped")
        ckpt_path = self._checkpoint() if self.ckpt is not None else None
        if s.done and self.config.restore_best:
            self._restore_best()
        best_ckpt = self.ckpt.best if self.ckpt is not None else None
        self._emit("finish", status=status, metrics=dict(s.last_metrics))
        return TrainResult(
            status=status,
            history=self.history,
            metrics=dict(s.last_metrics),
            best_metric=s.best,
            best_step=s.best_step,
            checkpoint=ckpt_path,
            best_checkpoint=best_ckpt,
        )

    def _plan_steps(self, train: Dataset) -> tuple[int | None, int | None, int | None]:
        """Batches per epoch, optimizer steps per epoch and total optimizer steps (``None`` where unknown)."""
        c = self.config
        per_epoch_batches = batches_per_epoch(train, c, self.dist)
        per_epoch = None if per_epoch_batches is None else math.ceil(per_epoch_batches / c.grad_accum)
        total = None if per_epoch is None else per_epoch * c.epochs
        if c.max_steps is not None:
            total = c.max_steps if total is None else min(total, c.max_steps)
        return per_epoch_batches, per_epoch, total

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self._state.step >= self.config.max_steps

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
        c, s = self.config, self._state
        if hasattr(collate_fn, "set_epoch"):
            collate_fn.set_epoch(epoch)
        loader = self._loader(train, train=True, collate_fn=collate_fn, epoch=epoch, skip=s.batch)
        bar = self._progress(per_epoch, epoch, s.step - epoch * (per_epoch or 0))
        model.train()
        early = False
        window: list[Any] = []
        it = iter(loader)
        while True:
            batch = next(it, None)
            if batch is not None:
                if not checked:
                    check_batch(self.objectives, batch)
                    checked = True
                window.append(batch)
                consumed = s.batch + len(window)
                last_of_epoch = n_batches is not None and consumed >= n_batches
                if len(window) < c.grad_accum and not last_of_epoch:
                    continue
            elif not window:
                break
            self._optimizer_step(model, window, epoch, total)
            s.batch += len(window)
            window = []
            self._update_progress(bar)
            early = self._after_step(model, val, val_collate_fn, epoch)
            if early or self._stop.is_set() or self._max_steps_reached():
                break
        if bar is not None:
            bar.close()
        epoch_done = batch is None if n_batches is None else s.batch >= n_batches
        return early, epoch_done, checked

    def _update_progress(self, bar: Any) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{self.history.step_records[-1]['loss']:.4f}", refresh=False)

    def _after_step(self, model: nn.Module, val: Dataset | None, val_collate_fn: Any, epoch: int) -> bool:
        """Validation and checkpoint when due after an optimizer step; ``True`` when validation stops early."""
        c, s = self.config, self._state
        early = False
        due = c.eval_every_steps and s.step % c.eval_every_steps == 0 and val is not None
        if due and self._validate(model, val, val_collate_fn, epoch):
            early = True
        if c.checkpoint_every_steps and s.step % c.checkpoint_every_steps == 0:
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
        """One optimizer step over ``window`` (``grad_accum`` batches): its record, event and sums."""
        s, opt = self._state, self.optimizer
        assert opt is not None
        factor = self.lr_factor(s.step, epoch, total)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        opt.zero_grad(set_to_none=True)
        if self.config.micro_batch is None:
            sums, metrics = self._accumulate(model, window, epoch)
        else:
            sums, metrics = self._accumulate_in_pieces(model, window, epoch)
        self._apply_gradients()
        s.step += 1
        sums = all_reduce_sum(sums).cpu()
        metrics.sync()
        self._record_step(sums, metrics, epoch)

    def _accumulate(self, model: nn.Module, window: list[Any], epoch: int) -> tuple[Tensor, MetricSet]:
        """Forward and backward of each batch of ``window``; the step's sums (cells, cell-weighted
        loss, cell-weighted loss of each objective) and metrics."""
        sums = torch.zeros(2 + len(self.objectives), dtype=torch.float64, device=self.device)
        metrics = MetricSet(self.new_metrics())
        for i, raw in enumerate(window):
            batch = _to_device(raw, self.device)
            loss, terms, out = self._backward(
                model, batch, sync=i == len(window) - 1, n=len(window), epoch=epoch
            )
            self._add_sums(sums, batch, loss, terms)
            metrics.update(out, batch)
        return sums, metrics

    def _add_sums(self, sums: Tensor, batch: Mapping[str, Any], loss: Tensor, terms: Mapping[str, Tensor]) -> None:
        n = _batch_cells(batch)
        sums[0] += n
        sums[1] += loss.detach().double() * n
        for j, o in enumerate(self.objectives):
            sums[2 + j] += terms[o.name].detach().double() * n

    # ------------------------------------------------------------------ micro-batches
    def _accumulate_in_pieces(
        self, model: nn.Module, window: list[Any], epoch: int
    ) -> tuple[Tensor, MetricSet]:
        """:meth:`_accumulate` with each batch run in pieces of ``micro_batch`` cells; with
        ``micro_batch="auto"``, an out-of-memory error starts the step over in pieces of half the size."""
        auto = self.config.micro_batch == "auto"
        if not auto:
            self._micro = int(self.config.micro_batch)  # type: ignore[arg-type]
        rng = rng_state(self.device)
        while True:
            failed = None
            try:
                return self._pieces(model, window, epoch)
            except Exception as exc:  # only out-of-memory with "auto" is handled
                if not (auto and is_out_of_memory(exc)):
                    raise
                failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # outside the except block: the failed try's tensors are released
            self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            free_memory(self.device)
            restore_rng(rng, self.device)
            self._halve_micro(max(_batch_cells(b) for b in window), failed)

    def _halve_micro(self, batch_cells: int, reason: str) -> None:
        size = self._micro or batch_cells
        if size <= 1:
            raise ConfigError(
                f"Out of memory with a single cell per forward pass ({reason}). Try a shorter max_length "
                "(tokenize_options={'max_length': ...}), amp='bf16', or a device with more memory.",
                param="micro_batch",
            )
        self._micro = max(1, size // 2)
        log.warning(
            "micro_batch auto: %d → %d cells per forward pass after out-of-memory at step %d (%s); the step "
            "starts over from the same state",
            size,
            self._micro,
            self._state.step,
            reason,
        )

    def _pieces(self, model: nn.Module, window: list[Any], epoch: int) -> tuple[Tensor, MetricSet]:
        """One try of :meth:`_accumulate_in_pieces` at the current micro-batch size."""
        sums = torch.zeros(2 + len(self.objectives), dtype=torch.float64, device=self.device)
        metrics = MetricSet(self.new_metrics())
        for i, raw in enumerate(window):
            batch = _to_device(raw, self.device)
            n_cells = _batch_cells(batch)
            size = min(self._micro or n_cells, n_cells)
            self._piece_cells = max(self._piece_cells if i else 0, size)
            units = {o.name: o.units(batch) for o in self.objectives}
            whole = [o.name for o in self.objectives if units[o.name] is None]
            if size < n_cells and whole:
                raise ConfigError(
                    f"Objective(s) {whole} compare the cells of a batch with each other; a batch cannot be split "
                    "into micro-batches with them. Use micro_batch=None and a smaller batch_size.",
                    param="micro_batch",
                )
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
            terms = {o.name: torch.zeros((), dtype=torch.float32, device=self.device) for o in self.objectives}
            for a in range(0, n_cells, size):
                piece = micro_rows(batch, a, min(n_cells, a + size), n_cells)
                last = i == len(window) - 1 and a + size >= n_cells
                p_loss, p_terms, out = self._backward_piece(model, piece, units, sync=last, n=len(window), epoch=epoch)
                loss = loss + p_loss.detach()
                for name, t in p_terms.items():
                    terms[name] = terms[name] + t.detach()
                metrics.update(out, piece)
                del out
            self._add_sums(sums, batch, loss, terms)
        return sums, metrics

    def _backward_piece(
        self,
        model: nn.Module,
        piece: Mapping[str, Any],
        units: Mapping[str, Tensor | None],
        *,
        sync: bool,
        n: int,
        epoch: int,
    ) -> tuple[Tensor, dict[str, Tensor], Any]:
        """:meth:`_backward` of a piece of a batch: each term weighted by the piece's share of its units."""
        injected_oom(_batch_cells(piece))
        no_sync = self.dist.enabled and not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            _, raw_terms, out = self._losses(model, piece)
            terms = {}
            for o in self.objectives:
                whole = units[o.name]
                share = 1.0 if whole is None else (o.units(piece) / whole.clamp_min(1.0)).float()
                terms[o.name] = raw_terms[o.name] * share
            loss = sum(o.weight * terms[o.name] for o in self.objectives)
            self._backprop(loss, n=n, epoch=epoch)  # type: ignore[arg-type]
        return loss, terms, out  # type: ignore[return-value]

    def _backward(
        self, model: nn.Module, batch: Mapping[str, Any], *, sync: bool, n: int, epoch: int
    ) -> tuple[Tensor, dict[str, Tensor], Any]:
        """Forward and backward of one micro-batch (gradients synced over ranks on the last, ``sync``)."""
        no_sync = self.dist.enabled and not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss, terms, out = self._losses(model, batch)
            self._backprop(loss, n=n, epoch=epoch)
        return loss, terms, out

    def _backprop(self, loss: Tensor, *, n: int, epoch: int) -> None:
        """Backward of ``loss / n`` (``n`` micro-batches per step), refusing a non-finite loss."""
        if self.scaler is None and not torch.isfinite(loss):
            raise TrainingError(
                f"The loss became {loss.item()} at step {self._state.step} (epoch {epoch + 1}). Lower the "
                "learning rate, enable gradient clipping (max_grad_norm), or check the inputs for NaN/inf."
            )
        scaled = loss / n
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def _apply_gradients(self) -> None:
        opt, c = self.optimizer, self.config
        assert opt is not None
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

    def _record_step(self, sums: Tensor, metrics: MetricSet, epoch: int) -> None:
        """The step's history record and ``step_end`` event; its sums join the epoch's."""
        s = self._state
        cells = float(sums[0])
        rec: dict[str, Any] = {
            "step": s.step,
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],  # type: ignore[union-attr]
            "cells": int(cells),
        }
        if self.config.micro_batch is not None:
            rec["micro_batch"] = self._piece_cells
            s.micro_batch = self._micro
        rec["loss"] = float(sums[1] / cells)
        for j, o in enumerate(self.objectives):
            rec[f"loss/{o.name}"] = float(sums[2 + j] / cells)
        rec.update(metrics.compute())
        losses = {"cells": cells, "loss": float(sums[1])}
        losses.update({f"loss/{o.name}": float(sums[2 + j]) for j, o in enumerate(self.objectives)})
        s.add_step(losses, metrics)
        self.history.step_records.append(rec)
        self._snapshot_rng()
        self._emit("step_end", metrics={k: v for k, v in rec.items() if k not in ("step", "epoch")})

    def _end_epoch(self, model: nn.Module, val: Dataset | None, val_collate_fn: Any, epoch: int) -> bool:
        """The epoch record (training sums, validation), best tracking and checkpoint; ``True``: stop early."""
        s = self._state
        rec: dict[str, Any] = {"epoch": epoch, "step": s.step, "lr": self.optimizer.param_groups[0]["lr"]}  # type: ignore[union-attr]
        rec.update(s.epoch_record([o.name for o in self.objectives]))
        if val is not None:
            metrics = self.evaluate(val, collate_fn=val_collate_fn, model=model)
            rec.update(metrics)
            self._emit("validation", metrics=metrics)
        s.last_metrics = {k: v for k, v in rec.items() if k not in ("epoch", "step")}
        stop, improved = self._track_best(rec)
        self.history.epoch_records.append(rec)
        self._emit("epoch_end", metrics=dict(s.last_metrics))  # event.epoch: the epoch that ended
        s.epoch = epoch + 1
        s.batch = 0
        s.new_epoch([o.name for o in self.objectives])
        if self.ckpt is not None:
            self._checkpoint(best=improved)
        return stop

    def _validate(self, model: nn.Module, val: Dataset, val_collate_fn: Any, epoch: int) -> bool:
        """A validation between epochs (``eval_every_steps``); ``True``: stop early."""
        s = self._state
        metrics = self.evaluate(val, collate_fn=val_collate_fn, model=model)
        self._emit("validation", metrics=metrics)
        s.last_metrics = metrics
        stop, improved = self._track_best({**metrics, "step": s.step})
        if self.ckpt is not None and improved:
            self._checkpoint(best=True)
        return stop

    def _track_best(self, rec: Mapping[str, Any]) -> tuple[bool, bool]:
        """Compare ``rec``'s monitored metric with the best so far: ``(stop early, improved)``."""
        c, s = self.config, self._state
        value = rec.get(c.monitor)
        if value is None:
            if c.monitor == "val/loss" and "train/loss" in rec:
                value = rec["train/loss"]
            else:
                return False, False
        better = s.best is None or (value < s.best if c.mode == "min" else value > s.best)
        if better:
            s.best, s.best_step, s.bad_evals = float(value), s.step, 0
            if self.ckpt is None and c.restore_best:
                self._best_weights = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
            return False, True
        s.bad_evals += 1
        return c.early_stopping_patience is not None and s.bad_evals >= c.early_stopping_patience, False

    def _restore_best(self) -> None:
        s = self._state
        if s.best_step is None or s.best_step == s.step:
            return
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)
        elif self.ckpt is not None:
            # the checkpoint of the best step itself; the pointer only as a fallback
            by_step = self.ckpt.root / f"step-{s.best_step:08d}"
            best = by_step if checkpoint_is_intact(by_step) else self.ckpt.best
            if best is None:
                return
            load_weights(self.model, best)
        else:
            return
        log.info("restored the weights of step %d (best %s = %.4g)", s.best_step, self.config.monitor, s.best)

    @torch.no_grad()
    def evaluate(
        self, data: Dataset, *, collate_fn: Callable | None = None, model: nn.Module | None = None
    ) -> dict[str, float]:
        """Loss terms (and the objectives' metrics: accuracy / macro-F1 with a classification
        objective) on ``data``.

        Every rank evaluates its share; the metrics are reduced over ranks. Keys are prefixed
        ``val/``.

        Parameters
        ----------
        data
            A map-style dataset of per-cell items (with ``collate_fn``) or an iterable one.
        collate_fn
            Turns a list of items into a batch.
        model
            The model to run (default: the trainer's; the loop passes its DDP wrapper).
        """
        model = model or self.model
        was_training = model.training
        model.eval()
        metric_set = MetricSet(self.new_metrics(), prefix="val/", skip_empty=True)
        try:
            loader = self._loader(data, train=False, collate_fn=collate_fn, epoch=0, skip=0)
            sums = torch.zeros(1 + len(self.objectives), dtype=torch.float64, device=self.device)
            for raw in loader:
                batch = _to_device(raw, self.device)
                _, terms, out = self._losses(model, batch)
                n = _batch_cells(batch)
                sums[0] += n
                for j, o in enumerate(self.objectives):
                    sums[1 + j] += terms[o.name].double() * n
                metric_set.update(out, batch)
        finally:
            model.train(was_training)
        sums = all_reduce_sum(sums).cpu()
        metric_set.sync()
        cells = float(sums[0])
        metrics: dict[str, float] = {}
        if cells:
            metrics["val/loss"] = float(
                sum(o.weight * sums[1 + j] for j, o in enumerate(self.objectives)) / cells
            )
            for j, o in enumerate(self.objectives):
                metrics[f"val/loss/{o.name}"] = float(sums[1 + j] / cells)
        metrics.update(metric_set.compute())
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _rng_tensors(self) -> dict[str, Tensor]:
        """Every rank's RNG states at the last step boundary (a collective: every rank calls it)."""
        s, tensors = self._state, {}
        for r, b in enumerate(all_gather_objects(s.rng_cpu.numpy().tobytes())):  # type: ignore[union-attr]
            tensors[f"rng.cpu.{r}"] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        if s.rng_cuda is not None:
            for r, b in enumerate(all_gather_objects(s.rng_cuda.cpu().numpy().tobytes())):
                tensors[f"rng.cuda.{r}"] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        return tensors

    def _checkpoint(self, *, best: bool = False) -> Path | None:
        if self.ckpt is None:
            return None
        s, opt = self._state, self.optimizer
        assert opt is not None
        tensors, opt_meta = flatten_optimizer_state(opt.state_dict())
        tensors.update(self._rng_tensors())
        path = None
        if self.dist.is_main:
            state = {
                "version": STATE_VERSION,
                "config": self.config.to_dict(),
                "objectives": [o.name for o in self.objectives],
                "world_size": self.dist.world_size,
                "optimizer": opt_meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainer": s.to_dict(),
                "history": self.history.to_dict(),
            }
            path = self.ckpt.save(
                f"step-{s.step:08d}", model=self.model, tensors=tensors, state=state, best=best
            )
            self._emit("checkpoint", path=str(path))
        barrier()
        return path if path is not None else self.ckpt.latest
