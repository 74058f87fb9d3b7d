"""The web frontend in a real browser (Playwright driving Debian's chromium) against a live server.

Runs the random test trio: home page and tokenization preview, a validation error shown next to
its field, DLA heatmaps for every role, the LN-treatment toggle, a permalink reload, the other
result views, history, a job's progress bar, and the circuit view (with a circuit-tracer graph
file when the server has no circuit kind yet). No request may leave the server's origin.

Screenshots of every view go to a pytest temp dir (printed at the end); README's screenshot of
the shipped tiny trio is taken by docs/screenshot.py.
Needs: `pip install playwright` (no `playwright install`) and `apt-get install chromium`
(or LNSCOPE_CHROMIUM=/path/to/chromium).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright import sync_api as playwright_api  # installed by `make test` (the test extra)

from tests.test_server_process import free_port
from tests.transcoder_fixtures import build_transcoders, transcoders_toml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = (os.environ.get("LNSCOPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
            or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IOI = "When Mary and John went to the store, John gave a drink to"
ROLES = ["original", "ln_free", "control"]
CUSTOM_TASK = {"name": "custom", "pairs": [
    {"clean": IOI, "corrupt": "When Mary and John went to the store, Mary gave a drink to",
     "correct": " Mary", "wrong": " John"},
    {"clean": "When John and Mary went to the store, Mary gave a drink to",
     "corrupt": "When John and Mary went to the store, John gave a drink to", "correct": " John", "wrong": " Mary"},
]}

SERVER_DATA: dict[str, Path] = {}  # the running server's data dir, for tests that store results directly

assert Path(CHROMIUM).exists(), (
    f"no chromium at {CHROMIUM}: `make test` installs Debian's chromium (or set LNSCOPE_CHROMIUM)"
)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(trio_dirs, tmp_path_factory):
    """A uvicorn process serving the API and the frontend, with the random trio as pair `local`."""
    tmp = tmp_path_factory.mktemp("frontend-server")
    config = tmp / "lnscope.toml"
    transcoders = build_transcoders(trio_dirs, tmp / "transcoders")
    config.write_text(
        'default_pair = "local"\n[pairs.local]\n'
        + "".join(f'{role} = {{ path = "{trio_dirs[role]}" }}\n' for role in ROLES)
        + transcoders_toml(transcoders))
    env = {**os.environ, "LNSCOPE_CONFIG": str(config), "LNSCOPE_DATA_DIR": str(tmp / "data"), "LNSCOPE_DEVICE": "cpu",
           "LNSCOPE_PRELOAD": "true", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    SERVER_DATA["dir"] = tmp / "data"
    port = free_port()
    # tests.probe_app adds the test-only `probe` kind (stages, sleeps): the progress bar test uses it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "tests.probe_app:app_factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("server did not start")
        time.sleep(0.2)
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = tmp_path_factory.mktemp("frontend-screenshots")
    yield path
    print(f"\nfrontend screenshots: {path}")


@pytest.fixture(scope="module")
def foreign():
    """Requests to any host but the server (must stay empty)."""
    return []


@pytest.fixture(scope="module")
def page(server, foreign):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 960})
        errors: list[str] = []

        def guard(route):
            url = route.request.url
            if url.startswith(server + "/") or url == server:
                route.continue_()
            else:
                foreign.append(url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(30_000)
        page.errors = errors
        yield page
        context.close()
        browser.close()


def api(server, path, body=None, **params):
    if body is None:
        r = httpx.get(f"{server}/api/v1{path}", params=params, timeout=120)
    else:
        r = httpx.post(f"{server}/api/v1{path}", json=body, params=params, timeout=120)
    assert r.status_code in (200, 202), r.text
    return r.json()


def open_view(page, server, route):
    page.goto(f"{server}/#{route}")
    page.wait_for_selector(".view[data-ready=true]")


def plot_z(page, element_id):
    return page.evaluate(f"() => document.getElementById({json.dumps(element_id)}).data[0].z")


def shot(page, shots, name):
    page.wait_for_timeout(300)  # let Plotly transitions and smooth scrolling finish
    page.evaluate("() => window.scrollTo({top: 0, behavior: 'instant'})")  # else the sticky bar lands mid-page
    page.wait_for_timeout(100)
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- the tests (in order: they share one page) -----------------------------------------------
def test_home_shows_pairs_and_previews_tokens(page, server, shots):
    open_view(page, server, "/")
    assert page.locator("#pair-card select option", has_text="local").count() == 1
    assert page.locator("#pair-card .role-row").count() == 3
    assert page.locator("#pair-card").inner_text().count("device") >= 1
    box = page.locator('.field[data-field="prompts"] textarea')
    box.fill(IOI)
    chips = page.locator('.token-preview .tokens[data-prompt="0"] .tok')
    page.wait_for_function("() => document.querySelectorAll('.token-preview .tok').length > 5")
    texts = chips.all_inner_texts()
    assert "·Mary" in texts and "·John" in texts  # token boundaries, spaces shown as ·
    for kind in ("dla", "ln-stats", "loss", "confidence-neurons"):
        assert page.locator(f'button[data-kind="{kind}"]').count() == 1
    shot(page, shots, "home")


def test_validation_error_is_shown_next_to_its_field(page, server, shots):
    token = page.locator('.field[data-field="options.target.token"] input')
    token.fill(" Zebra")
    page.click('button[data-kind="dla"]')
    err = page.locator('[data-error-for="options.target.token"]')
    err.wait_for(state="visible")
    assert "single token" in err.inner_text()
    assert page.locator('.field[data-field="options.target.token"]').get_attribute("class").count("has-error") == 1
    assert not page.locator('[data-error-for="prompts"]').is_visible()
    shot(page, shots, "validation-error")
    # an empty prompt: the message goes to the prompt box
    page.locator('.field[data-field="prompts"] textarea').fill("   ")
    token.fill(" Mary")
    page.click('button[data-kind="dla"]')
    prompt_err = page.locator('[data-error-for="prompts"]')
    prompt_err.wait_for(state="visible")
    assert "prompt 1" in prompt_err.inner_text()
    assert not err.is_visible()


def test_dla_runs_and_every_role_has_a_heatmap(page, server, shots):
    page.locator('.field[data-field="prompts"] textarea').fill(IOI)
    page.locator('.field[data-field="options.target.token"] input').fill(" Mary")
    page.locator('.field[data-field="options.target.other"] input').fill(" John")
    page.click('button[data-kind="dla"]')
    page.wait_for_url("**/#/dla/*")
    page.wait_for_selector(".view[data-ready=true]")
    for role in ROLES:
        page.wait_for_selector(f"#dla-heads-{role} .main-svg")
        z = plot_z(page, f"dla-heads-{role}")
        assert len(z) == 2 and all(len(row) == 4 for row in z), z  # n_layers x n_heads
    for key in ("ln-free-original", "control-original"):
        assert len(plot_z(page, f"dla-diff-{key}")) == 2
    # one colour range for every role
    ranges = page.evaluate("() => ['original','ln_free','control']"
                           ".map(r => document.getElementById('dla-heads-' + r).data[0].zmax)")
    assert len(set(ranges)) == 1
    assert page.locator("#dla-errors .main-svg").count() >= 1
    shot(page, shots, "dla")


def test_ln_treatment_toggle_changes_the_original_not_ln_free(page, server, shots):
    before = {r: plot_z(page, f"dla-heads-{r}") for r in ROLES}
    page.click('#treatment-toggle button[data-value="raw"]')
    page.wait_for_function("(z) => JSON.stringify(document.getElementById('dla-heads-original').data[0].z) !== z",
                           arg=json.dumps(before["original"]))
    after = {r: plot_z(page, f"dla-heads-{r}") for r in ROLES}
    scale = max(abs(v) for row in before["original"] for v in row)
    assert max(abs(a - b)
               for ra, rb in zip(after["original"], before["original"]) for a, b in zip(ra, rb)) > 1e-6 * scale
    assert all(abs(a - b) <= 1e-6 * max(1.0, scale)
               for ra, rb in zip(after["ln_free"], before["ln_free"]) for a, b in zip(ra, rb))
    assert "treatment=raw" in page.url
    shot(page, shots, "dla-raw")


def test_permalink_reload_reopens_the_result(page, server, shots):
    url = page.url
    raw = plot_z(page, "dla-heads-original")
    page.reload()
    page.wait_for_selector(".view[data-ready=true]")
    page.wait_for_selector("#dla-heads-original .main-svg")
    assert page.url == url
    assert plot_z(page, "dla-heads-original") == raw
    assert "active" in page.locator('#treatment-toggle button[data-value="raw"]').get_attribute("class")


def test_other_result_views(page, server, shots):
    runs = {
        "ln-stats": {"pair": "local", "prompts": [IOI, "The war lasted from the year 1732 to the year 17"]},
        "loss": {"pair": "local", "options": {"n_bootstrap": 20, "max_tokens": 256}},
        "confidence-neurons": {"pair": "local", "options": {"max_tokens": 256, "top_n": 8}},
        "patching-fidelity": {"pair": "local", "task": CUSTOM_TASK, "options": {"group_size": 1, "n_bootstrap": 20}},
        "attribution-patching": {"pair": "local", "task": CUSTOM_TASK},
    }
    expect = {
        "ln-stats": ["#ln-scale-original", "#ln-resid-norms", "#ln-norm-map-ln_free"],
        "loss": ["#loss-bars", "#loss-positions"],
        "confidence-neurons": ["#conf-scatter-original", "#conf-effects-control", "#conf-fraction"],
        "patching-fidelity": ["#patch-activation-original", "#patch-atp-ln_free", "#patching-scatter",
                              "#patching-stats"],
        "attribution-patching": ["#patch-atp-original", "#patch-atp-control"],
    }
    kinds = {k["name"] for k in api(server, "/kinds")}
    for kind, body in runs.items():
        if kind not in kinds:
            continue
        out = api(server, f"/analyses/{kind}", body, wait="true", timeout=120)
        assert out["status"] == "done", out
        open_view(page, server, f"/{kind}/{out['id']}")
        for sel in expect[kind]:
            page.wait_for_selector(f"{sel} .main-svg")
        if kind == "loss":
            assert page.locator("#loss-table tbody tr").count() == 3
        if kind == "patching-fidelity":
            assert page.locator("#fidelity-table tbody tr").count() >= 3
            assert len(plot_z(page, "patch-activation-original")) == 2  # resid_pre: layer x position
        shot(page, shots, kind)


def test_history_lists_results_and_links_to_them(page, server, shots):
    open_view(page, server, "/history?pair=local&kind=dla")
    rows = page.locator("#history-table tbody tr")
    assert rows.count() >= 1
    assert page.locator("#history-kind").input_value() == "dla"
    shot(page, shots, "history")
    rows.first.locator("a").first.click()
    page.wait_for_url("**/#/dla/*")
    page.wait_for_selector("#dla-heads-ln_free .main-svg")


def test_long_job_shows_progress_and_stage(page, server, shots):
    job = httpx.post(f"{server}/api/v1/analyses/probe",
                     json={"pair": "local", "prompts": [IOI], "options": {"stages": 12, "sleep_s": 0.4, "tag": "ui"}},
                     timeout=30)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    page.goto(f"{server}/#/job/{job_id}")
    page.wait_for_function("() => /probe stage/.test(document.querySelector('.progress-stage')?.textContent || '')")
    width = page.evaluate("() => document.querySelector('.progress-bar').style.width")
    assert width.endswith("%")
    shot(page, shots, "job-progress")
    page.wait_for_url(f"**/#/probe/{job_id}", timeout=30_000)  # the result view opens when it finishes
    page.wait_for_selector(".view[data-ready=true]")


def synthetic_graph(seed: int = 0, drop: tuple[int, ...] = (), extra: int = 0) -> dict:
    """A small attribution graph in circuit-tracer's JSON schema, with feature pages embedded."""
    import random

    rng = random.Random(seed)
    tokens = ["<|endoftext|>", "When", " Mary", " and", " John", " went", ",", " John", " gave", " to"]
    n_layers, nodes, links = 2, [], []
    for pos, tok in enumerate(tokens):
        nodes.append({"node_id": f"E_{pos}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                      "feature_type": "embedding", "influence": 0.1 + 0.05 * pos, "activation": None})
    feats = []
    k = 0
    for layer in range(n_layers):
        for pos in (2, 4, 7, 9, 9):
            k += 1
            if k in drop:
                continue
            fid = 100 * layer + k
            feats.append({"node_id": f"{layer}_{fid}_{pos}", "feature": fid, "layer": str(layer), "ctx_idx": pos,
                          "feature_type": "cross layer transcoder", "influence": round(0.05 * k, 3),
                          "activation": round(rng.uniform(0.5, 5), 3), "clerp": f"feature {fid}"})
    for j in range(extra):
        feats.append({"node_id": f"1_{900 + j}_9", "feature": 900 + j, "layer": "1", "ctx_idx": 9,
                      "feature_type": "cross layer transcoder", "influence": 0.15, "activation": 1.0})
    nodes += feats
    nodes.append({"node_id": "0_1_9", "feature": -1, "layer": "1", "ctx_idx": 9,
                  "feature_type": "mlp reconstruction error", "influence": 0.6})
    nodes.append({"node_id": "3_42_9", "feature": 42, "layer": "3", "ctx_idx": 9, "feature_type": "logit",
                  "is_target_logit": True, "token_prob": 0.4, "clerp": 'Output " Mary" (p=0.400)'})
    for f in feats:
        src = (f"E_{f['ctx_idx']}_{f['ctx_idx']}" if f["layer"] == "0"
               else rng.choice([g for g in feats if g["layer"] == "0"])["node_id"])
        links.append({"source": src, "target": f["node_id"], "weight": round(rng.uniform(-1, 3), 3)})
        if f["layer"] == "1":
            links.append({"source": f["node_id"], "target": "3_42_9", "weight": round(rng.uniform(-2, 4), 3)})
    links.append({"source": "0_1_9", "target": "3_42_9", "weight": 0.5})
    features = {f["node_id"]: {
        "index": f["feature"], "layer": int(f["layer"]), "transcoder_id": f"synthetic/L{f['layer']}",
        "activation_frequency": 0.012, "act_min": 0.0, "act_max": 6.0,
        "histogram": [120, 60, 30, 14, 8, 4, 2, 1, 1, 0],
        "top_logits": [" Mary", " John", " her"], "bottom_logits": [" the", " a", ","],
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": [
            {"tokens": ["When", " Mary", " and", " John"], "tokens_acts_list": [0.0, 5.2, 0.3, 1.1],
             "train_token_ind": 1, "is_repeated_datapoint": False}]}],
    } for f in feats}
    return {"metadata": {"slug": f"synthetic-{seed}", "scan": "synthetic", "prompt_tokens": tokens,
                         "prompt": "".join(tokens[1:]), "node_threshold": 0.8},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links, "features": features}


def click_node(page, node_id):
    """Click a node of #circuit-graph (its first drawn marker), wherever its subplot lies."""
    xy = page.evaluate("""(id) => {
        const gd = document.getElementById('circuit-graph');
        const t = gd.data.find(t => t.mode === 'markers' && t.customdata && t.customdata.includes(id));
        const i = t.customdata.indexOf(id);
        const ax = (a, k) => gd._fullLayout[k + 'axis' + (a && a.length > 1 ? a.slice(1) : '')];
        const xa = ax(t.xaxis, 'x'), ya = ax(t.yaxis, 'y'), r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(t.x[i]), r.top + ya._offset + ya.l2p(t.y[i])];
    }""", node_id)
    page.mouse.move(xy[0] - 3, xy[1] - 3)
    page.mouse.move(xy[0], xy[1])
    page.wait_for_timeout(200)
    page.mouse.click(xy[0], xy[1])


def test_circuit_view_graph_node_and_feature_page(page, server, shots, tmp_path):
    kinds = {k["name"] for k in api(server, "/kinds")}
    open_view(page, server, "/circuit")
    availability = page.locator("#circuit-availability")
    if "circuit" not in kinds:
        assert "not available" in availability.inner_text()
    else:
        assert availability.get_attribute("data-available") == "true"
    # a circuit-tracer graph file (two roles, for the diff) opened from disk
    graph_file = tmp_path / "graph.json"
    graph_file.write_text(json.dumps({"roles": {"original": synthetic_graph(0),
                                                "ln_free": synthetic_graph(0, drop=(3,), extra=2)}}))
    page.set_input_files("#graph-file", str(graph_file))
    page.wait_for_selector("#circuit-graph .main-svg")
    counts = page.locator("#circuit-counts").inner_text()
    click_node(page, "1_109_9")  # a layer-1 feature at the last position
    page.wait_for_function("() => document.querySelector('#node-panel h3')?.textContent.includes('#109')")
    assert page.locator("#node-panel").inner_text().count("Inputs") == 1
    page.click("#open-feature")
    page.wait_for_selector("#feature-page #feature-histogram .main-svg")
    assert "Mary" in page.locator("#feature-contexts").inner_text()
    assert page.locator("#feature-page .logit-list.up li").count() == 3
    shot(page, shots, "circuit")
    # client-side pruning: a lower node threshold keeps fewer nodes
    page.evaluate("() => { const s = document.getElementById('node-threshold'); "
                  "s.value = '0.2'; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("(c) => document.getElementById('circuit-counts').textContent !== c", arg=counts)
    # role toggle and diff mode: gained and lost nodes against the original
    page.click('#circuit-role button[data-value="ln_free"]')
    page.check("#circuit-diff")
    page.wait_for_function("() => /gained/.test(document.getElementById('circuit-counts').textContent)")
    names = page.evaluate("() => document.getElementById('circuit-graph').data.map(t => t.name)")
    assert any(n and n.startswith("gained") for n in names) and any(n and n.startswith("lost") for n in names)
    shot(page, shots, "circuit-diff")


def test_circuit_diff_from_home_node_click_feature_page_and_permalink(page, server, shots):
    """A real circuit-diff (the random trio's transcoders) run from the home page, then a feature's page."""
    open_view(page, server, "/")
    page.locator('.field[data-field="prompts"] textarea').fill(IOI)
    page.select_option('.field[data-field="options.target.kind"] select', "top")
    page.locator('.field[data-field="roles"] input[value="control"]').uncheck()
    page.click('button[data-kind="circuit-diff"]')
    page.wait_for_url("**/#/circuit-diff/*", timeout=120_000)
    page.wait_for_selector("#circuit-graph .main-svg")
    assert "gained" in page.locator("#circuit-counts").inner_text()  # diff mode opens by default
    result = api(server, "/results/" + page.url.split("/")[-1].split("?")[0])["result"]
    assert set(result["roles"]) == {"original", "ln_free"} and result["diff"]["matched_nodes"]
    # a transcoder feature node drawn in the ln_free graph (ids "<layer>_<feature>_<pos>", layer < n_layers)
    node_id = page.evaluate("""() => {
        const ids = document.getElementById('circuit-graph').data"""
                            """.flatMap(t => t.mode === 'markers' ? (t.customdata || []) : []);
        return ids.find(id => /^[01]_\\d+_\\d+$/.test(id));
    }""")
    assert node_id, "no feature node drawn"
    click_node(page, node_id)  # nodes sharing a cell sit close together: read back which one was hit
    page.wait_for_function("() => /^L[01] #/.test(document.querySelector('#node-panel h3')?.textContent || '')")
    picked = page.locator("#node-panel dd.mono").first.inner_text()
    layer, feature, _ = picked.split("_")
    assert page.locator("#node-panel h3").first.inner_text().startswith(f"L{layer} #{feature} ")
    page.click("#open-feature")
    page.wait_for_url("**/#/feature/*", timeout=60_000)
    page.wait_for_selector("#feature-page #feature-histogram .main-svg")
    assert page.locator("#feature-page h2").first.inner_text().startswith(f"Feature L{layer} #{feature}")
    assert page.locator("#feature-page .logit-list.up li").count() == 10
    shot(page, shots, "feature")
    page.reload()  # the permalink reopens the stored page
    page.wait_for_selector("#feature-page #feature-histogram .main-svg")
    assert page.locator("#feature-page .logit-list.down li").count() == 10


def test_results_stored_before_the_restructuring_still_open(page, server, shots):
    """Each kind's fixture result, stored as the server stored results before (the manifest inside the
    result JSON and copied to the row), opens in its view."""
    from lnscope.server.storage import Store, database_url

    store = Store(database_url(SERVER_DATA["dir"]))
    for i, row in enumerate(json.loads((ROOT / "tests" / "fixtures" / "kind_results.json").read_text())):
        stored = store.create(kind=row["kind"], pair="tiny", inputs={"pair": "tiny", **row["request"]},
                              req_hash=f"stored-before-{i}", manifest=None)
        store.finish(stored.id, json.dumps(row["result"]), row["result"]["manifest"])
        open_view(page, server, f"/{row['kind']}/{stored.id}")
        assert page.locator(".view .card").count() >= 2, row["kind"]
        assert page.locator(".view details.manifest").count() == 1, row["kind"]
        if row["kind"] not in ("loss",):
            page.wait_for_selector(".view .js-plotly-plot, .view svg")
        shot(page, shots, f"stored-before-{i}-{row['kind']}")
    assert page.errors == []


def test_home_lists_the_model_workers(page, server, shots):
    open_view(page, server, "/")
    page.wait_for_selector("#workers table tbody tr")
    rows = page.locator("#workers tbody tr")
    roles = {rows.nth(i).get_attribute("data-role") for i in range(rows.count())}
    assert roles >= set(ROLES)
    assert "executor local" in page.locator("#workers caption").inner_text()
    shot(page, shots, "home-workers")


def test_no_request_left_the_server_and_no_script_errors(page, foreign):
    assert foreign == []
    assert page.errors == []
