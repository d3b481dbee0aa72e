"""JupyterLab for real: a headless Chromium opens a notebook with the project's kernel, runs all cells on the
smoke parameters, and sees a figure in an output area and no error. The screenshot stays in the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT, SMOKE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_on_smoke(folder: Path) -> Path:
    """Notebook 01 with its parameters cell pointed at the smoke set and this folder (and nothing else changed)."""
    nb = nbformat.read(ROOT / "notebooks" / "01_sparse_training.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (f"params_file = {str(SMOKE)!r}\noverrides = {{}}\nruns_root = {str(folder / 'runs')!r}\n"
                   f"figures_root = {str(folder / 'figures')!r}")
    path = folder / "01_sparse_training.ipynb"
    nbformat.write(nb, path)
    return path


def kernel_spec(folder: Path) -> Path:
    """A 'vitprune' kernel spec for this interpreter (the name the notebooks ask for), on a private JUPYTER_PATH."""
    spec = folder / "jupyter" / "kernels" / "vitprune"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vitprune (.venv)", "language": "python"}))
    return folder / "jupyter"


def start_lab(folder: Path, port: int, token: str) -> subprocess.Popen:
    env = {**os.environ, "JUPYTER_PATH": str(kernel_spec(folder)), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
           "--LabApp.expose_app_in_browser=True", "--allow-root"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "lab.log", "w"))
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"jupyter lab did not start: {(folder / 'lab.log').read_text()[-2000:]}")


def test_jupyterlab_runs_a_notebook_and_shows_its_figures(tmp_path):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; `make test` installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    notebook_on_smoke(tmp_path)
    port, token = free_port(), "vitprune-test-token"
    lab = start_lab(tmp_path, port, token)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/01_sparse_training.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=90_000)
            kernel = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name")
            assert kernel == "vitprune"
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            code_cells = page.locator(".jp-CodeCell").count()
            page.wait_for_function(
                """n => { const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                          const p = prompts.map(e => e.textContent);
                          return p.length === n && p.every(t => /\\[\\d+\\]/.test(t)); }""",
                arg=code_cells, timeout=240_000)
            page.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "jupyterlab.png"))
            images = page.locator(".jp-OutputArea-output img").count()
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
            tracebacks = page.locator(".jp-OutputArea-output:has-text('Traceback')").count()
            browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    assert images >= 2, f"{images} figures rendered"
    assert errors == 0 and tracebacks == 0
    assert (tmp_path / "figures" / "smoke" / "training_curves.png").is_file()
    assert (tmp_path / "jupyterlab.png").stat().st_size > 20_000
