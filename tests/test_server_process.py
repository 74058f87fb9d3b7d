"""A real uvicorn process: a job finishes, the process is SIGKILLed mid-job, and after a
restart the finished result is intact and the interrupted job is reported."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "tests.probe_app:app_factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture
def env(trio_dirs, tmp_path):
    config = tmp_path / "lnscope.toml"
    config.write_text(
        'default_pair = "local"\n[pairs.local]\n'
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
    )
    return {**os.environ, "LNSCOPE_CONFIG": str(config), "LNSCOPE_DATA_DIR": str(tmp_path / "data"),
            "LNSCOPE_DEVICE": "cpu", "LNSCOPE_PRELOAD": "false", "PYTHONPATH": str(ROOT)}


def test_sigkill_mid_job_keeps_finished_results_and_reports_the_interrupted_job(env):
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    body = {"pair": "local", "prompts": ["When Mary and John went to the store"]}
    proc = start(env, port)
    try:
        done = httpx.post(f"{base}/analyses/probe?wait=true&timeout=60", json={**body, "options": {"tag": "first"}},
                          timeout=90)
        assert done.status_code == 200, done.text
        finished = done.json()
        long = httpx.post(f"{base}/analyses/probe",
                          json={**body, "options": {"tag": "long", "stages": 100, "sleep_s": 0.5}}, timeout=30)
        assert long.status_code == 202
        job_id = long.json()["id"]
        deadline = time.time() + 60
        while "probe stage" not in httpx.get(f"{base}/jobs/{job_id}", timeout=5).json()["stage"]:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    proc = start(env, port)
    try:
        kept = httpx.get(f"{base}/results/{finished['id']}", timeout=10).json()
        assert kept["status"] == "done" and kept["result"] == finished["result"]
        interrupted = httpx.get(f"{base}/jobs/{job_id}", timeout=10).json()
        assert interrupted["status"] == "failed" and interrupted["error_kind"] == "interrupted"
        assert "stopped before this job finished" in interrupted["error"]
        history = httpx.get(f"{base}/results", params={"pair": "local"}, timeout=10).json()
        assert history["total"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
