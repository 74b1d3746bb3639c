"""Shared fixtures for the widget tests (Python level; the browser fixtures live in test_browser.py)."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture(scope="session")
def _pbmc_session():
    from cellkit.datasets import pbmc_demo

    return pbmc_demo()


@pytest.fixture
def pbmc(_pbmc_session):
    """A fresh copy of scanpy's pbmc68k_reduced (700 real PBMCs) per test."""
    return _pbmc_session.copy()


@pytest.fixture
def demo():
    """A fresh demo model per test (1.8 MB; loads in milliseconds)."""
    from cellkit.datasets import demo_model

    return demo_model()


@pytest.fixture
def state(pbmc, demo):
    """A studio state holding the demo model and the PBMCs."""
    from cellkit.widgets import StudioState

    return StudioState(adata=pbmc, model=demo, adata_name="pbmc")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Browser tests: keep a screenshot of the page when a test fails (fixture ``page`` sets it)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        page = getattr(item, "_cellkit_page", None)
        if page is not None:
            from pathlib import Path

            from ._browser import artifacts_dir

            with contextlib.suppress(Exception):  # the page may be gone
                page.screenshot(path=str(Path(artifacts_dir()) / f"fail-{item.name}.png"), full_page=True)
