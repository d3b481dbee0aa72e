"""JupyterLab for real: a headless Chromium opens a notebook with the project's kernel, runs all cells on the
smoke parameters, and sees a figure in an output area and no error; in notebook 09 it changes one control of the
interactive view and sees the figure redrawn. The screenshots stay in the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
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


def notebook_on_smoke(folder: Path, stage: str = "01_sparse_training") -> Path:
    """A notebook with its parameters cell pointed at the smoke set and this folder (and nothing else changed: a
    parameter the cell declares beyond these, such as notebook 09's `interactive = True`, keeps its value)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{stage}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    kept = [line for line in cell.source.splitlines()
            if line.split("=")[0].strip() not in ("params_file", "overrides", "runs_root", "figures_root")]
    cell.source = "\n".join([f"params_file = {str(SMOKE)!r}", "overrides = {}", f"runs_root = {str(folder / 'runs')!r}",
                             f"figures_root = {str(folder / 'figures')!r}", *kept])
    path = folder / f"{stage}.ipynb"
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


def need_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; `make test` installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it)")


def open_and_run_all(page, port: int, token: str, notebook: str, timeout_ms: int = 240_000) -> None:
    """Open `notebook` in JupyterLab, check it runs on the project's kernel, run all cells and wait for the last."""
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook}?token={token}")
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
        arg=code_cells, timeout=timeout_ms)


@contextmanager
def lab_page(folder: Path):
    """A headless Chromium page and the JupyterLab serving `folder` (the port and token to reach it), closed after."""
    need_chromium()
    from playwright.sync_api import sync_playwright

    port, token = free_port(), "vitprune-test-token"
    lab = start_lab(folder, port, token)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                yield browser.new_page(viewport={"width": 1400, "height": 1000}), port, token
            finally:
                browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)


def test_jupyterlab_runs_a_notebook_and_shows_its_figures(tmp_path):
    notebook_on_smoke(tmp_path)
    with lab_page(tmp_path) as (page, port, token):
        open_and_run_all(page, port, token, "01_sparse_training.ipynb")
        page.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "jupyterlab.png"))
        images = page.locator(".jp-OutputArea-output img").count()
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
        tracebacks = page.locator(".jp-OutputArea-output:has-text('Traceback')").count()
    assert images >= 2, f"{images} figures rendered"
    assert errors == 0 and tracebacks == 0
    assert (tmp_path / "figures" / "smoke" / "training_curves.png").is_file()
    assert (tmp_path / "jupyterlab.png").stat().st_size > 20_000


def test_the_interactive_view_of_notebook_09_redraws_when_a_control_changes(tmp_path, smoke_run):
    """Notebook 09 opened in JupyterLab over a copy of a finished smoke run: its ipywidgets view is there, and
    choosing "before fine-tuning" redraws the figure (another image in the view's output)."""
    root, _ = smoke_run
    for part in ("runs", "figures"):
        shutil.copytree(root / part / "smoke", tmp_path / part / "smoke", ignore=shutil.ignore_patterns(".lock"))
    notebook_on_smoke(tmp_path, "09_comparison")
    with lab_page(tmp_path) as (page, port, token):
        open_and_run_all(page, port, token, "09_comparison.ipynb")
        view = page.locator(".widget-output img").first
        view.wait_for(timeout=60_000)
        view.scroll_into_view_if_needed()
        before = view.get_attribute("src")
        page.screenshot(path=str(tmp_path / "explorer_after.png"))
        page.locator("button.widget-toggle-button", has_text="before fine-tuning").click()
        page.wait_for_function(
            """old => { const img = document.querySelector('.widget-output img');
                        return img !== null && img.getAttribute('src') !== old; }""", arg=before, timeout=60_000)
        page.screenshot(path=str(tmp_path / "explorer_before.png"))
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
    assert errors == 0
    assert (tmp_path / "explorer_before.png").stat().st_size > 20_000
