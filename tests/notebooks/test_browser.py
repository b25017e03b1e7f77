"""The profiling dashboard in a real browser: JupyterLab on 127.0.0.1 with fresh settings,
runtime and data directories, Debian's Chromium driven by playwright (no browser download).

Runs the notebook, checks the dashboard's plotly figures and 3Dmol canvas render (and that the
canvas is not blank), changes widgets (crop, kernels) and presses Run, waits for the redrawn
figures, saves a screenshot and checks that it is not blank, and that nothing was requested
from outside 127.0.0.1. Skipped, with the reason printed, only where Chromium or playwright is
missing (``scripts/browser_deps.sh`` installs Chromium for ``make test``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "profiling_dashboard.ipynb"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # WebGL for 3Dmol.js without a GPU: Chromium's software renderer.
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
]  # fmt: skip

# Share of drawn (non-white) pixels of an image given as a data URL.
INK_JS = """async (uri) => {
  const image = new Image();
  image.src = uri;
  await image.decode();
  const canvas = document.createElement('canvas');
  canvas.width = image.width; canvas.height = image.height;
  const context = canvas.getContext('2d');
  context.drawImage(image, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < pixels.length; i += 4)
    if (pixels[i + 3] > 0 && (pixels[i] < 235 || pixels[i + 1] < 235 || pixels[i + 2] < 235)) ink++;
  return ink / (canvas.width * canvas.height);
}"""
# WebGL canvases may not keep their pixels: ask the 3Dmol viewer for a fresh PNG.
VIEWER_PNG_JS = """() => {
  const div = document.querySelector('.megafold-structure div[id^="3dmolviewer_"]');
  return window[div.id.replace('3dmolviewer_', 'viewer_')].pngURI();
}"""


def _chromium() -> str | None:
    return shutil.which("chromium") or next(
        (path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(path)), None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip(reason: str) -> None:
    print(f"SKIPPED browser test: {reason}")
    pytest.skip(reason)


def _run_all_cells(page) -> list[str]:
    """Run > Run All Cells, retried until the first code cell has started (a click on a menu
    that is still being built is sometimes lost). A JupyterLab dialog in the way (seen on
    loaded 2-core CI machines: "Select Kernel", which Escape does not close) is accepted with
    its default button (the notebook's own kernel), else closed with Escape; the texts of such
    dialogs are returned so that a later failure can show them."""
    started = "document.querySelector('.jp-CodeCell .jp-InputPrompt').textContent.trim() !== '[ ]:'"
    dialogs = []
    for _ in range(5):
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            dialogs.append(dialog.first.inner_text())
            accept = dialog.first.locator(".jp-mod-accept")
            if accept.count():
                accept.first.click()
            else:
                page.keyboard.press("Escape")
            try:
                page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
            except Exception:  # still open on a loaded machine: the next round accepts or closes it again
                continue
        page.click(".jp-Notebook")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(started, timeout=10_000)
            return dialogs
        except Exception:
            page.keyboard.press("Escape")
    raise AssertionError(f"Run All Cells did not start the notebook (dialogs: {dialogs})")


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free port with a token and fresh directories; yields its URL
    prefix, token and root directory (holding a copy of the dashboard notebook)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    fresh = {name: tmp_path / name.lower() for name in (
        "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR",
    )}  # fmt: skip
    # Every cell stays in the page (no windowing), so the checks below see the whole notebook.
    # No news pop-up over the dashboard, and nothing fetched from the internet.
    overrides = {
        ("notebook-extension", "tracker"): {"windowingMode": "none"},
        ("apputils-extension", "notification"): {"fetchNews": "false", "checkForUpdates": False},
    }
    for (extension, plugin), values in overrides.items():
        folder = fresh["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / extension
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    env = {**os.environ, **{name: str(path) for name, path in fresh.items()}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_dashboard_in_jupyterlab(jupyterlab, tmp_path):
    chromium = _chromium()
    if chromium is None:
        _skip("Chromium is not installed (scripts/browser_deps.sh installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("python playwright is not installed (pip install playwright)")

    url, token, root = jupyterlab
    remote, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 2000}).new_page()
            local = (url, "data:", "blob:")
            page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(local) else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            dialogs = _run_all_cells(page)
            if dialogs:
                print(f"closed JupyterLab dialog(s) before running: {dialogs}")  # shown on a failure

            # The first run: the notebook's dash.run() cell.
            page.wait_for_function("document.body.textContent.includes('(run 1)')", timeout=240_000)
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            page.wait_for_selector(".megafold-structure canvas", timeout=60_000)
            assert page.locator(".js-plotly-plot").count() >= 3  # modules, step, memory

            # Change widgets: crop 16, torch only; press Run and wait for the redrawn dashboard.
            crop_label = page.locator("label", has_text=re.compile(r"^crop$"))
            crop = page.locator(".widget-text", has=crop_label).locator("input").first
            crop.fill("16")
            crop.press("Enter")
            triton = page.locator("label", has_text="triton (megafold)").locator("input[type=checkbox]")
            if triton.is_checked():
                triton.uncheck()
            page.locator("button.jupyter-button", has_text=re.compile(r"^\s*Run$")).click()
            page.wait_for_function("document.body.textContent.includes('(run 2)')", timeout=120_000)
            page.wait_for_function("document.body.textContent.includes('(16 tokens)')", timeout=30_000)
            page.wait_for_selector(".megafold-structure canvas", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            page.wait_for_timeout(1500)

            viewer_ink = page.evaluate(INK_JS, page.evaluate(VIEWER_PNG_JS))
            screenshot = tmp_path / "dashboard.png"
            dashboard = page.locator(".widget-vbox", has=page.locator(".js-plotly-plot")).first
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(screenshot))
            uri = "data:image/png;base64," + base64.b64encode(screenshot.read_bytes()).decode()
            screenshot_ink = page.evaluate(INK_JS, uri)
            status = page.locator(".widget-html", has_text="(run 2)").first.inner_text()
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"failure screenshot: {tmp_path / 'failure.png'}\npage text: {page.inner_text('body')[-3000:]}")
            raise
        finally:
            browser.close()
    print(f"screenshot: {screenshot} (drawn: {screenshot_ink:.1%}; 3Dmol canvas drawn: {viewer_ink:.1%})")
    assert "torch" in status and "triton" not in status, status  # the second run compared torch alone
    assert viewer_ink > 0.02, f"the 3Dmol canvas looks blank ({viewer_ink:.1%} drawn)"
    assert screenshot_ink > 0.05, f"the screenshot looks blank ({screenshot_ink:.1%} drawn)"
    assert not remote, f"requests left 127.0.0.1: {sorted(set(remote))[:5]}"
    assert not [e for e in errors if "3Dmol" in e or "plotly" in e.lower()], errors[:5]
