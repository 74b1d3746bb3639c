"""Command-line entry point: ``cellkit <command>`` (also ``python -m cellkit``).

Commands: ``demo``, ``studio``, ``info``; training: ``finetune``, ``pretrain``; headless atlas jobs:
``tokenize`` (an ``.h5ad`` → a token shard directory), ``embed`` (cell embeddings) and
``predict`` (cell-type labels from a fine-tuned model). ``embed`` / ``predict`` / ``finetune`` /
``pretrain`` run as one process or under ``torchrun`` (NCCL on GPUs, gloo on CPUs)::

    cellkit tokenize atlas.h5ad --model MODEL --output atlas_tokens/
    torchrun --nproc_per_node 4 -m cellkit embed atlas_tokens/ --model MODEL --output atlas_emb/
    cellkit predict query.h5ad --model tuned/model --output query_predicted.h5ad

Every command checks its outputs can be written before any work, writes them atomically, prints
``cellkit: error: …`` and exits with a code other than 0 on failure (2: a usage, data or model
problem; 3: training did not complete).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import CellkitError, ConfigError, DataError

__all__ = ["main"]


#: where ``cellkit demo`` writes its results (relative to the working directory) unless --out says otherwise
DEMO_DIR = "cellkit-demo"
#: what ``cellkit demo`` writes into its output directory (an existing one holding only these is replaced)
DEMO_OUTPUTS = ("pbmc_cellkit.h5ad", "umap.html", "training.html", "confusion.html", "model")


def _is_demo_output(path: Path) -> bool:
    """``path`` holds only what an earlier ``cellkit demo`` wrote (so replacing it loses nothing else)."""
    return all(p.name in DEMO_OUTPUTS for p in path.iterdir())


def _starting(stage: str, text: str) -> None:
    """Say what a long step of the demo does before it starts (its bar and its result follow)."""
    print(f"{stage:<8}{text}", flush=True)


def _epoch_estimates(epochs: int) -> Any:
    """A fine-tuning callback that prints, after each epoch, the time so far and an estimate of the rest."""
    from tqdm import tqdm

    def on_event(event: Any) -> None:
        if event.kind != "epoch_end" or not event.step or not event.total_steps:
            return
        left = event.elapsed / event.step * max(event.total_steps - event.step, 0)
        loss = event.metrics.get("loss")
        tqdm.write(
            f"        epoch {event.epoch + 1}/{epochs} done · {tqdm.format_interval(event.elapsed)} elapsed · "
            f"about {tqdm.format_interval(left)} left" + ("" if loss is None else f" · loss {loss:.3f}")
        )

    return on_event


def _demo(args: argparse.Namespace) -> int:
    """Run the demo job into a fresh copy of the output directory, then swap it in as a whole."""
    from ._utils import atomic_directory

    out = Path(args.out or DEMO_DIR).expanduser()
    print(f"output  {out.resolve()} (written as a whole when the job ends)")
    t_start = time.perf_counter()
    with atomic_directory(out, may_replace=_is_demo_output, what="cellkit demo output directory") as tmp:
        code = _demo_job(args, tmp)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"saved   {out.resolve()}: {files}")
    print(
        f"done    in {time.perf_counter() - t_start:.0f} s — next: `cellkit studio` opens the studio notebook in JupyterLab"
    )
    return code


def _demo_job(args: argparse.Namespace, out: Path) -> int:
    """The main job on the embedded default: the shipped demo model on real PBMCs, end to end, into ``out``."""
    import numpy as np
    import torch

    from . import analysis, viz
    from .data.tokenize import tokenize
    from .datasets import DEMO_FINETUNE, demo_model, pbmc_demo
    from .tasks import finetune, predict, stratified_split

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    clock = [t_start]

    def took() -> str:
        now = time.perf_counter()
        text = f"[{now - clock[0]:.1f} s]"
        clock[0] = now
        return text

    adata, model = pbmc_demo(), demo_model()
    print(
        f"data    pbmc68k_reduced: {adata.n_obs} PBMCs × {adata.raw.n_vars} genes (.raw, log1p CP10k), 10 cell types"
    )
    print(f"model   {model!r}")
    print(
        "        (the shipped demo model: pretrained by cellkit on these cells, a demo — not a foundation model)"
    )
    bars = not args.quiet  # a tqdm bar (with its estimate) on every long step
    tokens = tokenize(adata, model, progress=bars)
    lengths = tokens.lengths
    print(
        f"tokens  {len(tokens)} cells, {int(np.median(lengths))} tokens per cell (median, {lengths.min()}–{lengths.max()}); "
        f"coverage {tokens.coverage.n_matched}/{tokens.coverage.n_genes} genes {took()}"
        if tokens.coverage is not None
        else f"tokens  {len(tokens)} cells"
    )

    _starting("embed", f"embedding {adata.n_obs} cells with the model, then UMAP …")
    analysis.embed_cells(adata, model, key_added="X_cellkit", progress=bars)
    analysis.umap(adata, use_rep="X_cellkit")
    m = analysis.embedding_metrics(adata, label_key="bulk_labels", use_rep="X_cellkit")
    pca = analysis.embedding_metrics(adata, label_key="bulk_labels", use_rep="X_pca")
    print(
        f"embed   cell embeddings {adata.obsm['X_cellkit'].shape}: NMI {m['nmi']:.3f}, ARI {m['ari']:.3f}, "
        f"ASW {m['asw_label']:.3f}, avg_bio {m['avg_bio']:.3f} (PCA of the same data: avg_bio {pca['avg_bio']:.3f}) "
        f"{took()}"
    )
    print(
        "        (NMI / ARI: agreement of Leiden clusters of the embedding with the cell types, 0–1; ASW: how "
        "well the types separate, 0–1; avg_bio: their mean — scib's definitions, higher is better)"
    )
    halves = stratified_split(adata.obs["bulk_labels"], val_size=0.0, test_size=0.5, seed=args.seed)
    ref, query = adata[halves == "train"].copy(), adata[halves == "test"].copy()
    analysis.transfer_labels(query, ref, label_key="bulk_labels", key_added="mapped")
    hit = (query.obs["mapped"].astype(str) == query.obs["bulk_labels"].astype(str)).mean()
    print(
        f"map     kNN label transfer, half → half: accuracy {hit:.3f} on {query.n_obs} query cells {took()}"
    )

    status = "skipped"
    if args.epochs > 0:
        # the demo model's recipe (cellkit.datasets.DEMO_FINETUNE), with fewer epochs by default
        recipe = {**DEMO_FINETUNE, "epochs": args.epochs, "warmup_steps": 10}
        _starting("train", f"fine-tuning {args.epochs} epochs; an estimate follows each epoch …")
        result = finetune(
            adata,
            model,
            label_key="bulk_labels",
            seed=args.seed,
            progress=bars,
            callbacks=[_epoch_estimates(args.epochs)],
            **recipe,
        )
        status = result.status
        r = result.metrics
        print(
            f"train   fine-tuned {args.epochs} epochs ({status}): held-out accuracy {r['accuracy']:.3f}, "
            f"macro-F1 {r['macro_f1']:.3f} on {int(result.confusion.to_numpy().sum())} test cells {took()}"
        )
        if result.baseline_metrics:
            b = result.baseline_metrics
            print(
                f"        logistic regression on the same cells: accuracy {b['accuracy']:.3f}, "
                f"macro-F1 {b['macro_f1']:.3f} (the baseline to beat)"
            )
        predict(adata, result.model, key_added="cellkit_prediction", progress=bars)
        result.model.save(out / "model")
        viz.save_html(viz.training_curves(result.history), out / "training.html")
        viz.save_html(viz.confusion_matrix(result.confusion), out / "confusion.html")
    viz.save_html(viz.embedding(adata, basis="X_cellkit_umap", color="bulk_labels"), out / "umap.html")
    adata.write_h5ad(out / "pbmc_cellkit.h5ad")
    return 0 if status in ("completed", "early_stopped", "skipped") else 1


def _info(args: argparse.Namespace) -> int:
    """Describe a model directory, a run record (``run.json``, a directory or output with one), or both."""
    from ._errors import CheckpointError
    from ._utils._run import load_run, run_file_for
    from .checkpoints import detect_format

    path = Path(args.path)
    record_file = run_file_for(path)
    if record_file.exists():
        print(load_run(path).summary())
        if not path.is_dir():
            return 0
        try:
            detect_format(path)
        except CheckpointError:
            return 0  # a run directory, a checkpoint root or a result store: the record says it all
        print()
    _describe_model(path)
    return 0


def _describe_model(path: Path) -> None:
    from .model import load_model

    model = load_model(path)
    print(repr(model))
    report = model.load_report
    if report is not None:
        print(report.summary())
    c = model.config.encoder
    print(
        f"architecture: d_model {c.d_model}, heads {c.n_heads}, layers {c.n_layers}, d_ff {c.d_ff}, "
        f"{c.activation}, {c.norm_scheme}-norm, values: {c.value_encoder}, pooling: {model.config.pooling}"
    )
    print(f"vocabulary: {len(model.vocab):,} tokens; specials {model.vocab.specials}")


def _parse_kv(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` (values parsed as JSON when they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} takes KEY=VALUE, got {pair!r}.")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
        except RecursionError:
            raise ConfigError(
                f"{what} {key}: the value is nested too deeply; pass a number, string or flat list."
            ) from None
    return out


def _objectives(text: str | None) -> Any:
    """``"cls,gep=0.5"`` → ``{"cls": 1.0, "gep": 0.5}`` (argparse ``type=``: bad text is a usage error)."""
    if not text:
        return None
    spec: dict[str, float] = {}
    for part in text.split(","):
        name, eq, weight = (s.strip() for s in part.partition("="))
        if not name:
            raise argparse.ArgumentTypeError(
                f"{text!r} has an empty objective name; write names with optional weights, e.g. 'cls,gep=0.5'."
            )
        if name in spec:
            raise argparse.ArgumentTypeError(f"objective {name!r} is given twice in {text!r}.")
        try:
            value = float(weight) if eq else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(
                f"the weight of {name!r} must be a finite number >= 0, got {weight!r}; e.g. 'cls,gep=0.5'."
            )
        spec[name] = value
    return spec


def _load_for_training(path: str) -> Any:
    from .model import load_model

    if path == "demo":
        from .datasets import demo_model

        return demo_model()
    return load_model(path)


def _read_data(path: str, *, backed: bool) -> Any:
    import anndata as ad

    if path == "pbmc":
        from .datasets import pbmc_demo

        return pbmc_demo()
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"No data at {p}; give an .h5ad file, a token shard directory (cellkit.tokenize(..., output=DIR)) "
            "or 'pbmc' for the shipped demo data."
        )
    if p.is_dir():
        from .data.tokenized import open_shards

        return open_shards(p)  # a directory without a manifest is a clear DataError there
    if p.suffix != ".h5ad":
        raise DataError(f"{p} is not an .h5ad file; convert it with anndata/scanpy first.")
    return ad.read_h5ad(p, backed="r" if backed else None)


def _is_shards(data: Any) -> bool:
    from .data.tokenized import ShardedTokens

    return isinstance(data, ShardedTokens)


def _describe_data(data: Any) -> str:
    if _is_shards(data):
        return f"{len(data):,} pre-tokenized cells ({data.scheme!r} scheme, {data.n_tokens:,} tokens) from {data.path}"
    return f"{data.n_obs:,} cells × {data.n_vars:,} genes"


def _train_common(args: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
        "use_raw": args.use_raw,
        "layer": args.layer,
        "gene_column": args.gene_column,
        "tokenize_options": _parse_kv(args.tokenize_option, "--tokenize-option") or None,
        "progress": not args.quiet,
        "device": args.device,
        "amp": args.amp,
    }
    if args.micro_batch is not None:
        opts["micro_batch"] = args.micro_batch
    opts.update(_parse_kv(args.option, "--option"))
    return opts


#: what a training command writes into --out (a run directory; other entries, e.g. a checkpoint
#: directory placed inside it, are left alone)
RUN_MODEL_DIR = "model"
RUN_FILES = ("metrics.json", "history_steps.csv", "history_epochs.csv", "run.json")


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that cannot be written before any data is read or a step is trained."""
    if not args.out:
        return
    from ._utils import ensure_writable_dir
    from .checkpoints.native import replaceable_model_dir

    out = ensure_writable_dir(args.out, what="--out")
    model_dir = out / RUN_MODEL_DIR
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        raise ConfigError(
            f"--out {out}: {model_dir} exists and is not a model directory; choose another --out."
        )
    if model_dir.is_dir() and any(model_dir.iterdir()) and not replaceable_model_dir(model_dir):
        raise ConfigError(
            f"--out {out}: {model_dir} is a non-empty directory that is not a saved model, and the trained model "
            "replaces it as a whole. Choose another --out (or move that directory away)."
        )
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise ConfigError(f"--out {out}: {out / name} is a directory; the run writes a file there.")


def _save_outputs(args: argparse.Namespace, result: Any, extra: dict[str, Any]) -> None:
    """Write the run's outputs into the run directory ``--out``.

    ``--out/model`` (the trained model, with its ``run.json``) is replaced as a whole; ``metrics.json``,
    the two history tables and ``run.json`` (the run record) are each replaced atomically. A kill at any moment leaves every output old or new, each
    readable, and never touches other entries of ``--out`` (such as ``--checkpoint-dir`` inside it).
    """
    if not args.out:
        return
    from ._utils import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / RUN_MODEL_DIR)
    atomic_write_text(out / "history_steps.csv", result.history.steps.to_csv(index=False))
    atomic_write_text(out / "history_epochs.csv", result.history.epochs.to_csv(index=False))
    summary = {"status": result.status, "metrics": result.metrics, **extra}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    if result.run is not None:
        from ._utils._run import write_run

        write_run(result.run, out)
    print(f"saved   {out}: {RUN_MODEL_DIR}/, {', '.join(RUN_FILES)}")


def _note_data_path(record: Any, data: str) -> None:
    """The command read its cells from ``--data``: say so in the run record (``cellkit.rerun`` reads it again)."""
    p = Path(data)
    if record is None or not p.exists():
        return
    record.options["adata"] = data
    record.not_replayable = [n for n in record.not_replayable if n != "adata"]
    record.paths["adata"] = str(p.resolve())
    if isinstance(record.data, dict):
        record.data["path"] = data


def _finetune(args: argparse.Namespace) -> int:
    from .tasks import finetune
    from .train import init_distributed

    info = init_distributed()
    if info.is_main:
        _check_out(args)
    model = _load_for_training(args.model)
    adata = _read_data(args.data, backed=args.backed)
    opts = _train_common(args)
    objectives = args.objectives or ("cls",)
    if info.is_main:
        print(f"model   {model!r}")
        print(f"data    {_describe_data(adata)}; label_key={args.label_key!r}")
        if info.enabled:
            print(f"ddp     {info.world_size} processes")
    t0 = time.perf_counter()
    result = finetune(
        adata,
        model,
        label_key=args.label_key,
        batch_key=args.batch_key,
        cells=args.cells,
        objectives=objectives,
        val_size=args.val_size,
        test_size=args.test_size,
        class_weight=args.class_weight,
        freeze_layers=args.freeze_layers,
        freeze_embeddings=args.freeze_embeddings,
        **opts,
    )
    seconds = time.perf_counter() - t0
    _note_data_path(result.run, args.data)
    if info.is_main:
        m = result.metrics
        print(f"status  {result.status} after {len(result.history.epoch_records)} epochs in {seconds:.1f} s")
        if "macro_f1" in m:
            print(
                f"test    accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on {int(result.confusion.to_numpy().sum())} held-out cells"
            )
            b = result.baseline_metrics
            if b:
                print(
                    f"baseline logistic regression (same cells, the model's tokens): accuracy {b['accuracy']:.3f}, "
                    f"macro-F1 {b['macro_f1']:.3f}"
                )
            print(result.report.round(3).to_string())
        _save_outputs(
            args, result, {"classes": result.classes, "seconds": seconds, "world_size": info.world_size}
        )
    _finish_distributed(info)
    return 0 if result.status in ("completed", "early_stopped") else 3


def _pretrain(args: argparse.Namespace) -> int:
    from .presets import build_model
    from .tasks import pretrain
    from .train import init_distributed

    info = init_distributed()
    if info.is_main:
        _check_out(args)
    adata = _read_data(args.data, backed=args.backed)
    if args.model:
        model = _load_for_training(args.model)
    elif _is_shards(adata):
        raise DataError(
            "Pretraining from a token shard directory needs --model (the model whose vocabulary made the "
            "tokens); a fresh model is built from an .h5ad's genes."
        )
    else:
        arch = _parse_kv(args.arch, "--arch")
        genes = adata.raw.var_names if args.use_raw and adata.raw is not None else adata.var_names
        if args.gene_column:
            genes = adata.var[args.gene_column].astype(str)
        model = build_model(list(genes), family=args.family, seed=args.seed, **arch)
    opts = _train_common(args)
    if info.is_main:
        print(f"model   {model!r}")
        print(f"data    {_describe_data(adata)}")
    t0 = time.perf_counter()
    result = pretrain(
        adata,
        model,
        objectives=args.objectives,
        cells=args.cells,
        val_size=args.val_size,
        mask_ratio=args.mask_ratio,
        **opts,
    )
    seconds = time.perf_counter() - t0
    _note_data_path(result.run, args.data)
    if info.is_main:
        last = result.history.epoch_records[-1] if result.history.epoch_records else {}
        losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if "loss" in k)
        print(
            f"status  {result.status} after {len(result.history.epoch_records)} epochs in {seconds:.1f} s; {losses}"
        )
        _save_outputs(args, result, {"seconds": seconds, "world_size": info.world_size})
    _finish_distributed(info)
    return 0 if result.status in ("completed", "early_stopped") else 3


#: where ``cellkit studio`` puts its copy of the studio notebook (relative to the working directory)
STUDIO_DIR = "cellkit-studio"
STUDIO_NOTEBOOK_NAME = "studio.ipynb"
#: the studio notebook shipped in the package (kept identical to the repo's notebooks/00_studio.ipynb) and
#: the JupyterLab page config ``cellkit studio`` adds (the announcements plugin off: no "Jupyter news" toast)
_LAB_FILES = Path(__file__).resolve().parent / "_lab"
SHIPPED_STUDIO_NOTEBOOK = _LAB_FILES / "studio.ipynb"
_LAB_CONFIG = _LAB_FILES / "config"


def _studio_copy(directory: Path) -> Path:
    """The user's copy of the studio notebook in ``directory``: written when absent, never overwritten."""
    from ._utils import ensure_writable_dir

    nb = directory / STUDIO_NOTEBOOK_NAME
    shipped = SHIPPED_STUDIO_NOTEBOOK.read_bytes()
    if nb.is_file():
        if nb.read_bytes() == shipped:
            print(f"studio  {nb.resolve()} (the shipped studio notebook)")
        else:
            print(
                f"studio  {nb.resolve()}: kept your copy (it differs from the shipped notebook: your edits or "
                "saved outputs); delete it, or give another --dir, for a fresh one"
            )
        return nb
    if nb.exists() or nb.is_symlink():
        raise ConfigError(f"{nb} exists and is not a notebook file; move it away or give another --dir.")
    ensure_writable_dir(directory, what="--dir")
    directory.mkdir(parents=True, exist_ok=True)
    with open(nb, "xb") as fh:  # exclusive create: an existing file is never replaced
        fh.write(shipped)
    print(
        f"studio  {nb.resolve()}: a fresh copy of the studio notebook (yours to edit; cellkit never overwrites it)"
    )
    return nb


def _studio_target(args: argparse.Namespace) -> Path:
    """The notebook to open: the one given, else the user's copy of the studio notebook in ``--dir``."""
    if args.notebook is None:
        return _studio_copy(Path(args.dir))
    nb = Path(args.notebook)
    if not nb.is_file() or nb.suffix != ".ipynb":
        raise DataError(
            f"No notebook at {nb}; give an existing .ipynb file (or none for the studio notebook)."
        )
    print(f"studio  {nb.resolve()}")
    return nb


def _studio_command(notebook: Path, *, port: int | None, no_browser: bool) -> list[str]:
    """The JupyterLab command line that serves ``notebook``'s directory and opens ``notebook``.

    The server's root is the notebook's directory (so the file browser cannot reach, and autosave
    cannot touch, files elsewhere, such as the notebooks of a cellkit checkout); the URL it prints and
    opens is the notebook itself, not the Launcher; news and update checks are off.
    """
    from urllib.parse import quote

    root = notebook.resolve().parent
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.default_url=/lab/tree/{quote(notebook.name)}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]
    if port is not None:
        cmd += [f"--ServerApp.port={port}"]
    if no_browser:
        cmd += ["--no-browser"]
    return cmd


def _studio_environment() -> dict[str, str]:
    """``os.environ`` with cellkit's JupyterLab page config added to ``JUPYTER_CONFIG_PATH``.

    The page config turns off JupyterLab's announcements plugin, whose "Would you like to get notified
    about official Jupyter news?" toast ``--LabApp.news_url=None`` alone does not stop. It is added to
    the user's Jupyter configuration, not written into it.
    """
    import os

    env = dict(os.environ)
    extra = [str(_LAB_CONFIG), *filter(None, env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(dict.fromkeys(extra))
    return env


def _studio(args: argparse.Namespace) -> int:
    """Open the studio notebook in JupyterLab (the README's first command ends here)."""
    import importlib.util
    import os

    if importlib.util.find_spec("jupyterlab") is None:
        raise ConfigError("JupyterLab is not installed in this environment; pip install jupyterlab.")
    nb = _studio_target(args)
    cmd = _studio_command(nb, port=args.port, no_browser=args.no_browser)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # containers and cluster nodes often run as root; JupyterLab refuses to start there otherwise
        cmd += ["--allow-root"]
        print("note    running as root: starting JupyterLab with --allow-root")
    print(
        f"next    JupyterLab opens {nb.name}: click its code cell and press Shift+Enter to start the studio; "
        "stop the server with Ctrl-C"
    )
    print("+ " + " ".join(cmd), flush=True)
    if args.print_command:
        return 0
    env = _studio_environment()
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # hand the terminal (and Ctrl-C) to JupyterLab
    import subprocess

    return subprocess.call(cmd, env=env)


# ============================================================================== headless atlas jobs
def _load_model_arg(path: str) -> Any:
    """``--model``: a model directory (cellkit, scGPT, Geneformer) or ``demo``."""
    return _load_for_training(path)


def _check_tokens_out(path: str, *, overwrite: bool) -> None:
    """``tokenize --output``: writable, and not a directory of something else (before any work)."""
    from ._utils import ensure_writable_dir

    out = ensure_writable_dir(path, what="--output", replaced_whole=True)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise ConfigError(
                f"--output {out} is a non-empty directory that is not a token shard directory; give a new or "
                "empty directory."
            )
        if not overwrite:
            raise ConfigError(f"--output {out} already holds token shards; pass --overwrite to replace them.")


def _tokenize_cmd(args: argparse.Namespace) -> int:
    import os

    from ._utils._run import write_run
    from .analysis._runs import RunRecorder
    from .data.tokenize import tokenize

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("cellkit tokenize runs as one process; start it without torchrun.")
    _check_tokens_out(args.output, overwrite=args.overwrite)
    for path in args.input:
        p = Path(path)
        if not p.is_file() or p.suffix != ".h5ad":
            raise DataError(f"No .h5ad file at {p}; give one or more .h5ad files (partitions of one dataset).")
    model = _load_model_arg(args.model)
    opts = _parse_kv(args.tokenize_option, "--tokenize-option")
    print(f"model   {model!r}")
    t0 = time.perf_counter()
    call = {
        "scheme": args.scheme,
        "cells": args.cells,
        "layer": args.layer,
        "use_raw": args.use_raw,
        "gene_column": args.gene_column,
        "obs_columns": args.obs_column or (),
        "output": args.output,
        "max_shard_samples": args.shard_size,
        "shard_format": args.shard_format,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
        **opts,
    }
    data = args.input[0] if len(args.input) == 1 else list(args.input)
    recorder = RunRecorder("cellkit.tokenize", {"adata": data, "model": model, **call})
    shards = tokenize(data, model, **call)
    write_run(
        recorder.finish(
            status="completed",
            metrics={"n_cells": len(shards), "n_shards": shards.n_shards, "n_tokens": shards.n_tokens},
            outputs={"output": args.output, "scheme": shards.scheme},
        ),
        args.output,
    )
    print(shards.summary())
    print(f"saved   {Path(args.output).resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0


def _inference_data(path: str) -> Any:
    """An ``.h5ad`` (opened backed: read chunk by chunk) or a token shard directory."""
    p = Path(path)
    if p.is_dir():
        return _read_data(path, backed=True)
    if not p.exists():
        raise DataError(
            f"No data at {p}; give an .h5ad file or a token shard directory (cellkit tokenize ... --output DIR)."
        )
    return _read_data(path, backed=True)


def _inference_cmd(args: argparse.Namespace, task: str) -> int:
    from .analysis.atlas import check_output, embed_to_output, predict_to_output
    from .train import init_distributed

    info = init_distributed()
    source = Path(args.input) if Path(args.input).suffix == ".h5ad" and Path(args.input).is_file() else None
    check_output(args.output, overwrite=args.overwrite, source=source)  # before the model or data is read
    model = _load_model_arg(args.model)
    data = _inference_data(args.input)
    if info.is_main:
        print(f"model   {model!r}")
        print(f"data    {_describe_data(data)}")
        if info.enabled:
            print(f"ranks   {info.world_size} processes")
    common = {
        "output": args.output,
        "cells": args.cells,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "device": args.device,
        "precision": args.precision,
        "tokenize_options": _parse_kv(args.tokenize_option, "--tokenize-option") or None,
        "layer": args.layer,
        "use_raw": args.use_raw,
        "gene_column": args.gene_column,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
    }
    t0 = time.perf_counter()
    if task == "embed":
        key = args.key_added or "X_cellkit"
        run = embed_to_output(
            data,
            model,
            key_added=key,
            pooling=args.pooling,
            hidden_layer=args.hidden_layer,
            normalize=args.normalize,
            on_empty=args.on_empty,
            **common,
        )
    else:
        key = args.key_added or "cellkit_prediction"
        run = predict_to_output(data, model, key_added=key, **common)
    seconds = time.perf_counter() - t0
    if info.is_main:
        if run.already_complete:
            print(f"done    {args.output} already holds these results (same input, model and settings); nothing to do")
        else:
            print(
                f"{task:<8}{run.n_chunks} chunks: {run.computed} computed, {run.skipped} found done earlier, "
                f"on {run.world_size} process(es) in {seconds:.1f} s"
            )
            print(f"saved   {Path(args.output).resolve()} ({key})")
        if run.batch_size is not None:
            print(f"batch   {_auto_summary(run)}")
    _finish_distributed(info)
    return 0


def _auto_summary(run: Any) -> str:
    """``--batch-size auto``: the size that worked (every chunk's results were computed with it)."""
    from .analysis.atlas import AUTO_BATCH_SIZE

    if run.batch_size == AUTO_BATCH_SIZE:
        return f"batch size auto: {AUTO_BATCH_SIZE} (no out-of-memory)"
    again = f" ({run.redone} chunk{'s' * (run.redone != 1)} computed again)" if run.redone else ""
    return f"batch size auto: {AUTO_BATCH_SIZE} → {run.batch_size} after out-of-memory{again}"


def _embed_cmd(args: argparse.Namespace) -> int:
    return _inference_cmd(args, "embed")


def _predict_cmd(args: argparse.Namespace) -> int:
    return _inference_cmd(args, "predict")


def _reading_options(p: argparse.ArgumentParser) -> None:
    """Where an .h5ad's expression is read (every command that tokenizes an AnnData)."""
    p.add_argument(
        "--use-raw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read adata.raw (--use-raw) or adata.X (--no-use-raw); default: the model's convention",
    )
    p.add_argument("--layer", help="read this layer instead of X")
    p.add_argument("--gene-column", help="var column with the gene ids (default var_names)")


def _input_options(p: argparse.ArgumentParser) -> None:
    """Options for reading an .h5ad (tokenize, embed, predict)."""
    p.add_argument(
        "--cells",
        help="query selecting cells by obs columns, e.g. \"tissue == 'blood'\" (an .h5ad input only; default all)",
    )
    _reading_options(p)
    p.add_argument(
        "--tokenize-option",
        action="append",
        metavar="KEY=VALUE",
        help="tokenizer option, repeatable, e.g. max_len=1200 or species=mouse (see cellkit.data.scheme_options)",
    )


def _batch_size_arg(text: str) -> int | str:
    """``--batch-size`` of ``embed`` / ``predict`` (and ``--micro-batch``): a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"takes a positive integer or 'auto', got {text!r}")
    return size


def _inference_parser(p: argparse.ArgumentParser, *, task: str) -> None:
    p.add_argument("input", help=".h5ad file (read chunk by chunk, backed) or token shard directory")
    p.add_argument(
        "--model",
        required=True,
        help="model directory (cellkit, scGPT, Geneformer) or 'demo'"
        + ("; a fine-tuned model with a classifier (cellkit finetune --out OUT: OUT/model)" if task == "predict" else ""),
    )
    p.add_argument(
        "--output",
        required=True,
        help="OUT.h5ad: a copy of the input .h5ad with the results added (written at the end, atomically; may "
        "be the input itself); or a directory: obs_names.npy + one memory-mappable .npy per result and "
        "manifest.json (for atlases too big to rewrite)",
    )
    default_key = "X_cellkit" if task == "embed" else "cellkit_prediction"
    p.add_argument(
        "--key-added",
        help=f"name of the result (default {default_key}): "
        + ("obsm key / .npy name" if task == "embed" else "obs column; also KEY_confidence, KEY_probabilities"),
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size_arg,
        default=64,
        help="cells per forward pass (default 64), or 'auto': 64, halved after each out-of-memory error (chunks "
        "done at a larger size are computed again, so the results are exactly those of the size that worked, "
        "which is printed and recorded in run.json)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=20_000,
        help="cells per chunk: the unit dealt to processes, written as it finishes and skipped when a killed "
        "job is run again (default 20000)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 …")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="fp32 (default, exact); bf16 on CUDA and on CPUs with bf16 units (AMX / AVX512-BF16; other CPUs "
        "stay in fp32 with a warning, as bf16 would run slower there); fp16 on CUDA only",
    )
    _input_options(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (or a result of another run in it) instead of refusing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_EMBED_EXAMPLES = """\
examples:
  cellkit embed pbmc.h5ad --model demo --output pbmc_embedded.h5ad --use-raw
  cellkit embed atlas_tokens/ --model scgpt_human/ --output atlas_emb/ --batch-size 128
  torchrun --nproc_per_node 4 -m cellkit embed atlas_tokens/ --model scgpt_human/ --output atlas_emb/

A directory output holds obs_names.npy and KEY.npy (np.load(..., mmap_mode="r")). A job that was
killed, run again with the same arguments, skips the chunks it finished; the result is the same,
bit for bit, for any number of processes.
"""

_PREDICT_EXAMPLES = """\
examples:
  cellkit finetune --model demo --data pbmc --label-key bulk_labels --out run/
  cellkit predict query.h5ad --model run/model --output query_predicted.h5ad
  torchrun --nproc_per_node 4 -m cellkit predict atlas_tokens/ --model run/model --output atlas_pred/
"""

_TOKENIZE_EXAMPLES = """\
examples:
  cellkit tokenize atlas.h5ad --model scgpt_human/ --output atlas_tokens/
  cellkit tokenize part1.h5ad part2.h5ad --model demo --output tokens/ --use-raw --obs-column cell_type
  cellkit tokenize atlas.h5ad --model gf/ --output gf_tokens/ --tokenize-option model_input_size=2048

The shard directory is written as a whole (atomically) and read lazily by embed / predict /
finetune / pretrain.
"""


#: set once a torchrun rank has written its results and left its process group (see __main__)
DISTRIBUTED_RUN_ENDED = False


def _finish_distributed(info: Any) -> None:
    global DISTRIBUTED_RUN_ENDED
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        DISTRIBUTED_RUN_ENDED = True


def _training_parser(p: argparse.ArgumentParser, *, needs_model: bool) -> None:
    if needs_model:
        p.add_argument(
            "--model", required=True, help="model directory (cellkit, scGPT, Geneformer) or 'demo'"
        )
    p.add_argument(
        "--data",
        required=True,
        help=".h5ad file, token shard directory (cellkit.tokenize(..., output=DIR); labels as its obs_columns), "
        "or 'pbmc' for the shipped demo data",
    )
    p.add_argument(
        "--out",
        help="run directory: the trained model goes to OUT/model (replaced as a whole), metrics.json and the "
        "history tables beside it; other entries (e.g. a --checkpoint-dir inside it) are kept",
    )
    p.add_argument(
        "--cells",
        help="query selecting the cells by obs columns, e.g. \"tissue == 'blood' and n_genes > 500\" "
        "(comparisons, in [...], and/or/not; see cellkit.data.select_cells)",
    )
    p.add_argument(
        "--objectives",
        type=_objectives,
        help="comma-separated objectives with optional weights, e.g. 'cls,gep=0.5'",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32, help="cells per step over all processes")
    p.add_argument(
        "--micro-batch",
        type=_batch_size_arg,
        default=None,
        help="run each batch in pieces of this many cells (the same update up to float rounding, the memory of "
        "a piece), or 'auto': whole batches, halved after an out-of-memory error (the step starts over; the size "
        "that worked is logged and in each step record)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="write resumable checkpoints here")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir"
    )
    _reading_options(p)
    p.add_argument("--backed", action="store_true", help="open the .h5ad backed (large files)")
    p.add_argument(
        "--tokenize-option", action="append", metavar="KEY=VALUE", help="tokenizer option (repeatable)"
    )
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="trainer option, e.g. schedule=cosine"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cellkit`` command line."""
    parser = argparse.ArgumentParser(
        prog="cellkit",
        description="Single-cell foundation-model kit. `cellkit COMMAND --help` shows a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="the shipped demo model on real PBMCs: tokenize, embed, map, fine-tune, predict, save"
    )
    demo.add_argument(
        "--out",
        default=DEMO_DIR,
        help=f"output directory, replaced as a whole when the job ends; an existing one must hold only "
        f"earlier demo results (default: ./{DEMO_DIR})",
    )
    demo.add_argument(
        "--epochs", type=int, default=10, help="fine-tuning epochs (0: skip; the full recipe: 40)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    studio = sub.add_parser(
        "studio", help="open the studio notebook in JupyterLab (demo model + demo PBMCs by default)"
    )
    studio.add_argument(
        "notebook",
        nargs="?",
        help=f"notebook to open (default: your copy of the studio notebook, DIR/{STUDIO_NOTEBOOK_NAME})",
    )
    studio.add_argument(
        "--dir",
        default=STUDIO_DIR,
        help=f"directory for your copy of the studio notebook, made on first use and never overwritten; "
        f"JupyterLab serves this directory (default: ./{STUDIO_DIR})",
    )
    studio.add_argument("--port", type=int, default=None, help="JupyterLab port (default: its own, 8888)")
    studio.add_argument(
        "--no-browser", action="store_true", help="print the URL instead of opening a browser"
    )
    studio.add_argument("--print-command", action="store_true", help="only print the JupyterLab command")
    studio.set_defaults(func=_studio)
    info = sub.add_parser(
        "info",
        help="describe a model directory (cellkit, scGPT or Geneformer) and/or a run record (run.json)",
    )
    info.add_argument(
        "path",
        help="a model directory; a run directory (cellkit finetune --out), checkpoint directory or result store "
        "holding run.json; a run.json; or an output .h5ad with its OUT.h5ad.run.json beside it",
    )
    info.set_defaults(func=_info)
    ft = sub.add_parser("finetune", help="fine-tune a model for cell-type annotation (torchrun-ready)")
    _training_parser(ft, needs_model=True)
    ft.add_argument("--label-key", required=True, help="obs column with the cell types")
    ft.add_argument("--batch-key", help="obs column with batches (for the 'dab' objective)")
    ft.add_argument("--val-size", type=float, default=0.1)
    ft.add_argument("--test-size", type=float, default=0.1)
    ft.add_argument("--class-weight", choices=["balanced"], default=None)
    ft.add_argument("--freeze-layers", type=int, default=0)
    ft.add_argument("--freeze-embeddings", action="store_true")
    ft.set_defaults(func=_finetune)
    pt = sub.add_parser("pretrain", help="pretrain a model with self-supervision (torchrun-ready)")
    _training_parser(pt, needs_model=False)
    pt.add_argument("--model", help="start from this model (default: a fresh one, see --family/--arch)")
    pt.add_argument("--family", default="scgpt", choices=["scgpt", "geneformer", "perturbgene"])
    pt.add_argument("--arch", action="append", metavar="KEY=VALUE", help="architecture, e.g. d_model=128")
    pt.add_argument("--val-size", type=float, default=0.05)
    pt.add_argument("--mask-ratio", type=float, default=None)
    pt.set_defaults(func=_pretrain)
    tok = sub.add_parser(
        "tokenize",
        help="tokenize .h5ad files into a token shard directory for a model (bounded memory)",
        epilog=_TOKENIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tok.add_argument("input", nargs="+", help=".h5ad file(s), read backed (partitions of one dataset)")
    tok.add_argument("--model", required=True, help="model directory (cellkit, scGPT, Geneformer) or 'demo'")
    tok.add_argument("--output", required=True, help="shard directory to write (new, or --overwrite)")
    tok.add_argument(
        "--scheme",
        choices=["scgpt", "geneformer", "teddy", "perturbgene"],
        help="tokenization scheme (default: the model's family)",
    )
    tok.add_argument(
        "--obs-column", action="append", help="obs column carried into the shards (labels, batches), repeatable"
    )
    tok.add_argument("--shard-size", type=int, default=100_000, help="cells per shard (default 100000)")
    tok.add_argument("--shard-format", choices=["npy", "parquet"], default="npy")
    _input_options(tok)
    tok.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    tok.add_argument("--quiet", action="store_true", help="no progress bars")
    tok.set_defaults(func=_tokenize_cmd)
    emb = sub.add_parser(
        "embed",
        help="cell embeddings of an .h5ad or shard directory into an .h5ad or array store (torchrun-ready)",
        epilog=_EMBED_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _inference_parser(emb, task="embed")
    emb.add_argument(
        "--pooling", choices=["cls", "mean", "weighted"], help="how tokens become a cell (default: the model's)"
    )
    emb.add_argument("--hidden-layer", type=int, help="layer to pool: -1 last (default), -2 second-to-last, …")
    emb.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise each embedding (default: yes for scGPT models, no otherwise)",
    )
    emb.add_argument(
        "--on-empty",
        choices=["raise", "nan"],
        default="raise",
        help="cells with no vocabulary gene: fail (default) or leave their rows NaN",
    )
    emb.set_defaults(func=_embed_cmd)
    prd = sub.add_parser(
        "predict",
        help="cell-type labels + probabilities from a fine-tuned model (torchrun-ready)",
        epilog=_PREDICT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _inference_parser(prd, task="predict")
    prd.set_defaults(func=_predict_cmd)
    args = parser.parse_args(argv)
    from ._utils._run import CLI_COMMAND

    token = CLI_COMMAND.set(list(sys.argv[1:] if argv is None else argv))  # recorded in run.json
    try:
        return args.func(args)
    except CellkitError as exc:
        print(f"cellkit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        CLI_COMMAND.reset(token)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
