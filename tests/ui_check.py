"""What a person sees in the MLflow UI after self-training rounds, checked in headless Chromium.

Starts ``mlflow ui`` over a copy of a tracking store, drives Chromium through the DevTools
protocol, checks that the experiment's runs page lists the round runs with their ``test/dsc``,
opens the compare view of those runs and saves a screenshot of it. The test of the pipeline calls
``check_rounds_in_ui``; the picture in the README is made with

    python -m tests.ui_check --tracking-uri sqlite:///$PWD/mlruns/mlflow.db \
        --experiment self-training-demo --out docs/mlflow-compare-rounds.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from websockets.sync.client import connect

from tests.helpers import store_client
from tests.servers import free_port, stop_group

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
VIEWPORT = (1400, 900)
TRAINING = "workflowType=machine_learning"  # the UI's "Model training" side bar, not the GenAI one


def find_chromium() -> str | None:
    """The first Chromium-family browser on the PATH, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _wait(ready: Callable[[], object], timeout_s: float, what: str, alive: Callable[[], bool] = lambda: True):
    """Poll ``ready`` until it returns something truthy; fail after ``timeout_s`` or when ``alive`` says no."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = ready()
        if result:
            return result
        if not alive():
            raise RuntimeError(f"{what} exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.3)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read() if resp.status == 200 else None
    except OSError:
        return None


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, workdir: Path) -> Iterator[str]:
    """``mlflow ui`` on 127.0.0.1 and a free port; yields its base URL. A SQLite store is copied into
    ``workdir`` first, so the server cannot migrate or otherwise write the original (artifact paths
    in the store are absolute, so the copy still finds them)."""
    if tracking_uri.startswith("sqlite:///"):
        copy = workdir / "mlflow.db"
        shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), copy)
        tracking_uri = f"sqlite:///{copy}"
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--default-artifact-root",
           str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    with open(workdir / "mlflow-ui.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(f"{base}/health"), 120, f"mlflow ui (log: {workdir / 'mlflow-ui.log'})",
              lambda: proc.poll() is None)
        yield base
    finally:
        stop_group(proc)


class DevTools:
    """A minimal client of the Chrome DevTools protocol over one page's WebSocket: commands are
    answered in order, events in between are dropped."""

    def __init__(self, ws_url: str):
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._ids = itertools.count(1)

    def call(self, method: str, timeout_s: float = 60, **params) -> dict:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self._ws.close()


@contextlib.contextmanager
def chromium(binary: str, workdir: Path, viewport: tuple[int, int] = VIEWPORT) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile in ``workdir``; yields a DevTools client of its page."""
    profile = workdir / "chromium-profile"
    cmd = [binary, "--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
           f"--user-data-dir={profile}", f"--window-size={viewport[0]},{viewport[1]}", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
           "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no network
           "--no-sandbox", "about:blank"]  # no sandbox: tests may run as root or in a container
    with open(workdir / "chromium.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = None
    try:
        port_file = profile / "DevToolsActivePort"  # the port Chromium picked, on its first line
        port = _wait(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 60,
                     f"chromium (log: {workdir / 'chromium.log'})", lambda: proc.poll() is None)
        targets = _wait(lambda: [t for t in json.loads(_get(f"http://127.0.0.1:{port}/json/list") or b"[]")
                                 if t.get("type") == "page"], 30, "chromium's page")
        client = DevTools(targets[0]["webSocketDebuggerUrl"])
        client.call("Page.enable")
        client.call("Emulation.setDeviceMetricsOverride", width=viewport[0], height=viewport[1],
                    deviceScaleFactor=1, mobile=False)
        yield client
    finally:
        if client is not None:
            client.close()
        stop_group(proc)


def open_page(page: DevTools, url: str, expect: list[str], timeout_s: float = 90) -> str:
    """Navigate to ``url`` and wait until the page's visible text contains every string of ``expect``
    (the UI renders after its API calls return); returns that text."""
    page.call("Page.navigate", url=url)
    last = {"text": ""}

    def shown() -> str | None:
        last["text"] = page.evaluate("document.body ? document.body.innerText : ''") or ""
        return last["text"] if all(s in last["text"] for s in expect) else None

    try:
        return _wait(shown, timeout_s, url)
    except TimeoutError:
        missing = [s for s in expect if s not in last["text"]]
        raise AssertionError(f"{url} does not show {missing}; it shows:\n{last['text'][:3000]}") from None


def click(page: DevTools, selector: str, text: str | None = None, timeout_s: float = 30) -> None:
    """Click the centre of the first element that matches the CSS ``selector`` (and whose visible text
    is ``text``, when given) with the mouse, as a person would: scrolled into view first, waiting for
    the element to appear."""
    find = (f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => {json.dumps(text)} === null || e.innerText.trim() === {json.dumps(text)})")
    box = _wait(lambda: page.evaluate(
        f"(() => {{ const e = {find}; if (!e) return null; e.scrollIntoView({{block: 'nearest'}}); "
        "const r = e.getBoundingClientRect(); return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"),
        timeout_s, f"{selector} {text or ''}")
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def press(page: DevTools, key: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


def screenshot(page: DevTools, out: Path) -> Path:
    """The viewport as PNG."""
    data = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(data))
    return out


@dataclass
class RoundRun:
    run_id: str
    name: str
    round: int
    arm: str
    value: float  # of the metric checked


def round_runs(tracking_uri: str, experiment: str, metric: str = "test/dsc") -> tuple[str, list[RoundRun]]:
    """The experiment's id and its finished round runs (self-training, control, oracle) that logged
    ``metric``, by round and arm."""
    client = store_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], "tags.`viola.kind` = 'round' and attributes.status = 'FINISHED'",
                              max_results=1000)
    rounds = [RoundRun(r.info.run_id, r.info.run_name, int(r.data.tags["viola.round"]), r.data.tags["viola.arm"],
                       r.data.metrics[metric]) for r in runs if metric in r.data.metrics]
    arms = {"self-training": 0, "control": 1, "oracle": 2}
    return exp.experiment_id, sorted(rounds, key=lambda r: (r.round, arms.get(r.arm, 3), r.name))


# The runs table (ag-grid): each row carries its run id; the metric's column may sit right of the
# viewport, where the grid does not render it, so the grid is scrolled to its right end first.
_RUNS_TABLE_VALUES = """(() => {
  for (const e of document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport'))
    e.scrollLeft = e.scrollWidth;
  const column = '`' + %s + '`', out = {};
  for (const c of document.querySelectorAll('.ag-row [col-id]'))
    if (c.getAttribute('col-id').startsWith('metrics.') && c.getAttribute('col-id').includes(column))
      out[c.closest('.ag-row').getAttribute('row-id')] = c.innerText.trim();
  return out;
})()"""

# The compare view's metrics table: a virtualized grid of names beside a grid of values, one column
# per run; scroll until the metric's row is rendered, then read its values left to right.
_COMPARE_TABLE_ROW = """(async () => {
  const key = %s;
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const names = grids.find(g => g.querySelector('a[title="Plot chart"]'));
  const values = names && grids[grids.indexOf(names) + 1];
  if (!values) return null;
  const cells = (grid) => [...grid.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')];
  for (let top = 0; top <= values.scrollHeight; top += values.clientHeight / 2) {
    values.scrollTop = top;
    await new Promise(r => setTimeout(r, 200));
    const row = cells(names).find(c => c.innerText.trim() === key);
    if (row) return cells(values).filter(c => c.style.top === row.style.top)
      .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left)).map(c => c.innerText.trim());
  }
  return null;
})()"""

# The run-details table of the compare view: its "Run Name:" row, one cell per run.
_COMPARE_RUN_NAMES = """[...document.querySelectorAll('tr')].map(r => [...r.children].map(c => c.innerText.trim()))
  .find(r => r[0] === 'Run Name:')?.slice(1) ?? null"""

# Where the metric's row is, relative to the values grid's visible top, and where to put the mouse
# to scroll that grid.
_ROW_OFFSET = """(() => {
  const key = %s;
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const names = grids.find(g => g.querySelector('a[title="Plot chart"]'));
  const values = grids[grids.indexOf(names) + 1];
  const row = [...names.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
    .find(c => c.innerText.trim() === key);
  if (key !== null && !row) return null;
  const r = values.getBoundingClientRect();
  return [row ? parseFloat(row.style.top) - values.scrollTop : 0, r.x + r.width / 2, r.y + r.height / 2];
})()"""
# The compare view moves its metric names to the values' scroll position of the previous scroll
# event: a browser's smooth scrolling sends many small events and the lag stays small, a headless
# wheel sends one. So the names are moved to where the next event would put them.
_ALIGN_NAMES = """(() => {
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const names = grids.find(g => g.querySelector('a[title="Plot chart"]'));
  const values = grids[grids.indexOf(names) + 1];
  names.scrollTop = values.scrollTop;
  return names.scrollTop === values.scrollTop;
})()"""


def _matches(shown: str, value: float) -> bool:
    """Whether the text ``shown`` is ``value`` as the UI rounds it (to the decimals it shows)."""
    try:
        number = float(shown)
    except ValueError:
        return False
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(number - value) <= 0.5 * 10 ** -decimals + 1e-12


def check_rounds_in_ui(tracking_uri: str, experiment: str, out: Path, rounds: tuple[int, ...] = (0, 1),
                       browser: str | None = None, metric: str = "test/dsc") -> list[RoundRun]:
    """Check what a person sees in the MLflow UI: the experiment's runs page lists the round runs of
    ``rounds`` (self-training and, where logged, control and oracle) and, once the ``metric`` column
    is chosen, each run's value; the compare view of those runs shows them side by side with the same
    values. Saves a screenshot of the compare view (run details, and the metrics table from
    ``metric`` on) to ``out``. Returns the runs compared."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium browser on the PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    exp_id, runs = round_runs(tracking_uri, experiment, metric)
    runs = [r for r in runs if r.round in rounds]
    missing = set(rounds) - {r.round for r in runs if r.arm == "self-training"}
    assert not missing, f"{experiment} has no finished self-training run with {metric} for round(s) {sorted(missing)}"
    names = [r.name for r in runs]
    with tempfile.TemporaryDirectory(prefix="viola-ui-") as tmp, mlflow_ui(tracking_uri, Path(tmp)) as base, \
            chromium(browser, Path(tmp)) as page:
        # the runs page, as a person finds the rounds: the metric column picked in "Columns"
        open_page(page, f"{base}/#/experiments/{exp_id}/runs?{TRAINING}", [experiment, *names])
        _close_assistant(page)
        click(page, '[data-testid="column-selection-dropdown"]', "Columns")
        click(page, f'[data-testid="column-selector-tree"] [title="{metric}"]')
        press(page, "Escape", 27)
        listed = _wait(lambda: (v := page.evaluate(_RUNS_TABLE_VALUES % json.dumps(metric)))
                       and all(r.run_id in v for r in runs) and v, 30, f"the {metric} column of the runs table")
        for r in runs:
            assert _matches(listed[r.run_id], r.value), \
                f"runs table: {r.name} shows {metric} {listed[r.run_id]!r}, the store has {r.value}"

        # the compare view of the round runs
        ids, exps = (urllib.parse.quote(json.dumps(x)) for x in ([r.run_id for r in runs], [exp_id]))
        open_page(page, f"{base}/#/compare-runs?runs={ids}&experiments={exps}&{TRAINING}",
                  [f"Comparing {len(runs)} Runs", *names, "Metrics"])
        columns = _wait(lambda: page.evaluate(_COMPARE_RUN_NAMES), 30, "the run names of the compare view")
        assert columns == names, f"compare view: runs {columns}, expected {names}"
        row = _wait(lambda: page.evaluate(_COMPARE_TABLE_ROW % json.dumps(metric)), 30,
                    f"the {metric} row of the compare view")
        assert len(row) == len(runs) and all(_matches(v, r.value) for v, r in zip(row, runs)), \
            f"compare view: {metric} {row}, the store has {[r.value for r in runs]}"

        _show_metric_rows(page, metric)
        screenshot(page, out)
    return runs


def _close_assistant(page: DevTools) -> None:
    """Close the assistant's side panel (open on a fresh profile), so the page has its full width."""
    with contextlib.suppress(TimeoutError):
        click(page, '[data-component-id="mlflow.assistant.chat_panel.close"]', timeout_s=5)


def _show_metric_rows(page: DevTools, metric: str) -> None:
    """Fold the plots and the parameters away and scroll the metrics table with the mouse wheel until
    ``metric``'s row is its first, so the run names and their metrics fit one screen."""
    for section in ("Visualizations", "Parameters"):
        click(page, '[role="button"]', section)
        time.sleep(1)  # the section folds up (animated) and the next header moves
    page.evaluate("document.querySelector('main')?.scrollTo(0, 0); window.scrollTo(0, 0)")
    for _ in range(100):  # the grid renders only the rows near its viewport: wheel down until it is there
        found = page.evaluate(_ROW_OFFSET % json.dumps(metric))
        offset, x, y = found or page.evaluate(_ROW_OFFSET % "null")
        page.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=offset if found else 100)
        time.sleep(0.2)
        if found:
            break
    _wait(lambda: page.evaluate(_ALIGN_NAMES), 10, "the metric names scrolled with their values")
    time.sleep(0.5)  # the grid renders the rows scrolled to


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True, help="the store, e.g. sqlite:///$PWD/mlruns/mlflow.db")
    p.add_argument("--experiment", default="self-training-demo")
    p.add_argument("--rounds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("docs/mlflow-compare-rounds.png"))
    args = p.parse_args(argv)
    runs = check_rounds_in_ui(args.tracking_uri, args.experiment, args.out, tuple(args.rounds))
    for r in runs:
        print(f"{r.name:24s} test/dsc {r.value:.4f}  {r.run_id}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
