"""A bounded stress test on loopback (well under a minute): a real server under load stays answerable,
refuses a huge body without growing, and shares its data dir with a second server without losing work."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.test_server_process import env, free_port, start  # noqa: F401 (env is a fixture)

BODY = {"pair": "local", "prompts": ["When Mary and John went to the store"]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def post_probe(base: str, tag: str, wait: bool = False, **options) -> httpx.Response:
    query = "?wait=true&timeout=30" if wait else ""
    return httpx.post(f"{base}/analyses/probe{query}", json={**BODY, "options": {"tag": tag, **options}}, timeout=60)


def health_latency(base: str) -> float:
    started = time.perf_counter()
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    return time.perf_counter() - started


def test_a_busy_server_answers_health_refuses_a_huge_body_and_shares_its_data_dir(env, tmp_path):  # noqa: F811
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    first = start(env, port)
    second = None
    try:
        assert post_probe(base, "warm", wait=True).status_code == 200  # models loaded
        long = post_probe(base, "long", stages=40, sleep_s=0.2)  # ~8 s on a worker
        assert long.status_code == 202
        with ThreadPoolExecutor(max_workers=50) as pool:
            waiting = [pool.submit(post_probe, base, f"w{i}", True, stages=2) for i in range(50)]
            time.sleep(1.0)  # all 50 are in flight, waiting inline
            latencies = [health_latency(base) for _ in range(5)]
            assert max(latencies) < 1.0, latencies

            before = rss_mb(first.pid)
            try:
                huge = httpx.post(f"{base}/analyses/dla", content=b"x" * (50 * 2**20),
                                  headers={"content-type": "application/json"}, timeout=30)
                assert huge.status_code == 413
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
                pass  # refused from its Content-Length and closed while the client was still sending
            assert rss_mb(first.pid) - before < 100

            second_port = free_port()  # a second server on the same data dir while the first works
            second = start(env, second_port)
            second_base = f"http://127.0.0.1:{second_port}/api/v1"
            assert httpx.get(f"{second_base}/jobs/{long.json()['id']}", timeout=5).json()["status"] in (
                "queued", "running")
            done = [f.result() for f in waiting]
        assert all(r.status_code in (200, 202) for r in done), [r.text for r in done if r.status_code >= 300]
        deadline = time.time() + 40
        while (job := httpx.get(f"{base}/jobs/{long.json()['id']}", timeout=5).json())["status"] != "done":
            assert job["status"] in ("queued", "running") and time.time() < deadline, job
            time.sleep(0.3)
        history = httpx.get(f"{second_base}/results", params={"limit": 500}, timeout=10).json()
        assert not [r for r in history["items"] if r["status"] == "failed"], history["items"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        if second is not None:
            second.terminate()
            second.wait(timeout=15)
