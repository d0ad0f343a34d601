"""Open a local HTML file in headless Chromium and report what a user would see: a screenshot, the
console errors and uncaught exceptions, failed resource loads, and the state of every <img>.

A tiny Chrome DevTools Protocol client over aiohttp's websocket (aiohttp is installed with
ray[default]); no browser-automation package needed. Chromium is the Debian ``chromium`` package
(``apt-get install -y chromium``); :func:`find_chromium` fails loudly when it is missing.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = "apt-get install -y chromium"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    screenshot_png: bytes = b""
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    body_text_length: int = 0

    @property
    def problems(self) -> list[str]:
        return [*self.console_errors, *self.exceptions, *self.failed_requests, *self.log_errors]


class _CDP:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: asyncio.Queue = asyncio.Queue()

    async def pump(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                await self.events.put(data)

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        msg_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        payload: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            payload["sessionId"] = session
        await self.ws.send_str(json.dumps(payload))
        reply = await asyncio.wait_for(fut, timeout=60)
        if "error" in reply:
            raise RuntimeError(f"CDP {method} failed: {reply['error']}")
        return reply.get("result", {})


async def _inspect(ws_url: str, page_url: str, width: int, height: int) -> PageReport:
    import aiohttp

    report = PageReport()
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        cdp = _CDP(ws)
        pump = asyncio.create_task(cdp.pump())
        try:
            target = await cdp.send("Target.createTarget", {"url": "about:blank"})
            session = (await cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))[
                "sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                await cdp.send(f"{domain}.enable", session=session)
            await cdp.send("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            await cdp.send("Page.navigate", {"url": page_url}, session)
            loaded = False
            while not loaded:
                event = await asyncio.wait_for(cdp.events.get(), timeout=60)
                _record(event, report)
                loaded = event.get("method") == "Page.loadEventFired"
            await asyncio.sleep(0.5)  # late console messages
            while not cdp.events.empty():
                _record(cdp.events.get_nowait(), report)
            js = ("JSON.stringify({title: document.title, text: document.body.innerText.length, images: "
                  "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, "
                  "h: i.naturalHeight}))})")
            value = (await cdp.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, session))[
                "result"]["value"]
            state = json.loads(value)
            report.title, report.body_text_length, report.images = state["title"], state["text"], state["images"]
            shot = await cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
            report.screenshot_png = base64.b64decode(shot["data"])
            while not cdp.events.empty():
                _record(cdp.events.get_nowait(), report)
        finally:
            pump.cancel()
    return report


def _record(event: dict[str, Any], report: PageReport) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        report.exceptions.append(str((details.get("exception") or {}).get("description") or details.get("text")))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        report.log_errors.append(params["entry"].get("text", ""))
    elif method == "Network.loadingFailed":
        report.failed_requests.append(f"{params.get('errorText')} ({params.get('type')})")


def inspect_page(html_path: Path, width: int = 1280, height: int = 1000, timeout: float = 90) -> PageReport:
    """Load ``html_path`` (file://) in a fresh headless Chromium profile and report on it."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium binary ({', '.join(CHROMIUM_NAMES)}) on PATH; install it: {INSTALL_HINT}")
    profile = tempfile.mkdtemp(prefix="rdeic-chromium-")
    proc = subprocess.Popen([binary, *HEADLESS_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"HOME": profile})
    try:
        ws_url = _devtools_url(proc, timeout)
        return asyncio.run(asyncio.wait_for(_inspect(ws_url, html_path.resolve().as_uri(), width, height), timeout))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(proc: subprocess.Popen, timeout: float) -> str:
    """The browser websocket URL Chromium prints on stderr ("DevTools listening on ws://...")."""
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if not sel.select(timeout=0.5):
            continue
        line = proc.stderr.readline()  # type: ignore[union-attr]
        seen.append(line)
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            # keep draining stderr so a chatty browser never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return m.group(1)
    raise RuntimeError("Chromium did not start its DevTools endpoint; stderr:\n" + "".join(seen[-30:]))
