"""The Model panel: load a checkpoint (or the demo model) and see what was loaded.

The panel calls :func:`cellkit.load_model` / :func:`cellkit.datasets.demo_model` and shows the
model's format, family, architecture, size and vocabulary, what the loader mapped, ignored and
created (``model.load_report``), and how many genes of the current data the vocabulary knows.
Paths loaded before are kept in ``$CELLKIT_HOME/recent.json`` (default ``~/.cellkit``).
"""

from __future__ import annotations

import html
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ._base import Panel, guarded, labelled
from ._state import StudioState

__all__ = ["ModelPanel", "add_recent", "cellkit_home", "read_recent"]

log = logging.getLogger("cellkit.widgets")

#: how many recent paths are remembered (per kind)
MAX_RECENT = 10
FORMATS = ("auto", "cellkit", "scgpt", "geneformer")
_ARCH_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "activation", "norm_scheme", "value_encoder")


# ---------------------------------------------------------------------------------- recent paths
def cellkit_home() -> Path:
    """cellkit's per-user directory: ``$CELLKIT_HOME``, else ``~/.cellkit`` (not created here)."""
    env = os.environ.get("CELLKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cellkit"


def _recent_file() -> Path:
    return cellkit_home() / "recent.json"


def _read_all() -> dict[str, list[str]]:
    """The whole recent file (``{kind: [paths]}``); ``{}`` when missing or unreadable."""
    try:
        path = _recent_file()
        if not path.is_file() or path.stat().st_size > 1_000_000:  # a few paths; anything else is not ours
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: [str(p) for p in v if isinstance(p, str)] for k, v in data.items() if isinstance(v, list)}


def read_recent(kind: str = "models") -> list[str]:
    """Paths recently loaded, most recent first (``[]`` if the file is missing or corrupt)."""
    return _read_all().get(kind, [])[:MAX_RECENT]


def add_recent(path: str, kind: str = "models") -> list[str]:
    """Put ``path`` first in the recent list of ``kind`` and save it atomically (temp file + replace).

    Returns
    -------
    The new list (most recent first, at most :data:`MAX_RECENT`).
    """
    data = _read_all()
    paths = [path, *[p for p in data.get(kind, []) if p != path]][:MAX_RECENT]
    data[kind] = paths
    target = _recent_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".recent-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return paths


# ---------------------------------------------------------------------------------- helpers
def _coverage_genes(model: Any, adata: Any) -> tuple[Any, str]:
    """The gene names the tokenizer will read for ``model`` (its ``use_raw`` convention) and where from."""
    use_raw = bool(model.config.input.use_raw)
    if use_raw and getattr(adata, "raw", None) is not None:
        return adata.raw.var_names, ".raw.var_names"
    return adata.var_names, "var_names"


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _rows(pairs: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th style='text-align:left;padding:1px 10px 1px 0'>{_esc(k)}</th><td>{_esc(v)}</td></tr>"
        for k, v in pairs
    )
    return f"<table class='cellkit-table'>{body}</table>"


class ModelPanel(Panel):
    """Load a model and inspect it.

    Parameters
    ----------
    state
        The shared studio state (a fresh one when the panel is used alone).

    Attributes
    ----------
    path, format, recent
        Path box, format dropdown and recent-paths dropdown.
    load_button, demo_button
        "Load" and "Demo model".
    info_html, coverage_html
        What the model is and how much of the current data its vocabulary covers.

    Examples
    --------
    >>> panel = ModelPanel()  # doctest: +SKIP
    >>> panel.load_demo()  # doctest: +SKIP
    >>> panel.info()["n_parameters"]  # doctest: +SKIP
    """

    title = "Model"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-model-panel")
        self.path = widgets.Text(
            placeholder="model directory (cellkit, scGPT or Geneformer)", layout=widgets.Layout(width="420px")
        )
        self.format = widgets.Dropdown(
            options=list(FORMATS), value="auto", layout=widgets.Layout(width="120px")
        )
        self.load_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Load",
            button_style="primary",
            icon="folder-open",
        )
        self.demo_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Demo model",
            tooltip="cellkit.datasets.demo_model()",
        )
        self.recent = widgets.Dropdown(options=[("—", "")], value="", layout=widgets.Layout(width="420px"))
        self.info_html = widgets.HTML()
        self.info_html.add_class("cellkit-model-info")
        self.coverage_html = widgets.HTML()
        self.coverage_html.add_class("cellkit-model-coverage")

        self.load_button.on_click(lambda _b: self.load())
        self.demo_button.on_click(lambda _b: self.load_demo())
        self.recent.observe(self._on_recent, names="value")

        self.children = [
            widgets.HBox([labelled("Model directory", self.path), self.format, self.load_button]),
            widgets.HBox([labelled("Recent", self.recent), self.demo_button]),
            self.message,
            self.info_html,
            self.coverage_html,
        ]
        self.state.observe(self._on_state, names=["model", "adata", "model_source"])
        self._refresh_recent()
        self.refresh()

    # ------------------------------------------------------------------ actions
    @guarded
    def load(self, path: str | os.PathLike[str] | None = None, *, format: str | None = None) -> Any:
        """Load the model directory ``path`` (default: the path box) and make it the studio's model.

        Parameters
        ----------
        path
            A cellkit, scGPT or Geneformer model directory.
        format
            ``"auto"``, ``"cellkit"``, ``"scgpt"`` or ``"geneformer"`` (default: the format dropdown,
            ``"auto"`` unless changed).

        Returns
        -------
        The loaded :class:`cellkit.CellModel` (``None`` on error; the previous model is kept).
        """
        import cellkit

        text = str(self.path.value if path is None else path).strip()
        if not text:
            raise cellkit.ConfigError(
                "Enter the path of a model directory first (or click “Demo model” for the shipped demo)."
            )
        fmt = self.format.value if format is None else format
        if fmt not in FORMATS:
            raise cellkit.ConfigError(f"Unknown model format {fmt!r}; choose one of {list(FORMATS)}.")
        where = Path(text).expanduser()
        if not where.exists():
            raise cellkit.CheckpointError(f"{where} does not exist; pass the directory of a saved model.")
        if not where.is_dir():
            raise cellkit.CheckpointError(
                f"{where} is a file; pass the model directory that contains it ({where.parent})."
            )
        where = where.resolve()
        self.path.value = str(where)
        try:
            model = cellkit.load_model(where, format=fmt)
        except cellkit.CellkitError:
            raise
        except Exception as exc:  # broken files: torch / safetensors / json / OS errors
            raise cellkit.CheckpointError(
                f"Could not load a model from {where} ({type(exc).__name__}: {exc}). The directory may be "
                "incomplete or a file in it corrupt; the previous model is still loaded."
            ) from exc
        self.state.set_model(model, source=str(where))
        try:
            add_recent(str(where))
        except OSError as exc:  # an unwritable home must not spoil a good load
            log.warning("could not update %s: %s", _recent_file(), exc)
        self._refresh_recent()
        self.show_message(self._loaded_text(model, str(where)), "ok")
        return model

    @guarded
    def load_demo(self) -> Any:
        """Load the shipped demo model (:func:`cellkit.datasets.demo_model`; source ``"demo"``)."""
        import cellkit.datasets

        model = cellkit.datasets.demo_model()
        self.state.set_model(model, source="demo")
        self.show_message(
            self._loaded_text(model, "the demo model") + " — a demo, not a foundation model.", "ok"
        )
        return model

    def refresh(self) -> None:
        """Redraw the model description and the vocabulary coverage from the state."""
        try:
            self.info_html.value = self._info_html()
            self.coverage_html.value = self._coverage_html()
        except Exception as exc:  # never leave a half-drawn panel behind an exception
            self.show_error(exc)

    def info(self) -> dict[str, Any]:
        """What the panel shows, as plain data (``{}`` without a model).

        The dict's keys:
        ``{"source", "format", "family", "architecture", "n_parameters", "vocab_size", "n_specials",
        "heads", "pooling", "mapped", "ignored", "created", "notes", "coverage"}``; ``mapped`` is the
        number of tensors copied, ``coverage`` is ``None`` without data, else ``{"n_genes", "n_matched",
        "fraction", "unmatched_examples", "genes_from"}``.
        """
        model = self.state.model
        if model is None:
            return {}
        cfg = model.config
        enc = cfg.encoder
        report = getattr(model, "load_report", None)
        arch = {k: getattr(enc, k) for k in _ARCH_FIELDS if hasattr(enc, k)}
        if report is not None:
            arch |= {k: v for k, v in dict(report.architecture).items() if k not in arch}
        return {
            "source": self.state.model_source or (report.source if report is not None else "memory"),
            "format": report.format if report is not None else "memory",
            "family": cfg.family,
            "architecture": arch,
            "n_parameters": int(model.num_parameters()),
            "vocab_size": len(model.vocab),
            "n_specials": len(model.vocab.specials),
            "heads": sorted(model.heads),
            "pooling": cfg.pooling,
            "mapped": len(report.mapped) if report is not None else 0,
            "ignored": dict(report.ignored) if report is not None else {},
            "created": dict(report.created) if report is not None else {},
            "notes": list(report.notes) if report is not None else [],
            "coverage": self.coverage(),
        }

    def coverage(self) -> dict[str, Any] | None:
        """Vocabulary coverage of the current data's genes (``None`` without a model or data)."""
        model, adata = self.state.model, self.state.adata
        if model is None or adata is None:
            return None
        genes, where = _coverage_genes(model, adata)
        cov = model.vocab.coverage(genes)
        return {
            "n_genes": cov.n_genes,
            "n_matched": cov.n_matched,
            "fraction": cov.fraction,
            "unmatched_examples": list(cov.unmatched_examples),
            "genes_from": where,
        }

    # ------------------------------------------------------------------ rendering
    @staticmethod
    def _loaded_text(model: Any, where: str) -> str:
        enc = model.config.encoder
        return (
            f"Loaded {model.config.family} model from {where}: {enc.n_layers} layers × d_model {enc.d_model}, "
            f"{enc.n_heads} heads, {model.num_parameters():,} parameters, {len(model.vocab):,} tokens."
        )

    def _info_html(self) -> str:
        info = self.info()
        if not info:
            return "<div class='cellkit-model-empty'><i>No model loaded: enter a directory or click “Demo model”.</i></div>"
        arch = info["architecture"]
        pairs: list[tuple[str, Any]] = [
            ("source", info["source"]),
            ("format", info["format"]),
            ("family", info["family"]),
            (
                "architecture",
                ", ".join(f"{k} {v}" for k, v in arch.items()),
            ),
            ("parameters", f"{info['n_parameters']:,}"),
            ("vocabulary", f"{info['vocab_size']:,} tokens ({info['n_specials']} special)"),
            ("heads", ", ".join(info["heads"]) or "none (encoder only)"),
            ("pooling", info["pooling"]),
            ("tensors mapped", f"{info['mapped']:,}"),
        ]
        parts = [_rows(pairs)]
        model = self.state.model
        report = getattr(model, "load_report", None)
        if report is not None and report.mapped:
            keys = "".join(f"<li>{_esc(k)} → {_esc(v)}</li>" for k, v in list(report.mapped.items())[:200])
            more = f"<li>… {len(report.mapped) - 200:,} more</li>" if len(report.mapped) > 200 else ""
            parts.append(
                f"<details><summary>{len(report.mapped):,} tensors mapped</summary>"
                f"<ul style='font-size:11px'>{keys}{more}</ul></details>"
            )
        for title, items in (("Ignored", info["ignored"]), ("Created fresh", info["created"])):
            if items:
                lis = "".join(f"<li><code>{_esc(k)}</code>: {_esc(v)}</li>" for k, v in items.items())
                parts.append(f"<div><b>{title}</b><ul>{lis}</ul></div>")
        if info["notes"]:
            lis = "".join(f"<li>{_esc(n)}</li>" for n in info["notes"])
            parts.append(f"<div><b>Notes</b><ul>{lis}</ul></div>")
        what = (model.config.metadata or {}).get("what")
        if what:
            parts.append(f"<div style='font-size:12px;color:#555'>{_esc(what)}</div>")
        return "<div class='cellkit-model-info'>" + "".join(parts) + "</div>"

    def _coverage_html(self) -> str:
        if self.state.model is None:
            return ""
        cov = self.coverage()
        if cov is None:
            return (
                "<div><i>No data yet: the vocabulary coverage shows once data is picked (Data tab).</i></div>"
            )
        name = self.state.adata_name or "the data"
        color = "#1b5e20" if cov["fraction"] >= 0.5 else ("#6d4c00" if cov["n_matched"] else "#8b0000")
        text = (
            f"Vocabulary coverage of {name} ({cov['genes_from']}): {cov['n_matched']:,} of {cov['n_genes']:,} "
            f"genes ({cov['fraction']:.1%})"
        )
        if cov["unmatched_examples"]:
            text += "; not found, e.g. " + ", ".join(cov["unmatched_examples"][:5])
        if not cov["n_matched"]:
            text += ". No gene matches: these data cannot be tokenized for this model as they are."
        return f"<div class='cellkit-coverage' style='color:{color}'><b>{_esc(text)}</b></div>"

    # ------------------------------------------------------------------ observers
    def _refresh_recent(self) -> None:
        paths = read_recent()
        self.recent.options = [("—", ""), *[(p, p) for p in paths]]
        self.recent.value = ""

    def _on_recent(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.path.value = change["new"]

    def _on_state(self, _change: Any) -> None:
        self.refresh()
