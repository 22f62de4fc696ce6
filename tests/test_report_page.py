"""The demo's report in a real headless browser (Chromium from Debian's packages).

Chromium is driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the test needs no driver
package. It loads the page, collects console errors, exceptions and log errors (a blocked
script or a Content-Security-Policy violation shows there), and inspects the rendered DOM.

Set EDGEPORT_REPORT_SCREENSHOT=path to keep a screenshot of the demo's report (the README's
bench/results/report-screenshot.png is made this way), and EDGEPORT_REPORT_DEMO=folder to use
a demo output already made instead of running the demo.
"""
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from edgeport.cli import main
from edgeport.runtime.page import machine_names
from test_report_and_estimate_inputs import as_measured_on_an_orin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (`make test` installs it)"),
              pytest.mark.xdist_group("demo")]  # the demo run's worker (conftest.demo_run)
HOSTILE = {"label": '<img src=x onerror="window.pwned=1">', "model": "</table><script>window.pwned=2</script>",
           "module": "'><svg onload=window.pwned=3>"}


class Browser:
    """One headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, profile_dir: Path):
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()

        def wire_pipes():  # the protocol pipe is fds 3 (commands in) and 4 (replies out)
            read_copy, write_copy = os.dup(to_browser_read), os.dup(from_browser_write)
            os.dup2(read_copy, 3)
            os.dup2(write_copy, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--hide-scrollbars",
             f"--user-data-dir={profile_dir}", "--no-first-run", "--window-size=1300,1000", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire_pipes, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.buffer, self.events, self.next_id = b"", [], 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)

    def _messages(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                yield json.loads(raw)
            ready, _, _ = select.select([self.from_browser], [], [], 0.5)
            if ready:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buffer += chunk
        raise TimeoutError("no answer from chromium")

    def send(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        for reply in self._messages(timeout):
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def load(self, path: Path) -> None:
        self.events.clear()
        self.send("Page.navigate", session=True, url=path.as_uri())
        if not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            next(m for m in self._messages(60) if self.events.append(m) or m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and log errors (CSP violations, failed loads)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args")))
            elif method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def screenshot(self, path: Path) -> None:
        height = self.evaluate("document.documentElement.scrollHeight")
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=1300, height=height, deviceScaleFactor=1,
                  mobile=False)
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)


PLOTS = """Array.from(document.querySelectorAll("figure.plot")).map(figure => {
  const shown = element => { const box = element.getBoundingClientRect(); return box.width > 0 && box.height > 0; };
  const labels = kind => Array.from(figure.querySelectorAll(`g[id*="${kind}tick_"] text`))
    .filter(t => shown(t) && t.textContent.trim()).map(t => t.textContent);
  return {id: figure.id, x: labels("x"), y: labels("y"),
          points: Array.from(figure.querySelectorAll('g[id$="-points"]')).filter(shown).length,
          text: figure.textContent};
})"""


@pytest.fixture(scope="module")
def demo(request) -> Path:
    """The demo's output folder: the session's `edgeport demo` run (EDGEPORT_REPORT_DEMO names
    one already made, to take a screenshot again without running the demo)."""
    if os.environ.get("EDGEPORT_REPORT_DEMO"):
        return Path(os.environ["EDGEPORT_REPORT_DEMO"])
    out = request.getfixturevalue("demo_run")[0]
    assert json.loads((out / "summary.json").read_text())["report"] == str(out / "report.html")
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def test_the_demo_report_renders_without_errors_with_readable_plots(demo, browser, tmp_path):
    browser.load(demo / "report.html")
    assert browser.errors() == []
    plots = browser.evaluate(PLOTS)
    kinds = {p["id"].rsplit("-", 1)[0] if p["id"][-1].isdigit() else p["id"] for p in plots}
    assert {"plot-tradeoff", "plot-devices", "plot-categories", "plot-latency"} <= kinds
    for plot in plots:
        assert len(plot["x"]) >= 2 and len(plot["y"]) >= 2, plot["id"]
        assert plot["points"] >= 1, plot["id"]
    devices = next(p for p in plots if p["id"].startswith("plot-devices"))
    machine = machine_names([json.loads((demo / "cnn-digits.profile.json").read_text())])[0]
    assert f"{machine} (measured)" in devices["y"] and "h100-sxm (est.)" in devices["y"]
    assert "h200-sxm (est.)" in devices["y"]
    assert "(ms, log scale)" in devices["text"] and "measured" in devices["text"] and "estimated" in devices["text"]
    text = browser.evaluate("document.body.innerText")
    for variant in ("fp32", "w8a8", "w4a4", "slimmed", "SNN unrolled", "Core ML"):
        assert variant.lower() in text.lower(), variant
    assert "throughput (items/s)" in text and "batch 8 not measured (the artifact's batch axis is fixed" in text
    shot = Path(os.environ.get("EDGEPORT_REPORT_SCREENSHOT") or tmp_path / "report.png")
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_tables_sort_when_a_heading_is_clicked(demo, browser):
    browser.load(demo / "report.html")
    column = """(() => { const table = document.querySelector("table.sortable");
      const index = Array.from(table.tHead.rows[0].cells).findIndex(c => c.textContent.startsWith("p50 ms"));
      table.tHead.rows[0].cells[index].click();
      return Array.from(table.tBodies[0].rows).map(r => parseFloat(r.cells[index].dataset.value)); })()"""
    ascending = [v for v in browser.evaluate(column) if v is not None]
    descending = [v for v in browser.evaluate(column) if v is not None]
    assert len(ascending) >= 5 and ascending == sorted(ascending) and descending == sorted(descending, reverse=True)
    assert browser.errors() == []


def test_hostile_strings_in_profile_json_show_as_text(demo, browser, tmp_path):
    for path in demo.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    profile = json.loads((demo / "cnn-digits.profile.json").read_text())
    profile["label"], profile["variant"]["model"] = HOSTILE["label"], HOSTILE["model"]
    for op in profile["ops"]["ops"]:
        op["module"] = HOSTILE["module"]
    (tmp_path / "hostile.profile.json").write_text(json.dumps(profile))
    assert main(["report", str(tmp_path)]) == 0
    browser.load(tmp_path / "report.html")
    assert browser.errors() == []
    assert browser.evaluate("window.pwned === undefined && document.scripts.length === 1")
    shown = browser.evaluate("document.body.textContent")
    for hostile in HOSTILE.values():
        assert hostile in shown


def test_another_machines_profile_gets_its_own_rows(demo, browser, tmp_path):
    for path in demo.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    profile = json.loads((demo / "cnn-digits.profile.json").read_text())
    orin = as_measured_on_an_orin(profile)
    (tmp_path / "cnn-digits.orin.profile.json").write_text(json.dumps(orin))
    assert main(["report", str(tmp_path)]) == 0
    browser.load(tmp_path / "report.html")
    assert browser.errors() == []
    here, there = machine_names([profile, orin])
    cnn = next(p for p in browser.evaluate(PLOTS) if "cnn-digits: filled markers are measured" in p["text"])
    assert f"{here} (measured)" in cnn["y"] and f"{there} (measured)" in cnn["y"] and cnn["points"] >= 2
    text = browser.evaluate("document.body.innerText")
    assert "this machine" not in text and "Cortex-A78AE" in text
