"""The shipped UI workflows in ComfyUI 0.30.0's real frontend, driven by headless Chromium (Debian's chromium).

The page is served by the session's test server; the browser may reach nothing but 127.0.0.1 (other requests are
aborted). Frontend 1.47 reports node types it does not know in its error overview ("Missing Node Packs"), not in a
modal dialog; a control test proves that this detector fires. The test server has none of the real model files, so
"Missing Models" errors are expected and ignored here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from comfyui_xdit.testing.server_launcher import REPO_ROOT, ComfyServer
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from comfyui_xdit.workflow_tools import is_link

pytestmark = pytest.mark.server

WORKFLOWS = REPO_ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
APP_READY_JS = "() => window.app?.vueAppReady && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 0"
LOAD_JS = """async ([workflow, name]) => {
    await window.app.loadGraphData(workflow, true, true, name);
    return window.app.graph.nodes.map(node => ({
        id: String(node.id),
        type: node.type,
        registered: node.type in window.LiteGraph.registered_node_types,
        widgets: Object.fromEntries((node.widgets ?? []).map(widget => [widget.name, widget.value])),
    }));
}"""
MISSING_NODES_HEADING = "Missing Node Packs"  # frontend 1.47's error-overview section for unknown node types


def chromium_executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_executable()
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must run the browser tests (.ci/setup installs chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        # The system browser, never a downloaded one; Playwright adds --headless.
        launched = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def frontend(browser: Browser, comfy_server: ComfyServer) -> Iterator[Callable[[], Page]]:
    """Opens the server's frontend in a fresh browser context and waits until the app has registered its nodes."""
    contexts = []

    def open_page() -> Page:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        contexts.append(context)
        context.route("**/*", lambda route: route.continue_() if _is_loopback(route.request.url) else route.abort())
        page = context.new_page()
        page.goto(f"{comfy_server.url}/")
        page.wait_for_function(APP_READY_JS, timeout=120_000)
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("frontend_screenshots")


def load(page: Page, workflow: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return page.evaluate(LOAD_JS, [workflow, name])


def error_overview(page: Page) -> str:
    """The text of the frontend's error overview after a load, or "" when it reports no error at all."""
    details = page.get_by_role("button", name="View details")
    try:
        details.first.wait_for(state="visible", timeout=10_000)
    except PlaywrightTimeoutError:
        return ""
    details.first.click()
    page.get_by_text("Errors detected").first.wait_for(state="visible", timeout=10_000)
    # Sections fill in asynchronously (the missing-pack lookup comes last): read once the text stops changing.
    return settled_text(page)


def settled_text(page: Page, quiet_s: float = 2.0, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    text, since = page.inner_text("body"), time.monotonic()
    while time.monotonic() < deadline:
        page.wait_for_timeout(200)
        current = page.inner_text("body")
        if current != text:
            text, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return text


@pytest.mark.parametrize("path", UI_FILES, ids=lambda path: path.name)
def test_ui_workflow_loads_with_every_node_known(path: Path, frontend: Callable[[], Page],
                                                 screenshot_dir: Path) -> None:
    workflow = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / f"{path.stem}_api.json").read_text())
    page = frontend()
    nodes = load(page, workflow, path.name)
    shot = screenshot_dir / f"{path.stem}.png"
    page.screenshot(path=str(shot))
    assert len(nodes) == len(workflow["nodes"]) == len(api), shot
    assert [node["type"] for node in nodes if not node["registered"]] == [], shot
    overview = error_overview(page)
    page.screenshot(path=str(screenshot_dir / f"{path.stem}_errors.png"))
    assert MISSING_NODES_HEADING not in overview, overview
    # The frontend's own widgets, by name, hold the API file's values: widgets_values are in the right order.
    for node in nodes:
        expected = {name: value for name, value in api[node["id"]]["inputs"].items() if not is_link(value)}
        shown = {name: node["widgets"].get(name, "(no such widget)") for name in expected}
        assert shown == expected, f"node {node['id']} ({node['type']})"


def test_missing_node_detector_fires(frontend: Callable[[], Page]) -> None:
    workflow = json.loads(UI_FILES[0].read_text())
    workflow["nodes"][0]["type"] = "NoSuchNodeForXDiTTests"
    page = frontend()
    nodes = load(page, workflow, "missing.json")
    assert [node["type"] for node in nodes if not node["registered"]] == ["NoSuchNodeForXDiTTests"]
    overview = error_overview(page)
    # The pack is named from the node's properties.cnr_id, which the shipped workflows set for the pack's nodes.
    assert MISSING_NODES_HEADING in overview and "comfyui-xdit" in overview, overview


def _is_loopback(url: str) -> bool:
    if url.startswith(("data:", "blob:")):
        return True
    return urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
