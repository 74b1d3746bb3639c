"""Nothing is lost when a process dies: fault injection with SIGKILL inside saves and checkpoint rotation.

A forked child process runs a save (or a training run) with every mutating file-system call
(``os.rename/replace/mkdir/unlink/rmdir``, ``open``/``os.open`` for writing, safetensors writes)
counted; at call ``k`` the child SIGKILLs itself. ``k`` runs over every call of the operation, so
the child dies at every point between two file-system steps (killing before a read changes
nothing on disk, so reads are not counted). After each kill the parent checks what a new process
would see: ``load_model(path)`` gives the old or the new model, ``resume`` continues from the
newest intact checkpoint and ends bit-identical (CPU, one thread) to an uninterrupted run. A few
kills at random moments complement the deterministic points.
"""

from __future__ import annotations

import builtins
import io
import os
import random
import signal
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch

import cellkit
from cellkit.train import checkpoint as ckpt_mod
from cellkit.train.checkpoint import CheckpointManager
from cellkit.train.trainer import Trainer

from .train._tiny import TinyCells, collator, tiny_model

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL"),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (see ``one_thread`` in conftest.py)."""


# ----------------------------------------------------------------------------- kill points
class _KillPoints:
    """Count mutating file-system calls while ``on``; SIGKILL this process at call ``k``."""

    def __init__(self, k: int) -> None:
        self.k, self.n, self.on = k, 0, False

    def tick(self) -> None:
        if self.on:
            self.n += 1
            if self.n == self.k:
                os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:  # only ever called in a forked child
        def counted(fn):
            def inner(*a, **kw):
                self.tick()
                return fn(*a, **kw)

            return inner

        for name in ("rename", "replace", "mkdir", "unlink", "rmdir", "ftruncate"):
            setattr(os, name, counted(getattr(os, name)))
        real_open, real_os_open = builtins.open, os.open

        def open_(file, mode="r", *a, **kw):
            if any(c in mode for c in "wax+"):
                self.tick()
            return real_open(file, mode, *a, **kw)

        def os_open(path, flags, *a, **kw):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                self.tick()
            return real_os_open(path, flags, *a, **kw)

        builtins.open = io.open = open_
        os.open = os_open
        for mod in (safetensors.torch, ckpt_mod):
            for name in ("save_file", "save_model"):
                setattr(mod, name, counted(getattr(mod, name)))


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; return its exit status (``-9``: it was SIGKILLed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ----------------------------------------------------------------------------- model saves
@pytest.mark.parametrize("fmt", ["cellkit", "scgpt"])
def test_save_killed_at_every_point_leaves_old_or_new_model(tmp_path, fmt):
    # different heads: a mix of old and new files does not load
    old_model, new_model = tiny_model(seed=1, heads={}), tiny_model(seed=2)
    old_w, new_w = _weights(old_model), _weights(new_model)
    assert not _same(old_w, new_w)
    seen = {"old": 0, "new": 0, "recovered": 0}
    k = 0
    while True:
        k += 1
        path = tmp_path / f"k{k}" / "model"
        old_model.save(path, format=fmt)
        kp = _KillPoints(k)

        def child(kp=kp, path=path):
            kp.install()
            kp.on = True
            new_model.save(path, format=fmt)

        status = _in_child(child)
        got = _weights(cellkit.load_model(path))  # what a new process sees after the kill
        assert _same(got, old_w) or _same(got, new_w), f"kill point {k}: neither the old nor the new model"
        seen["old" if _same(got, old_w) else "new"] += 1
        if not path.exists():
            seen["recovered"] += 1  # killed between the swap's two renames: the old copy was found
        # the next save tidies whatever the kill left and replaces the model as a whole
        new_model.save(path, format=fmt)
        assert _same(_weights(cellkit.load_model(path)), new_w)
        assert _leftovers(path) == []
        if status == 0:  # k went past the last file-system step: the save completed
            break
        assert status == -signal.SIGKILL
        assert k < 200
    assert k > 5
    assert seen["old"] and seen["new"] and seen["recovered"], seen


def test_save_killed_at_random_moments(tmp_path):
    """A child saves two models alternately over one path without pause; kill it at random times."""
    a, b = tiny_model(seed=1, heads={}), tiny_model(seed=2)
    wa, wb = _weights(a), _weights(b)
    path = tmp_path / "model"
    a.save(path)
    rng = random.Random(0)
    for _ in range(6):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                while True:
                    b.save(path)
                    a.save(path, format="scgpt")
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = _weights(cellkit.load_model(path))
        assert _same(got, wa) or _same(got, wb)


def test_save_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(cellkit.CellkitError, match="not a model directory"):
        tiny_model(heads={}).save(precious)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert _leftovers(precious) == []
    with pytest.raises(cellkit.CellkitError, match="is not a directory"):
        tiny_model(heads={}).save(precious / "thesis.tex")


# ----------------------------------------------------------------------------- checkpoints
TRAIN, VAL = TinyCells(16, seed=0), TinyCells(6, seed=1)
OPTS = {"batch_size": 8, "lr": 3e-3, "progress": False, "seed": 3, "epochs": 2, "checkpoint_every_steps": 1}


def _fit(root, *, resume=False, model=None):
    model = model if model is not None else tiny_model()
    result = Trainer(model, ["cls"], checkpoint_dir=root, **OPTS).fit(
        TRAIN, VAL, collate_fn=collator(model), resume=resume
    )
    return model, result


@pytest.mark.slow
def test_checkpoint_rotation_killed_at_every_point_resumes_bit_identical(tmp_path):
    ref_model, ref = _fit(tmp_path / "straight")
    ref_w = _weights(ref_model)
    # the saves of this run: step 1, step 2, step 2 again (epoch end, same name), step 3 (prunes
    # step 1), step 4, step 4 (epoch end), step 4 (end of run); kill inside the 3rd and the 4th
    outcomes = set()
    for save_no in (3, 4):
        k = 0
        while True:
            k += 1
            root = tmp_path / f"s{save_no}-k{k}"
            kp = _KillPoints(k)

            def child(kp=kp, root=root, save_no=save_no):
                kp.install()
                real_save, calls = CheckpointManager.save, {"n": 0}

                def save(self, *a, **kw):
                    calls["n"] += 1
                    kp.on = calls["n"] == save_no
                    try:
                        return real_save(self, *a, **kw)
                    finally:
                        kp.on = False

                CheckpointManager.save = save
                _fit(root)

            status = _in_child(child)
            mgr = CheckpointManager(root)
            resumable = mgr.latest
            assert resumable is not None, f"save {save_no}, kill point {k}: nothing to resume"
            outcomes.add(resumable.name.startswith(".old-"))
            model, result = _fit(root, resume=True, model=tiny_model(seed=99))
            assert result.status == "completed"
            assert _same(_weights(model), ref_w), f"save {save_no}, kill point {k}: resumed run differs"
            assert result.history == ref.history
            if status == 0:
                break
            assert status == -signal.SIGKILL
            assert k < 100
        assert k > 5
    assert outcomes == {True, False}  # some kills fell where only the set-aside copy was intact


def test_resume_falls_back_when_latest_is_missing_or_broken(tmp_path, caplog):
    _, ref = _fit(tmp_path / "straight")
    root = tmp_path / "run"
    _fit(root)
    (root / "latest").write_text("../straight\n")  # a pointer out of the root is ignored
    mgr = CheckpointManager(root)
    assert mgr.latest is not None
    assert mgr.latest.parent == root
    (root / "latest").unlink()
    newest = mgr.latest
    assert newest is not None
    assert newest.name == "step-00000004"
    (newest / "weights.safetensors").write_bytes(b"\x00" * 10)  # broken: the previous one is used
    assert mgr.latest.name == "step-00000003"
    with caplog.at_level("WARNING", logger="cellkit"):
        _, result = _fit(root, resume=True, model=tiny_model(seed=99))
    assert "newest intact checkpoint, step-00000003" in caplog.text
    assert result.history == ref.history


def test_checkpoint_pointers_stay_inside_the_root(tmp_path):
    root = tmp_path / "run"
    _fit(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    mgr = CheckpointManager(root)
    good = mgr.latest
    for text in (str(good.resolve()), "../run/" + good.name, "sub/../" + good.name, "x" * 5000):
        (root / "best").write_text(text + "\n")
        assert mgr.best is None, text
    (root / "evil").symlink_to(good.resolve(), target_is_directory=True)
    (root / "best").write_text("evil\n")
    assert mgr.best is None
    assert all(p.parent == root and not p.is_symlink() for p in mgr.candidates())


# ----------------------------------------------------------------------------- scGPT export vocabulary
def _scgpt_model(tokens, specials):
    from cellkit import CellModel, GeneVocab
    from cellkit.presets import scgpt_config

    vocab = GeneVocab(tokens, specials=specials)
    torch.manual_seed(0)
    return CellModel(scgpt_config(vocab, d_model=16, n_heads=2, n_layers=1, d_ff=32), vocab)


@pytest.mark.parametrize(
    ("tokens", "specials", "reason"),
    [
        (["G0", "G1", "<pad>", "<cls>"], {"pad": "<pad>", "cls": "<cls>"}, r"lacks the special token\(s\) \['<eoc>'\]"),
        (["G0", "G1", "[PAD]", "<pad>", "<cls>", "<eoc>"], {"pad": "[PAD]", "cls": "<cls>"}, "padding token is '\\[PAD\\]'"),
        (
            ["G0", "G1", "<pad>", "<cls>", "<eoc>", "<mask>"],
            {"pad": "<pad>", "cls": "<cls>", "mask": "<mask>"},
            r"special role\(s\) \['mask'\]",
        ),
    ],
)
def test_scgpt_export_refuses_vocabularies_scgpt_would_change(tmp_path, tokens, specials, reason):
    model = _scgpt_model(tokens, specials)
    with pytest.raises(cellkit.CheckpointError, match=reason):
        model.save(tmp_path / "out", format="scgpt")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left aside
    model.save(tmp_path / "native")  # cellkit's own format takes any vocabulary
    assert _same(_weights(cellkit.load_model(tmp_path / "native")), _weights(model))


def test_scgpt_export_round_trips_through_load_model(tmp_path):
    model = _scgpt_model(["G0", "G1", "G2", "<pad>", "<cls>", "<eoc>"], {"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"})
    model.save(tmp_path / "out", format="scgpt")
    back = cellkit.load_model(tmp_path / "out")
    assert back.vocab.tokens == model.vocab.tokens
    assert _same(_weights(back), _weights(model))


# ----------------------------------------------------------------------------- shard directories
def _tokens(n=12, seed=0):
    from cellkit.data.tokenized import TokenizedCells

    r = np.random.default_rng(seed)
    lengths = r.integers(2, 6, n)
    offsets = np.r_[0, np.cumsum(lengths)]
    return TokenizedCells(
        gene_ids=r.integers(0, 30, offsets[-1]).astype(np.int32),
        offsets=offsets,
        values=r.random(offsets[-1]).astype(np.float32),
        scheme="scgpt",
        specials={"pad": 30},
    )


def test_shards_killed_at_every_point_leave_old_or_new_shards(tmp_path):
    from cellkit.data.tokenized import open_shards

    old, new = _tokens(12, seed=0), _tokens(7, seed=1)
    k = 0
    while True:
        k += 1
        path = tmp_path / f"k{k}" / "shards"
        old.to_shards(path, max_shard_samples=5)
        kp = _KillPoints(k)

        def child(kp=kp, path=path):
            kp.install()
            kp.on = True
            new.to_shards(path, max_shard_samples=5)

        status = _in_child(child)
        got = open_shards(path).to_memory()
        assert len(got) in (12, 7), k
        want = old if len(got) == 12 else new
        np.testing.assert_array_equal(got.gene_ids, want.gene_ids)
        if status == 0:
            break
        assert k < 300
    assert k > 5


def test_manifests_are_confined_and_checked(tmp_path):
    import json

    from cellkit.data.tokenized import open_shards

    def fresh(name):
        path = tmp_path / name
        _tokens(12).to_shards(path, max_shard_samples=5)
        return path, json.loads((path / "manifest.json").read_text())

    def write(path, manifest):
        (path / "manifest.json").write_text(json.dumps(manifest))

    outside = tmp_path / "outside"
    _tokens(12).to_shards(outside, max_shard_samples=5)
    cases = {
        "dotdot": (lambda m: m["shards"][0].update(name="../outside/shard-00000"), r"shards\[0\]\.name"),
        "absolute": (lambda m: m["shards"][0].update(name=str(outside / "shard-00000")), r"shards\[0\]\.name"),
        "count": (lambda m: m["shards"][0].update(n_cells=4) or m.update(n_cells=11), "n_cells is 4 but the arrays hold 5"),
        "total": (lambda m: m.update(n_cells=99), r"'n_cells' must be the sum"),
        "type": (lambda m: m.update(shards="all of them"), r"'shards' must be a list"),
        "specials": (lambda m: m.update(specials={"pad": "x"}), r"'specials'"),
        "column": (lambda m: m.update(obs_columns={"../../x": []}), r"obs_columns"),
    }
    for name, (edit, message) in cases.items():
        path, manifest = fresh(name)
        edit(manifest)
        write(path, manifest)
        with pytest.raises(cellkit.DataError, match=message) as info:
            open_shards(path).to_memory()
        assert "manifest.json" in str(info.value), name
    # a shard directory that is a symlink out of the directory
    path, manifest = fresh("symlink")
    import shutil

    shutil.rmtree(path / "shard-00001")
    (path / "shard-00001").symlink_to(outside / "shard-00001", target_is_directory=True)
    with pytest.raises(cellkit.DataError, match="outside the shard directory"):
        open_shards(path)
    # deep nesting and a non-object are clear errors, not RecursionError / AttributeError
    path, _ = fresh("deep")
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(cellkit.DataError, match=r"manifest\.json"):
        open_shards(path)
