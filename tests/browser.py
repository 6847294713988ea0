"""Headless chromium driven over the Chrome DevTools Protocol: do the static report pages really render?

Only the standard library, aiohttp and Pillow: no browser-automation package to pin. One chromium serves a whole
test session (it starts in about 0.2 s); each page gets its own tab. Everything stays on 127.0.0.1.

    python tests/browser.py PAGE.html OUT.png [--width 1100]   # full-page screenshot, e.g. for the README
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp

# Chromium's own background traffic (updates, metrics, safe browsing, sync...) is off, and no host name resolves,
# so a page that points at the internet shows a broken image instead of reaching out.
QUIET = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--metrics-recording-only",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
MAX_HEIGHT = 10_000  # px: taller pages are cut, a screenshot of a runaway layout should not eat the memory

# Runs in the page once it has loaded, when every <img> has either decoded or failed (naturalWidth 0).
COLLECT = """(() => ({
  title: document.title,
  images: [...document.images].map(i => [i.getAttribute('src') || '', i.complete ? i.naturalWidth : 0]),
  tables: [...document.querySelectorAll('table')].map(t => ({
    id: t.id,
    header: [...t.querySelectorAll('thead th')].map(th => th.textContent.trim()),
    rows: t.querySelectorAll('tbody tr').length,
    first_cells: [...t.querySelectorAll('tbody tr')].map(r => r.cells.length ? r.cells[0].textContent.trim() : ''),
  })),
  links: [...document.links].map(a => {
    const href = a.getAttribute('href') || '';
    const here = href.startsWith('#') ? !!document.getElementById(decodeURIComponent(href.slice(1))) : null;
    return [href, a.href, here];
  }),
}))()"""


class BrowserError(RuntimeError):
    pass


@dataclass(frozen=True)
class Table:
    id: str
    header: list[str]
    rows: int
    first_cells: list[str]


@dataclass(frozen=True)
class PageCheck:
    """What a reader would see: the title, each image's decoded width, each table's shape, and a screenshot."""

    title: str
    images: list[tuple[str, int]]
    tables: list[Table]
    screenshot: bytes
    links: list[tuple[str, str, bool | None]] = ()  # (href as written, resolved URL, its anchor exists: #-links only)

    def broken_images(self) -> list[str]:
        return [src for src, width in self.images if width == 0]

    def broken_links(self) -> list[str]:
        """Links a reader offline cannot follow: an anchor missing from the page, a file that is not there, or
        anything outside the page's own folder tree of files (a report's links are relative, to files)."""
        broken = []
        for href, resolved, anchor_found in self.links:
            if href.startswith("#"):
                ok = bool(anchor_found)
            else:
                parsed = urlparse(resolved)
                ok = parsed.scheme == "file" and Path(unquote(parsed.path)).exists()
            if not ok:
                broken.append(href)
        return broken

    def table(self, id: str) -> Table:
        for table in self.tables:
            if table.id == id:
                return table
        raise KeyError(f"no table with id {id!r}; the page has {[t.id for t in self.tables]}")


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def blank(png: bytes) -> bool:
    """One colour, give or take noise: what a page that failed to render looks like."""
    from io import BytesIO

    from PIL import Image, ImageStat

    image = Image.open(BytesIO(png)).convert("RGB")
    return image.getcolors(maxcolors=1) is not None or ImageStat.Stat(image.convert("L")).stddev[0] < 1


def check_renders(browser: Browser, page: Path, tables: dict[str, int]) -> PageCheck:
    """A report page as a reader sees it: it draws images and every one loads, every link leads to something there,
    each table in `tables` ({id: body rows}) has its rows, and the screenshot is not blank."""
    checked = browser.check(page)
    assert checked.images, page
    assert checked.broken_images() == [], page
    assert checked.broken_links() == [], page
    assert {table_id: checked.table(table_id).rows for table_id in tables} == tables, page
    assert not blank(checked.screenshot), page
    return checked


class _Tab:
    """One websocket to one tab: commands in order, their answers matched by id, events kept for `wait`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.last_id, self.events = ws, 0, []

    async def _receive(self) -> dict:
        received = await self.ws.receive()
        if received.type != aiohttp.WSMsgType.TEXT:
            raise BrowserError(f"the tab's connection ended ({received.type.name}): did chromium crash?")
        message = json.loads(received.data)
        if "method" in message:
            self.events.append(message["method"])
        return message

    async def send(self, method: str, **params) -> dict:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while (message := await self._receive()).get("id") != self.last_id:
            pass
        if "error" in message:
            raise BrowserError(f"{method}: {message['error']}")
        return message["result"]

    async def wait(self, event: str) -> None:
        while event not in self.events:
            await self._receive()


class Browser:
    """One headless chromium for many pages; use it as a context manager so the process and profile go away."""

    def __init__(self, executable: str | None = None, start_timeout: float = 30, load_timeout: float = 15):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("chromium is not installed (apt-get install chromium)")
        self.load_timeout = load_timeout
        self.profile = Path(tempfile.mkdtemp(prefix="tlray-chromium-"))
        log = self.profile / "stderr.log"  # a file, not a pipe: nobody has to keep draining it
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [self.executable, *self.flags(), "about:blank"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: closing takes the renderers and helpers too
            )
        deadline = time.monotonic() + start_timeout
        while not (match := re.search(r"DevTools listening on (ws://\S+)", log.read_text(errors="replace"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                self.close()
                raise BrowserError(f"chromium did not start (exit code {self.process.returncode}):\n{tail}")
            time.sleep(0.05)
        self.endpoint = "http://" + match[1].split("/")[2]  # 127.0.0.1:PORT

    def flags(self) -> list[str]:
        return [
            "--headless=new",
            "--remote-debugging-port=0",  # chromium picks a free port and prints it
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self.profile}",
            "--no-sandbox",  # root in containers and CI has no user namespaces for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",  # Docker's /dev/shm is 64 MB: big screenshots crash the renderer there
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--allow-file-access-from-files",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            *QUIET,
        ]

    def check(self, page: Path, width: int = 1200, height: int = 900) -> PageCheck:
        """Load `page` in a fresh tab `width` px wide, once every image has loaded or failed; screenshot it all."""
        return asyncio.run(asyncio.wait_for(self._check(Path(page).resolve().as_uri(), width, height), 60))

    async def _check(self, url: str, width: int, height: int) -> PageCheck:
        async with aiohttp.ClientSession() as http:
            # PUT: chromium 111+ refuses GET here. Open blank and navigate later, so no event is missed.
            async with http.put(f"{self.endpoint}/json/new?about:blank") as response:
                target = await response.json()
            try:
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    tab = _Tab(ws)
                    await tab.send("Page.enable")
                    metrics = {"deviceScaleFactor": 1, "mobile": False}
                    await tab.send("Emulation.setDeviceMetricsOverride", width=width, height=height, **metrics)
                    tab.events.clear()  # a late load event of about:blank must not pass for the page's
                    navigation = await tab.send("Page.navigate", url=url)
                    if "errorText" in navigation:
                        raise BrowserError(f"{url}: {navigation['errorText']}")
                    try:
                        await asyncio.wait_for(tab.wait("Page.loadEventFired"), self.load_timeout)
                    except asyncio.TimeoutError:
                        raise BrowserError(f"{url} did not finish loading in {self.load_timeout:.0f} s") from None
                    found = await tab.send("Runtime.evaluate", expression=COLLECT, returnByValue=True)
                    if "exceptionDetails" in found:
                        raise BrowserError(f"collecting {url}: {found['exceptionDetails']}")
                    layout = await tab.send("Page.getLayoutMetrics")
                    content = layout.get("cssContentSize", layout["contentSize"])
                    full = min(max(height, int(content["height"])), MAX_HEIGHT)
                    await tab.send("Emulation.setDeviceMetricsOverride", width=width, height=full, **metrics)
                    shot = await tab.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            finally:
                with contextlib.suppress(aiohttp.ClientError):  # chromium died: the error saying so is on its way
                    async with http.get(f"{self.endpoint}/json/close/{target['id']}"):
                        pass
        value = found["result"]["value"]
        return PageCheck(
            title=value["title"],
            images=[(src, width) for src, width in value["images"]],
            tables=[Table(**table) for table in value["tables"]],
            screenshot=base64.b64decode(shot["data"]),
            links=[tuple(link) for link in value["links"]],
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # helpers that outlived the browser process
        except ProcessLookupError:
            pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Full-page screenshot of a static HTML page, and what it shows.")
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    with Browser() as browser:
        check = browser.check(args.page, width=args.width)
    args.out.write_bytes(check.screenshot)
    print(f"{args.page}: {check.title!r}, screenshot {args.out}{' (BLANK)' if blank(check.screenshot) else ''}")
    for src, width in check.images:
        print(f"  img {src}: {width} px wide{' (BROKEN)' if width == 0 else ''}")
    for table in check.tables:
        print(f"  table #{table.id}: {table.rows} rows, columns {table.header}")
    broken = set(check.broken_links())
    for href, _, _ in check.links:
        print(f"  link {href}{' (BROKEN)' if href in broken else ''}")


if __name__ == "__main__":
    main()
