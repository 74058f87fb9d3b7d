"""lnscope as users install it: one import name, a wheel that carries its UI and API docs.

- pyproject's package list covers every package folder (nothing left out of the wheel);
- from a folder holding its own `analysis.py` and `server.py` (each raising on import), the CLI,
  an analysis and the server still work (nothing is installed under a generic name);
- a wheel built from this checkout, installed non-editable into a fresh virtualenv, serves `/`, a
  result view and `/docs` to Chromium with every request outside loopback blocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.test_server_process import free_port

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"lnscope.analysis": ROOT / "analysis", "lnscope.server": ROOT / "server",
           "lnscope.frontend": ROOT / "frontend"}
TORCH_SPEC = os.environ.get("LNSCOPE_TORCH_SPEC", "torch==2.13.0")


def test_every_package_folder_is_in_the_wheel_s_package_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in FOLDERS.items():
        assert config["package-dir"][name] == folder.name
        found |= {".".join([name, *init.parent.relative_to(folder).parts]) for init in folder.rglob("__init__.py")}
    assert found == set(config["packages"])
    assert not any(name.split(".")[0] != "lnscope" for name in config["packages"])


@pytest.fixture
def shadowing_dir(tmp_path):
    """A notebook folder whose own analysis.py and server.py would shadow generic package names."""
    for name in ("analysis", "server", "frontend"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    return tmp_path


def _lnscope(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m lnscope.analysis.cli ARGS` from `cwd` (first on sys.path, as in a notebook)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "lnscope.analysis.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_and_an_analysis_work_beside_a_user_s_analysis_py(shadowing_dir):
    out = _lnscope("pairs", cwd=shadowing_dir)
    assert out.returncode == 0, out.stderr
    assert "tiny" in out.stdout
    out = _lnscope("analyze", "dla", "tiny", "--task", "ioi", "--n-prompts", "2", "--options",
                   '{"n_bootstrap": 10}', cwd=shadowing_dir)
    assert out.returncode == 0, out.stderr
    assert "ln_free" in out.stdout and "NMAE" in out.stdout


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise AssertionError("server did not start")
        time.sleep(0.3)


def _serve(command: list[str], cwd: Path, env: dict[str, str]):
    port = free_port()
    proc = subprocess.Popen([*command, "serve", "--port", str(port), "--no-preload"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc)
    except AssertionError:
        proc.kill()
        raise
    return base, proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_server_starts_beside_a_user_s_server_py(shadowing_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LNSCOPE_DATA_DIR=str(shadowing_dir / "data"), LNSCOPE_DEVICE="cpu")
    base, proc = _serve([sys.executable, "-m", "lnscope.analysis.cli"], shadowing_dir, env)
    try:
        assert httpx.get(f"{base}/").status_code == 200
        assert httpx.get(f"{base}/api/v1/models").json()["default_pair"] == "tiny"
    finally:
        _stop(proc)


# -- the wheel, installed ---------------------------------------------------------------------
def _run(command: list[str], **kwargs) -> None:
    out = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(command)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A fresh virtualenv holding torch (the file on disk) and lnscope's wheel, installed non-editable."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = ["-m", "pip", "--disable-pip-version-check", "-q"]
    _run([sys.executable, *pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)], timeout=600)
    wheel = next((tmp / "dist").glob("lnscope-*.whl"))
    _run([sys.executable, "-m", "venv", str(tmp / "venv")], timeout=120)
    python = tmp / "venv" / "bin" / "python"
    _run([str(python), *pip, "install", TORCH_SPEC], timeout=900)
    _run([str(python), *pip, "install", str(wheel)], timeout=900)
    return tmp / "venv" / "bin"


@pytest.mark.slow
def test_the_wheel_holds_one_import_name_and_its_assets(installed_wheel):
    python = installed_wheel / "python"
    code = ("import importlib.util, json, lnscope.server.app, lnscope.analysis.pipeline\n"
            "from lnscope.server.frontend import docs_assets_dir, frontend_dir\n"
            "print(json.dumps([str(frontend_dir()), str(docs_assets_dir()),"
            " [importlib.util.find_spec(n) is None for n in ('analysis', 'server', 'frontend')]]))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=installed_wheel.parent)
    assert out.returncode == 0, out.stderr
    front, assets, missing = __import__("json").loads(out.stdout)
    assert "site-packages" in front and Path(front, "index.html").is_file()
    assert Path(front, "js", "views", "dla.js").is_file() and Path(front, "css", "app.css").is_file()
    assert Path(assets, "swagger-ui-bundle.js").is_file() and Path(assets, "redoc.standalone.js").is_file()
    assert missing == [True, True, True], "the wheel installs a generic top-level name"


@pytest.mark.slow
def test_the_installed_wheel_serves_the_ui_a_result_and_the_docs_offline(installed_wheel, shadowing_dir):
    from playwright import sync_api as playwright_api

    from tests.test_frontend import CHROMIUM, CHROMIUM_ARGS

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LNSCOPE_DATA_DIR=str(shadowing_dir / "data"), LNSCOPE_DEVICE="cpu", HF_HUB_OFFLINE="1",
               LNSCOPE_MODELS_DIR=str(ROOT / "models"))
    base, proc = _serve([str(installed_wheel / "lnscope")], shadowing_dir, env)
    try:
        r = httpx.post(f"{base}/api/v1/analyses/dla?wait=true&timeout=300", timeout=320, json={
            "pair": "tiny", "task": {"name": "ioi", "n_prompts": 4}, "options": {"n_bootstrap": 20}})
        assert r.status_code == 200, r.text
        result_id = r.json()["id"]
        foreign: list[str] = []
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1440, "height": 900})

            def guard(route):
                if route.request.url.startswith(base + "/"):
                    route.continue_()
                else:
                    foreign.append(route.request.url)
                    route.abort()

            context.route("**/*", guard)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{base}/")
            page.wait_for_selector("text=DLA")
            page.goto(f"{base}/#/dla/{result_id}")
            page.wait_for_selector(".js-plotly-plot")
            page.goto(f"{base}/docs")
            page.wait_for_selector(".swagger-ui .opblock")
            assert page.locator(".swagger-ui .opblock").count() >= 10
            page.goto(f"{base}/redoc")
            page.wait_for_function("() => document.body.innerText.includes('/api/v1/analyses/{kind}')")
            browser.close()
        assert foreign == []
    finally:
        _stop(proc)


def test_the_docker_image_installs_the_wheel_not_the_source_tree():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    runtime = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    assert any(line.startswith("RUN pip wheel") and "--no-deps" in line for line in lines)
    assert any("pip install" in line and "/dist/lnscope-*.whl" in line for line in runtime)
    assert not any(line.startswith("COPY") and any(f" {d}" in line for d in ("analysis", "server", "frontend"))
                   for line in runtime), "the runtime stage must run the installed wheel, not a copy of the source"
    assert not any("pip install" in line and (" -e " in line or line.endswith(" .")) for line in runtime)


def test_no_committed_file_names_a_build_machine_s_absolute_path():
    import json
    import struct

    # split literals, so that this file does not name them itself
    needles = {str(ROOT), "/".join(("", "work", "main")), "/".join(("", "home", "")), "/".join(("", "root", ""))}
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):  # the JSON header's metadata; the tensors are no text
            with path.open("rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            text = json.dumps(header.get("__metadata__") or {})
        else:
            data = path.read_bytes()
            if b"\0" in data:  # another binary file
                continue
            text = data.decode("utf-8", "replace")
        if any(needle in text for needle in needles):
            found += [f"{name}:{i}: {line.strip()[:160]}" for i, line in enumerate(text.splitlines(), 1)
                      if any(needle in line for needle in needles)]
    assert not found, "committed files name a build machine's absolute path:\n" + "\n".join(found)


def _imported_modules(folders: list[Path]) -> dict[str, str]:
    """Top-level names imported by the files under `folders` (not inside `try ... except ImportError`),
    each with one file that imports it."""
    import ast

    found: dict[str, str] = {}
    for folder in folders:
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text())
            optional = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try)
                        if any("ImportError" in ast.dump(h) or "ModuleNotFoundError" in ast.dump(h) for h in t.handlers)
                        for node in ast.walk(t)}
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.mark.parametrize("folders, extras", [(["analysis", "server"], ["cluster"]),
                                             (["tests", "bench"], ["test", "cluster"])], ids=["library", "tests"])
def test_every_imported_package_is_declared(folders, extras):
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"] + [r for e in extras
                                                            for r in project["optional-dependencies"][e]])
    local = {"lnscope", "tests", "bench", "circuit_tracer"}  # circuit_tracer runs in its own venv (.venv-ct)
    distributions = packages_distributions()
    missing = []
    for module, where in sorted(_imported_modules([ROOT / f for f in folders]).items()):
        if module in sys.stdlib_module_names or module in local:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} ({where}; distribution {sorted(names)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)


def test_compose_has_one_default_service_and_a_private_cluster_profile():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    default = [name for name, s in services.items() if not s.get("profiles")]
    cluster = {name for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert default == ["lnscope"] and cluster == {"postgres", "ray-head", "ray-gpu-worker", "api"}
    for name, service in services.items():  # only the API is published, on the host's loopback
        for port in service.get("ports", []):
            assert name in ("lnscope", "api") and port.startswith("127.0.0.1:"), (name, port)
    env = services["api"]["environment"]
    assert env["LNSCOPE_EXECUTOR"] == "ray" and env["LNSCOPE_RAY_ADDRESS"].startswith("ray://ray-head:")
    assert env["LNSCOPE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["api"]["build"]["args"]["EXTRAS"] == "[cluster]"
