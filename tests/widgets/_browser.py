"""A real JupyterLab + Chromium session for the browser tests (recipe: shared/reference/ui-testing.md).

The server runs with throw-away config/settings/runtime dirs, no token, no news / update checks,
and one torch thread per kernel. Chromium is Debian's ``/usr/bin/chromium`` driven by the pip
``playwright`` package (no ``playwright install``). Without Chromium the browser tests skip,
unless ``CELLKIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns that into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACTIVE = ".jp-NotebookPanel:not(.lm-mod-hidden)"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def artifacts_dir() -> Path:
    """Where screenshots go (``$CELLKIT_ARTIFACTS`` or ``test-artifacts/`` in the repo)."""
    path = Path(os.environ.get("CELLKIT_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # local server only
        return r.status, r.read()


class JupyterLab:
    """A bounded JupyterLab server over ``root`` (start with :meth:`start`, end with :meth:`stop`)."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = Path(root), Path(home)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "jupyterlab.log"

    def start(self, timeout: float = 90.0) -> None:
        cfg, settings = self.home / "config", self.home / "settings"
        for d in ("config", "runtime", "settings", "workspaces", "ipython", "data"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        (cfg / "jupyter_server_config.py").write_text(
            "\n".join(
                [
                    'c.ServerApp.ip = "127.0.0.1"',
                    "c.ServerApp.open_browser = False",
                    "c.ServerApp.allow_root = True",
                    'c.IdentityProvider.token = ""',
                    'c.ServerApp.password = ""',
                    "c.ServerApp.disable_check_xsrf = True",
                    "c.LabApp.news_url = None",
                    'c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"',
                    'c.LabApp.extension_manager = "readonly"',
                ]
            )
        )
        for rel, content in {
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
                "fetchNews": "false",
                "checkForUpdates": False,
            },
        }.items():
            path = settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
        env = {
            **os.environ,
            "HOME": str(self.home),
            "JUPYTER_CONFIG_DIR": str(cfg),
            "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
            "IPYTHONDIR": str(self.home / "ipython"),
            "CELLKIT_HOME": str(self.home / "cellkit"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        self.proc = subprocess.Popen(
            [
                "timeout",
                "1500",
                sys.executable,
                "-m",
                "jupyterlab",
                f"--port={self.port}",
                f"--ServerApp.root_dir={self.root}",
            ],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"jupyterlab exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            try:
                if _get(f"{self.base}/api/status")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jupyterlab did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def sessions(self) -> list[dict]:
        return json.loads(_get(f"{self.base}/api/sessions")[1])

    def kernel_for(self, notebook: str) -> dict | None:
        for s in self.sessions():
            if s.get("path", "").endswith(notebook):
                return s.get("kernel")
        return None

    def shutdown_kernels(self) -> None:
        for s in self.sessions():
            kid = s.get("kernel", {}).get("id")
            if kid:
                req = urllib.request.Request(f"{self.base}/api/kernels/{kid}", method="DELETE")
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(req, timeout=10)


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A minimal nbformat-4 notebook of code cells."""
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
            for src in cells
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))
    return path


def open_and_run_all(page, lab: JupyterLab, notebook: str, workspace: str, timeout: float = 90.0) -> None:
    """Open ``notebook`` in a fresh workspace, wait for its kernel, then Run All (retried)."""
    page.goto(f"{lab.base}/lab/workspaces/{workspace}/tree/{notebook}")
    deadline = time.monotonic() + timeout
    while True:
        kernel = lab.kernel_for(notebook)
        if kernel and kernel.get("execution_state") == "idle" and kernel.get("connections", 0) >= 1:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel for {notebook} not ready: {kernel}")
        time.sleep(0.3)
    page.wait_for_selector(f"{ACTIVE} .jp-Cell", timeout=30_000)
    for _attempt in range(3):
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
        try:
            page.wait_for_function(
                """(sel) => [...document.querySelectorAll(sel + ' .jp-InputPrompt')]
                      .some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))""",
                arg=ACTIVE,
                timeout=10_000,
            )
            return
        except Exception:
            page.keyboard.press("Escape")
    raise TimeoutError("Run All did not start")


def wait_idle(lab: JupyterLab, notebook: str, timeout: float = 180.0) -> None:
    """Wait until the notebook's kernel has finished running (idle for 1 s)."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        kernel = lab.kernel_for(notebook) or {}
        if kernel.get("execution_state") == "idle":
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
        else:
            idle_since = None
        time.sleep(0.3)
    raise TimeoutError(f"{notebook} still busy after {timeout} s")


def need_browser(*modules: str) -> str:
    """Chromium's path, with playwright (and ``modules``) importable; else skip — or fail where
    ``CELLKIT_REQUIRE_BROWSER=1`` (CI), so that a missing browser never passes as a skip there."""
    import importlib.util

    import pytest

    required = os.environ.get("CELLKIT_REQUIRE_BROWSER") == "1"
    path = chromium_path()
    missing = None if path is not None else "chromium is not installed (apt-get install chromium)"
    for module in ("playwright", *modules):
        if missing is None and importlib.util.find_spec(module) is None:
            missing = f"{module} is not installed"
    if missing is not None:
        (pytest.fail if required else pytest.skip)(missing)
    return str(path)


@contextlib.contextmanager
def lab_with_notebook(tmp_path_factory, notebook: str, cells: list[str], *, name: str, modules: tuple[str, ...] = ()):
    """A JupyterLab serving one notebook of ``cells`` (its ``chromium`` set); kernels and server stop after."""
    executable = need_browser(*modules)
    root = tmp_path_factory.mktemp(f"{name}-root")
    write_notebook(root / notebook, cells)
    server = JupyterLab(root, tmp_path_factory.mktemp(f"{name}-home"))
    server.start()
    server.chromium = executable
    try:
        yield server
    finally:
        server.shutdown_kernels()
        server.stop()


@contextlib.contextmanager
def notebook_page(
    lab,
    notebook: str,
    workspace: str,
    *,
    height: int,
    timeout_ms: int,
    ready,
    failure_shot: str,
    init_script: str | None = None,
    idle_timeout: float = 180.0,
):
    """A Chromium page with ``notebook`` opened and run (Run All, kernel idle), then ``ready(page)``
    passed (a screenshot ``failure_shot`` in the artifacts when it fails); closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=lab.chromium, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": height})
        context.set_default_timeout(timeout_ms)
        if init_script is not None:
            context.add_init_script(init_script)
        page = context.new_page()
        open_and_run_all(page, lab, notebook, workspace)
        wait_idle(lab, notebook, timeout=idle_timeout)
        try:
            ready(page)
        except Exception:
            page.screenshot(path=str(artifacts_dir() / failure_shot))
            raise
        yield page
        context.close()
        browser.close()

