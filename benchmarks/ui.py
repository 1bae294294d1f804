"""Time from pressing Search on the web page to the 20th thumbnail's load event, in headless chromium (issue 9).

Target: <= 1 s on the local stack, warm. Measured inside the page with performance.now(): the click, the
API's answer arriving (the search fetch's resource timing), and each thumbnail's load event. Starts
`clipsearch ui` against the running local stack, warms up, then runs one search per text query (each
search's thumbnail URLs are freshly presigned, so the browser's cache does not serve them).

    .venv/bin/clipsearch local up --model-dir .cache/models/random-vit-b-32-seed0-int8
    .venv/bin/clipsearch ingest ../shared/datasets/seed-eval/train --dataset demo
    .venv/bin/python benchmarks/ui.py --dataset demo [--runs 15] [--home .clipsearch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import TEXT_QUERIES, cpu_description

CHROMIUM = "/usr/bin/chromium"
THUMBNAILS = 20  # the page's page size
TIMEOUT_MS = 30_000

# Runs in the page: resolves with the milliseconds from the click to the API's answer and to the Nth
# thumbnail's load event (load does not bubble: a capturing listener on the document sees every image).
_TIMED_SEARCH = """async ([count, timeoutMs]) => {
  const results = document.getElementById('results');
  return await new Promise((resolve, reject) => {
    let loaded = 0;
    let started = 0;
    const finish = (outcome) => {
      document.removeEventListener('load', onLoad, true);
      document.removeEventListener('error', onError, true);
      clearTimeout(timer);
      outcome();
    };
    const onLoad = (event) => {
      if (event.target.tagName !== 'IMG' || !results.contains(event.target)) return;
      loaded += 1;
      if (loaded < count) return;
      const done = performance.now();
      const search = performance.getEntriesByType('resource')
        .filter((entry) => entry.name.includes('/search/text') && entry.startTime >= started);
      const answered = search.length ? search[search.length - 1].responseEnd : NaN;
      finish(() => resolve({ total: done - started, api: answered - started }));
    };
    const onError = (event) => {
      if (event.target.tagName === 'IMG' && results.contains(event.target)) {
        finish(() => reject(new Error('a thumbnail failed to load: ' + event.target.src)));
      }
    };
    const timer = setTimeout(() => finish(() => reject(new Error(`only ${loaded} thumbnails after ${timeoutMs} ms: `
      + document.getElementById('error').textContent))), timeoutMs);
    document.addEventListener('load', onLoad, true);
    document.addEventListener('error', onError, true);
    performance.clearResourceTimings();  // the buffer keeps 250 entries: a search adds 21
    started = performance.now();
    document.getElementById('search-button').click();
  });
}"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/ui.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a dataset of at least 20 indexed images")
    parser.add_argument("--home", help="the local stack's home (default $CLIPSEARCH_HOME or ./.clipsearch)")
    parser.add_argument("--runs", type=int, default=15, help="timed searches (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="searches before timing (default 3)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(f"CPU: {cpu_description()}", flush=True)
    print(f"load average before: {_load_average()}", flush=True)
    command = [str(Path(sys.executable).with_name("clipsearch")), "ui", "--port", "0", "--json"]
    if args.home:
        command += ["--home", args.home]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = server.stdout.readline()
        if not line:
            print("clipsearch ui did not start (is the local stack up?)", file=sys.stderr)
            return 1
        url = json.loads(line)["url"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            # The CSP forbids the evaluation Playwright's waiting uses; it changes nothing in what is timed.
            page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            page.goto(url)
            page.wait_for_selector(f"#dataset option[value={json.dumps(args.dataset)}]", state="attached")
            page.select_option("#dataset", args.dataset)
            timings = []
            for run in range(args.warmup + args.runs):
                if run == args.warmup:
                    cpu_before = _children_cpu_seconds()
                page.fill("#query", TEXT_QUERIES[run % len(TEXT_QUERIES)])
                timing = page.evaluate(_TIMED_SEARCH, [THUMBNAILS, TIMEOUT_MS])
                if run >= args.warmup:
                    timings.append(timing)
            cpu_seconds = _children_cpu_seconds() - cpu_before
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    totals = [timing["total"] for timing in timings]
    api = [timing["api"] for timing in timings]
    if any(value is None or value != value for value in api):  # NaN: no resource timing of the search call
        print("the search call's resource timing is missing in some runs", file=sys.stderr)
        return 1
    print(f"load average after: {_load_average()}")
    print(f"{len(timings)} warm searches, {THUMBNAILS} thumbnails each (after {args.warmup} warm-up searches)")
    print(f"click -> 20th thumbnail loaded: median {statistics.median(totals):.0f} ms, "
          f"min {min(totals):.0f}, max {max(totals):.0f}  (target <= 1000 ms)")
    print(f"click -> API answer arrived:    median {statistics.median(api):.0f} ms, "
          f"min {min(api):.0f}, max {max(api):.0f}")
    print(f"answer -> 20th thumbnail:       median {statistics.median(t - a for t, a in zip(totals, api)):.0f} ms")
    print(f"CPU time of chromium and clipsearch ui over the timed searches: {cpu_seconds * 1000 / len(timings):.0f} ms "
          f"per search (the stack's own CPU time not included)")
    return 0


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _children_cpu_seconds() -> float:
    """CPU time so far of this process's descendants (the browser's processes and the ui server)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.getpid()
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    for pid, (_, cpu) in parents.items():
        ancestor = parents.get(pid, (0, 0))[0]
        while ancestor and ancestor != own:
            ancestor = parents.get(ancestor, (0, 0))[0]
        if ancestor == own:
            total += cpu
    return total


if __name__ == "__main__":
    sys.exit(main())
