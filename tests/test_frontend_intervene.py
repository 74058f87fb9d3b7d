"""Interventions in a real browser (Playwright + Debian chromium) on the random trio with transcoders.

From a DLA head, "ablate" runs `intervene` on every role and opens its result: each role's clean vs
intervened distribution and the edit's predicted vs actual change (the LN-free role's direct path marked
exact). From a circuit's feature node, "steer" with the alpha slider opens a result; from that feature's
page, "ablate" does. At 1440x900; screenshots go to a temp dir (printed at the end); no request may leave
the server's origin and no page script may fail.
"""

from __future__ import annotations

import re

import pytest

from tests.test_frontend import (  # noqa: F401  (fixtures)
    IOI,
    ROLES,
    api,
    click_node,
    foreign,
    open_view,
    page,
    server,
    shot,
    shots,
)

TARGET = {"kind": "logit_diff", "token": " Mary", "other": " John"}


@pytest.fixture(scope="module", autouse=True)
def viewport(page):  # noqa: F811
    page.set_viewport_size({"width": 1440, "height": 900})


@pytest.fixture(scope="module")
def kinds(server):  # noqa: F811
    names = {k["name"] for k in api(server, "/kinds")}
    if "intervene" not in names:
        pytest.skip("this server has no intervene kind")
    return names


def click_heatmap_cell(page, element_id, row, col):  # noqa: F811
    """Click cell (row, col) of the heatmap in #element_id (category axes: index = linear coordinate)."""
    xy = page.evaluate("""([id, row, col]) => {
        const gd = document.getElementById(id);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(col), r.top + ya._offset + ya.l2p(row)];
    }""", [element_id, row, col])
    page.mouse.move(xy[0] - 3, xy[1] - 3)
    page.mouse.move(xy[0], xy[1])
    page.wait_for_timeout(150)
    page.mouse.click(xy[0], xy[1])


def result_id(page):  # noqa: F811
    return page.url.split("#/intervene/")[1].split("?")[0]


def assert_result_page(page, server, roles):  # noqa: F811
    """The intervene page shows every role's distribution, stats and predicted-vs-actual row."""
    page.wait_for_url("**/#/intervene/*", timeout=180_000)
    page.wait_for_selector(".view[data-view=intervene][data-ready=true]", timeout=120_000)
    for role in roles:
        page.wait_for_selector(f"#intervene-dist-{role} .main-svg")
        assert page.locator(f"#intervene-stats .stat[data-role={role}]").count() == 1
        assert page.locator(f"#intervene-pva-table-0 tbody tr[data-role={role}]").count() == 1
    page.wait_for_selector("#intervene-pva-0 .main-svg")
    traces = page.evaluate("(r) => document.getElementById('intervene-dist-' + r).data.map(t => t.name)", roles[0])
    assert traces == ["clean", "intervened"]
    out = api(server, f"/results/{result_id(page)}")
    assert out["kind"] == "intervene" and sorted(out["result"]["roles"]) == sorted(roles)
    if "ln_free" in roles:
        assert page.locator("#intervene-pva-table-0 tr[data-role=ln_free]").get_attribute("data-exact") == "true"
    assert page.locator(".view details.manifest").count() == 1
    assert page.locator(".view .page-head h1").inner_text() == "Intervention"
    return out


def test_dla_head_ablate_opens_every_role(page, server, shots, kinds):  # noqa: F811
    dla = api(server, "/analyses/dla", {"pair": "local", "prompts": [IOI, IOI.replace("John gave", "Mary gave")],
                                        "options": {"target": TARGET}}, wait="true", timeout=300)
    assert dla["status"] == "done", dla
    open_view(page, server, f"/dla/{dla['id']}")
    page.wait_for_selector("#dla-heads-original .main-svg")
    assert page.locator("#dla-intervene .intervene-controls").is_hidden()  # nothing picked yet
    click_heatmap_cell(page, "dla-heads-ln_free", 1, 0)
    page.wait_for_function("() => document.getElementById('dla-intervene').dataset.component === 'L1H0'")
    assert page.locator("#dla-intervene-steer").is_hidden()  # a head has no direction to steer
    page.select_option("#dla-intervene-how", "zero")
    shot(page, shots, "intervene-dla-picked")
    page.click("#dla-intervene-ablate")
    out = assert_result_page(page, server, ROLES)
    edit = out["inputs"]["options"]["edits"][0]
    assert edit["type"] == "ablate_head" and (edit["layer"], edit["head"]) == (1, 0)
    assert out["inputs"]["prompts"] == dla["inputs"]["prompts"]
    assert page.locator("#intervene-differences tbody tr").count() == 2
    assert page.locator("#intervene-continuations .intervene-continuation").count() == 3
    # the prompt selector re-draws the distributions of prompt 2
    before = page.evaluate("() => document.getElementById('intervene-dist-original').data[0].y")
    page.select_option("#intervene-prompt", "1")
    page.wait_for_function("(b) => JSON.stringify(document.getElementById('intervene-dist-original').data[0].y)"
                           " !== JSON.stringify(b)", arg=before)
    assert "prompt=1" in page.url
    shot(page, shots, "intervene-from-dla")


@pytest.fixture(scope="module")
def circuit_id(server, kinds):  # noqa: F811
    if "circuit" not in kinds:
        pytest.skip("this server has no circuit kind")
    out = api(server, "/analyses/circuit", {"pair": "local", "prompts": [IOI], "roles": ["original", "ln_free"],
                                            "options": {"target": {"kind": "logit", "token": " Mary"}}},
              wait="true", timeout=300)
    assert out["status"] == "done", out
    return out["id"]


def pick_feature_node(page):  # noqa: F811
    """Click a transcoder feature node of the circuit; returns (layer, feature) from the node panel."""
    node_id = page.evaluate("""() => document.getElementById('circuit-graph').data
        .flatMap(t => t.mode === 'markers' ? (t.customdata || []) : []).find(id => /^[01]_\\d+_\\d+$/.test(id))""")
    assert node_id, "no feature node drawn"
    click_node(page, node_id)
    page.wait_for_function("() => /^L[01] #/.test(document.querySelector('#node-panel h3')?.textContent || '')")
    layer, feature, _ = page.locator("#node-panel dd.mono").first.inner_text().split("_")
    return int(layer), int(feature)


def test_circuit_node_steer_with_the_slider(page, server, shots, circuit_id):  # noqa: F811
    open_view(page, server, f"/circuit/{circuit_id}")
    page.wait_for_selector("#circuit-graph .main-svg")
    layer, feature = pick_feature_node(page)
    page.wait_for_selector("#node-intervene")
    assert re.fullmatch(r"L[01]F\d+", page.locator("#node-intervene").get_attribute("data-component"))
    page.evaluate("() => { const s = document.getElementById('node-intervene-alpha'); "
                  "s.value = '-12.5'; s.dispatchEvent(new Event('input')); }")
    assert page.locator("#node-intervene .intervene-alpha-value").inner_text() == "-12.5"
    shot(page, shots, "intervene-circuit-node")
    page.click("#node-intervene-steer")
    out = assert_result_page(page, server, out_roles(page, server))
    edit = out["inputs"]["options"]["edits"][0]
    assert edit["type"] == "steer" and edit["alpha"] == -12.5 and edit["direction"]["feature"][0] == layer
    assert out["inputs"]["prompts"] == [IOI] and out["inputs"]["options"]["target"]["token"] == " Mary"
    shot(page, shots, "intervene-from-circuit")


def out_roles(page, server):  # noqa: F811
    """The roles of the intervention the page opened (the node's role and those after it)."""
    page.wait_for_url("**/#/intervene/*", timeout=180_000)
    return api(server, f"/results/{result_id(page)}")["inputs"].get("roles") or ROLES


def test_feature_page_ablate(page, server, shots, circuit_id):  # noqa: F811
    open_view(page, server, f"/circuit/{circuit_id}")
    page.wait_for_selector("#circuit-graph .main-svg")
    layer, feature = pick_feature_node(page)
    page.click("#open-feature")
    page.wait_for_url("**/#/feature/*", timeout=120_000)
    page.wait_for_selector("#feature-intervene-bar")
    assert page.locator("#feature-intervene-bar-prompt").input_value() == IOI  # the circuit's prompt
    assert page.locator("#feature-intervene-bar-how").is_hidden()  # a feature ablates to 0 only
    shot(page, shots, "intervene-feature-page")
    page.click("#feature-intervene-bar-ablate")
    out = assert_result_page(page, server, out_roles(page, server))
    edit = out["inputs"]["options"]["edits"][0]
    assert edit == {**edit, "type": "feature", "layer": layer, "feature": feature, "set": 0}
    shot(page, shots, "intervene-from-feature")


def test_no_request_left_the_server_and_no_script_errors(page, foreign):  # noqa: F811
    assert foreign == []
    assert page.errors == []
