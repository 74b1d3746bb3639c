"""Durable writes: atomic files, whole-directory replacement, and output checks before work starts.

* :func:`atomic_path` / :func:`atomic_write_text` — one file: a temporary file in the same
  directory, fsync, then ``os.replace``.
* :func:`atomic_directory` — a whole directory (a saved model, a shard directory, a fine-tune
  ``--out``): everything is written into a hidden sibling, which is then swapped in, so after a
  crash at any moment the directory holds either the old content or the new one.
* :func:`recover_directory` — what a reader calls first: finds the old content of a directory
  whose swap was interrupted between its two renames.
* :func:`ensure_writable_dir` — fail *before* a long run when its output cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .._errors import ConfigError
from ._log import get_logger

__all__ = [
    "AtomicDirectory",
    "atomic_directory",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "ensure_writable_dir",
    "fsync_dir",
    "fsync_tree",
    "recover_directory",
]

log = get_logger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------ fsync
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every regular file under ``path``, then every directory (deepest first)."""
    dirs = []
    for root, _subdirs, files in os.walk(path):
        dirs.append(root)
        for name in files:
            f = os.path.join(root, name)
            if os.path.islink(f):
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


# ------------------------------------------------------------------------------ directories
def _siblings(path: Path, kind: str) -> list[Path]:
    """Hidden siblings ``.{name}.{kind}-*`` of ``path`` that are real directories (not symlinks)."""
    parent = path.parent
    if not parent.is_dir():
        return []
    prefix = f".{path.name}.{kind}-"
    return [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]


class AtomicDirectory:
    """Write a directory as a whole: into a hidden sibling first, then swap it in.

    ``AtomicDirectory(path).tmp`` is a fresh, empty sibling ``.{name}.tmp-<uuid>`` (same parent,
    so the same file system); fill it, then :meth:`commit` (or :meth:`abort`).
    :func:`atomic_directory` wraps this as a context manager.

    The swap (:meth:`commit`) is

    1. fsync every file and directory of ``tmp``;
    2. if ``path`` exists: ``rename(path, .{name}.old-<uuid>)``;
    3. ``rename(tmp, path)``; fsync the parent;
    4. remove ``.old-<uuid>`` (and older leftovers).

    Crash analysis (a kill or power loss at any moment; a reader calls :func:`recover_directory`):

    * **while writing ``tmp``, or before step 2** — ``path`` holds the old content untouched; the
      half-written ``.tmp-*`` sibling is ignored by readers and removed by the next write of
      ``path``.
    * **between steps 2 and 3** — ``path`` is absent; ``.old-<uuid>`` holds the complete old
      content (it was ``path`` a moment ago; renaming changes no byte), and ``.tmp-*`` the complete
      new content. :func:`recover_directory` returns ``.old-<uuid>``, so a load finds the old
      model. The next write of ``path`` renames its own ``tmp`` to ``path`` (nothing to move
      aside) and only then removes the ``.old`` sibling. At most one ``.old`` sibling exists while
      ``path`` is absent: leftovers are removed only while ``path`` exists (step 0 below), before
      step 2 can make ``path`` absent again.
    * **after step 3** (during the fsync or the removal of step 4) — ``path`` holds the new
      content; a left-over (possibly half-deleted) ``.old-*`` sibling is ignored by readers because
      ``path`` exists, and removed by the next write.

    Step 0, when the writer starts: ``.tmp-*`` siblings are removed; ``.old-*`` siblings are removed
    only if ``path`` exists (otherwise one of them is the only complete copy).

    Renames are atomic on POSIX file systems; fsync before the renames makes the new content
    durable before it becomes visible. Two processes writing the same ``path`` at the same time
    are not coordinated (the last swap wins; each may remove the other's ``tmp``).

    Parameters
    ----------
    path
        The directory to (re)place. Its parent is created if needed.
    may_replace
        Called with ``path`` when it exists; return ``False`` to refuse replacing it (e.g. a
        directory that is not a saved model). Default: replace only an empty directory.
    what
        Words for error messages ("model directory", "shard directory", ...).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        may_replace: Callable[[Path], bool] | None = None,
        what: str = "directory",
    ) -> None:
        self.path = Path(path)
        self.what = what
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise ConfigError(
                f"{self.path} exists and is not a directory; choose a directory path for the {what}."
            )
        if self.path.is_dir() and any(self.path.iterdir()):
            allowed = may_replace(self.path) if may_replace is not None else False
            if not allowed:
                raise ConfigError(
                    f"{self.path} is a non-empty directory that is not a {what}; saving would replace it as "
                    "a whole. Choose a new or empty directory."
                )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"Cannot create the parent directory of {self.path} ({exc.strerror or exc}); choose a "
                "location you can write to."
            ) from None
        self.cleanup_leftovers()
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise ConfigError(
                f"Cannot write the {what} {self.path}: {self.path.parent} is not writable "
                f"({exc.strerror or exc})."
            ) from None
        self.done = False

    def cleanup_leftovers(self) -> None:
        """Remove ``.tmp-*`` siblings, and ``.old-*`` siblings when ``path`` exists (step 0)."""
        for p in _siblings(self.path, "tmp"):
            shutil.rmtree(p, ignore_errors=True)
        if self.path.is_dir():
            for p in _siblings(self.path, "old"):
                shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> Path:
        """Swap the written ``tmp`` in as ``path`` (see the class docstring); returns ``path``."""
        if self.done:
            return self.path
        fsync_tree(self.tmp)
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        fsync_dir(self.path.parent)
        self.done = True
        for p in [*([old] if old is not None else []), *_siblings(self.path, "old")]:
            shutil.rmtree(p, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Remove ``tmp``; ``path`` stays as it was."""
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    *,
    may_replace: Callable[[Path], bool] | None = None,
    what: str = "directory",
) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` as a whole.

    See :class:`AtomicDirectory` for the protocol and its crash analysis. On an exception the
    temporary directory is removed and ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_directory(out, may_replace=is_model_dir) as tmp:  # doctest: +SKIP
    ...     write_files(tmp)
    """
    d = AtomicDirectory(path, may_replace=may_replace, what=what)
    try:
        yield d.tmp
        d.commit()
    except BaseException:
        d.abort()
        raise


def recover_directory(path: str | os.PathLike[str]) -> Path:
    """``path``, or — when ``path`` is absent because a swap was interrupted — its complete old copy.

    See :class:`AtomicDirectory`: between its two renames ``path`` does not exist and the hidden
    sibling ``.{name}.old-<uuid>`` holds the previous content. Readers call this first so that a
    load after such a crash finds the old model. Nothing is renamed or deleted here (the next save
    to ``path`` tidies up). Returns ``path`` unchanged when it exists or when there is no copy.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return path
    olds = _siblings(path, "old")
    if not olds:
        return path
    found = max(olds, key=lambda p: p.stat().st_mtime_ns)
    log.warning(
        "%s is missing: a save to it was interrupted; reading the previous copy %s. Save again to %s to "
        "tidy up.",
        path,
        found,
        path,
    )
    return found


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe(directory: Path) -> None:
    """Create and remove a temporary file in ``directory`` (raises OSError when that fails)."""
    fd, name = tempfile.mkstemp(prefix=".cellkit-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def ensure_writable_dir(path: str | os.PathLike[str], *, what: str, replaced_whole: bool = False) -> Path:
    """Check, before any work, that directory ``path`` can be created and written.

    Nothing is created: a probe file is made in ``path`` (or its nearest existing ancestor) and
    removed at once, so a check leaves no litter.

    Parameters
    ----------
    path
        The output directory.
    what
        How the caller names it in the message (``"checkpoint_dir"``, ``"--out"``, ``"output"``).
    replaced_whole
        The directory will be written as a whole (:func:`atomic_directory`): its *parent* must be
        writable too, since the new copy is built next to it.

    Raises
    ------
    ConfigError
        Naming the path: it is an existing file, lies under a file, or is not writable.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p} is an existing file, not a directory; choose a directory path.")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise ConfigError(
            f"{what} {p} cannot be created: {base} is a file, not a directory; choose another path."
        )
    targets = [base]
    if replaced_whole and base == p:
        targets.append(p.parent)
    for d in targets:
        try:
            _probe(d)
        except OSError as exc:
            where = "" if d == p else f" ({d} is not writable)"
            raise ConfigError(
                f"{what} {p} is not writable{where}: {exc.strerror or exc}. Choose a directory you can write to."
            ) from None
    return p
