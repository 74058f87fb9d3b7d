"""Take README's screenshots: the DLA view and the circuit diff of the shipped tiny trio.

    .venv/bin/python docs/screenshot.py [--out docs/screenshot-dla.png] [--n-prompts 16]

Starts `lnscope serve --pair tiny` on a free port with a throw-away data dir, runs DLA on the
built-in IOI task (held-out templates and name pairs) and a circuit diff (original vs LN-free) on one
IOI prompt through the API, opens their result views in Debian's chromium (Playwright, as the
browser tests do) and saves full-page screenshots.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright import sync_api as playwright_api

ROOT = Path(__file__).resolve().parents[1]
CIRCUIT_PROMPT = "When Mary and John went to the store, John gave a drink to"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(base: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lnscope serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"lnscope serve did not answer {base}/api/v1/health in {seconds:.0f} s")


def run_analysis(base: str, kind: str, body: dict) -> str:
    """The id of the stored result of `kind` for `body` (run inline through the API)."""
    r = httpx.post(f"{base}/api/v1/analyses/{kind}", params={"wait": "true", "timeout": 600}, json=body, timeout=630)
    r.raise_for_status()
    return r.json()["id"]


def screenshot(page, url: str, ready: str, out: Path) -> None:
    """A full-page screenshot of `url` once `ready` (a selector) is drawn."""
    page.goto(url)
    page.wait_for_selector(".view[data-ready=true]", timeout=120_000)
    page.wait_for_selector(ready, timeout=120_000)
    page.wait_for_timeout(500)  # Plotly transitions
    page.evaluate("() => window.scrollTo({top: 0, behavior: 'instant'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot-dla.png")
    parser.add_argument("--circuit-out", type=Path, default=ROOT / "docs" / "screenshot-circuit-diff.png")
    parser.add_argument("--pair", default="tiny")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--chromium", default=os.environ.get("LNSCOPE_CHROMIUM") or shutil.which("chromium")
                        or "/usr/bin/chromium")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "LNSCOPE_DATA_DIR": data, "LNSCOPE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "lnscope.analysis.cli", "serve", "--port", str(port),
                                 "--pair", args.pair], cwd=ROOT, env=env)
        try:
            wait_for_health(base, proc)
            dla_id = run_analysis(base, "dla", {"pair": args.pair, "task": {
                "name": "ioi", "n_prompts": args.n_prompts, "seed": 0, "split": "heldout"}})
            diff_id = run_analysis(base, "circuit-diff", {"pair": args.pair, "prompts": [CIRCUIT_PROMPT]})
            with playwright_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1440, "height": 960}).new_page()
                screenshot(page, f"{base}/#/dla/{dla_id}", "#dla-heads-ln_free .main-svg", args.out)
                screenshot(page, f"{base}/#/circuit-diff/{diff_id}", "#circuit-graph .main-svg", args.circuit_out)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
