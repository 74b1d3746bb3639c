"""The job-progress row of the long panel actions: bar, estimate, disabled start button, Cancel.

Each test holds the job at its first batch (the progress callback waits on an event), looks at
the panel while it runs, then cancels or releases it.
"""

from __future__ import annotations

import threading

import ipywidgets as widgets
import pytest

import cellkit
from cellkit.widgets import StudioState
from cellkit.widgets._attention import AttentionPanel
from cellkit.widgets._base import Panel
from cellkit.widgets._embedding import EmbeddingPanel
from cellkit.widgets._genes import GenePanel
from cellkit.widgets._insilico import InSilicoPanel
from cellkit.widgets._progress import JobProgress, duration


class Gate:
    """Hold a panel's job at its first batch until :meth:`release` (patches ``jobs._on_progress``)."""

    def __init__(self, jobs: JobProgress) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.values: list[float] = []
        inner = jobs._on_progress

        def hold(done: int, total: int) -> None:
            inner(done, total)
            self.values.append(jobs.bar.value)
            if 0 < done < total and not self.reached.is_set():  # mid-way through a step
                self.reached.set()
                assert self.go.wait(60), "the test never released the job"

        jobs._on_progress = hold  # type: ignore[method-assign]

    def wait(self) -> None:
        assert self.reached.wait(120), "the job never reported its first batch"

    def release(self) -> None:
        self.go.set()


def _running(jobs: JobProgress, button: widgets.Button) -> None:
    assert jobs.running and jobs.layout.display != "none"
    assert button.disabled, "the start button is clickable while its job runs"
    assert not jobs.cancel_button.disabled and jobs.cancel_button.layout.display != "none"
    assert 0 < jobs.bar.value < 1
    assert " of " in jobs.status.value and "elapsed" in jobs.status.value and "left" in jobs.status.value


def _cancel(panel: Panel, gate: Gate) -> None:
    panel.jobs.cancel()
    assert panel.jobs.cancel_button.disabled
    gate.release()
    panel.wait(120)
    assert panel.jobs.outcome == "cancelled"
    assert "Cancelled" in panel.message_text and "nothing was written" in panel.message_text
    assert panel.jobs.cancel_button.layout.display == "none"


def test_duration_reads_like_a_clock():
    assert duration(4.4) == "4 s"
    assert duration(185) == "3 min 05 s"
    assert duration(3720) == "1 h 02 min"


def test_job_progress_alone_restores_the_buttons():
    panel = Panel()
    jobs = JobProgress()
    start, other = widgets.Button(), widgets.Button(disabled=True)
    seen = {}

    def fn(progress: cellkit.Progress) -> int:
        seen["disabled"] = (start.disabled, other.disabled)
        return 7

    assert (
        jobs.run(panel, fn, name="x", buttons=[start, other], on_done=lambda r: seen.setdefault("r", r)) == 7
    )
    assert seen == {"disabled": (True, True), "r": 7}
    assert not start.disabled and other.disabled  # each button as it was before
    assert jobs.outcome == "done" and "done in" in jobs.status.value

    def boom(progress: cellkit.Progress) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        jobs.run(panel, boom, name="y", buttons=[start])
    assert jobs.outcome == "failed" and not start.disabled


def test_embeddings_compute_shows_progress_and_cancel_writes_nothing(state):
    panel = EmbeddingPanel(state)
    gate = Gate(panel.jobs)
    before = set(state.adata.obsm)
    panel.compute("X_job", background=True)
    gate.wait()
    _running(panel.jobs, panel.compute_button)
    assert "Embedding cells" in panel.jobs.status.value
    # a second start is refused, not queued
    assert panel.compute("X_job2") is None and "still running" in panel.message_text
    _cancel(panel, gate)
    assert set(state.adata.obsm) == before
    assert not panel.compute_button.disabled


def test_embeddings_compute_to_the_end(state):
    panel = EmbeddingPanel(state)
    gate = Gate(panel.jobs)
    panel.compute("X_job", background=True)
    gate.wait()
    gate.release()
    panel.wait(300)
    assert panel.jobs.outcome == "done" and panel.jobs.bar.value == 1.0
    assert "X_job_umap" in state.adata.obsm and not panel.compute_button.disabled
    assert gate.values == sorted(gate.values)


def test_attention_show_shows_progress_and_cancel(state):
    panel = AttentionPanel(state)
    panel.set_group()  # all cells
    panel.max_cells.value = 150
    gate = Gate(panel.jobs)
    panel.show(background=True)
    gate.wait()
    _running(panel.jobs, panel.show_button)
    assert panel.diff_button.disabled
    _cancel(panel, gate)
    assert panel.matrix is None and not panel.show_button.disabled


def test_gene_embeddings_show_progress_and_cancel(state):
    panel = GenePanel(state)
    panel.max_cells_box.value = 200
    gate = Gate(panel.jobs)
    panel.compute_embeddings("contextual", background=True)
    gate.wait()
    _running(panel.jobs, panel.compute_button)
    _cancel(panel, gate)
    assert not panel.compute_button.disabled


def test_insilico_run_shows_progress_and_cancel(state):
    panel = InSilicoPanel(state)
    panel.max_cells.value = 20
    gate = Gate(panel.jobs)
    before = set(state.adata.uns)
    panel.store_uns.value = True
    panel.run(["CD3E", "LYZ", "MS4A1"], n_null=1, background=True)
    gate.wait()
    _running(panel.jobs, panel.run_button)
    assert "perturbation" in panel.jobs.status.value
    _cancel(panel, gate)
    assert set(state.adata.uns) == before and panel.result is None
    assert not panel.run_button.disabled


def test_state_alone():
    """A panel without data: the job row stays hidden, nothing runs."""
    panel = EmbeddingPanel(StudioState())
    panel.compute("X")
    assert panel.jobs.layout.display == "none" and not panel.jobs.running
