"""The circuit pages in a real browser (Playwright + Debian chromium) on the random trio with transcoders.

A circuit-diff opens as one subplot per role (linked axes, a node budget by default), with its scores,
diff summary and matched / gained / lost feature lists; hovering a node rings its match in the other
role; pins live in the URL; the node panel stays in view at 1024x768; a matched feature's page shows
both roles side by side. Screenshots go to a temp dir (printed at the end); no request may leave the
server's origin and no page script may fail.
"""

from __future__ import annotations

import re

import pytest

from tests.test_frontend import IOI, api, foreign, open_view, page, server, shot, shots  # noqa: F401  (fixtures)

MAX_NODES = 80  # per role, by default


@pytest.fixture(scope="module")
def diff_id(server):  # noqa: F811
    kinds = {k["name"] for k in api(server, "/kinds")}
    if "circuit-diff" not in kinds:
        pytest.skip("this server has no circuit-diff kind")
    out = api(server, "/analyses/circuit-diff", {"pair": "local", "prompts": [IOI], "roles": ["original", "ln_free"]},
              wait="true", timeout=300)
    assert out["status"] == "done", out
    return out["id"]


def drawn_nodes(page):  # noqa: F811
    """{role: [node ids]} of the node markers drawn in #circuit-graph."""
    return page.evaluate("""() => {
        const out = {};
        for (const t of document.getElementById('circuit-graph').data) {
            if (t.mode !== 'markers' || !t.customdata) continue;
            (out[t.meta] = out[t.meta] || []).push(...t.customdata);
        }
        return out;
    }""")


def node_xy(page, role, node_id):  # noqa: F811
    """Screen coordinates of a node in its role's subplot."""
    return page.evaluate("""([role, id]) => {
        const gd = document.getElementById('circuit-graph');
        const t = gd.data.find(t => t.mode === 'markers' && t.meta === role
            && t.customdata && t.customdata.includes(id));
        const i = t.customdata.indexOf(id);
        const ax = (a, k) => gd._fullLayout[k + 'axis' + (a && a.length > 1 ? a.slice(1) : '')];
        const xa = ax(t.xaxis, 'x'), ya = ax(t.yaxis, 'y'), r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(t.x[i]), r.top + ya._offset + ya.l2p(t.y[i])];
    }""", [role, node_id])


def hover_node(page, role, node_id):  # noqa: F811
    x, y = node_xy(page, role, node_id)
    page.mouse.move(x - 4, y - 4)
    page.mouse.move(x, y)
    page.wait_for_timeout(200)
    return x, y


def click_node(page, role, node_id):  # noqa: F811
    x, y = hover_node(page, role, node_id)
    page.mouse.click(x, y)


def marked(page):  # noqa: F811
    return page.evaluate("() => document.getElementById('circuit-graph').dataset.marked || ''")


def a_drawn_matched_feature(page, server, diff_id):  # noqa: F811
    """A matched feature pair drawn in both subplots: (id in original, id in ln_free)."""
    diff = api(server, f"/results/{diff_id}")["result"]["diff"]
    drawn = drawn_nodes(page)
    for m in diff["matched_nodes"]:
        if m["kind"] == "feature" and m["node_id_a"] in drawn["original"] and m["node_id_b"] in drawn["ln_free"]:
            return m["node_id_a"], m["node_id_b"]
    pytest.fail("no matched feature drawn in both roles")


def test_circuit_diff_shows_both_roles_scores_and_lists(page, server, shots, diff_id):  # noqa: F811
    page.set_viewport_size({"width": 1440, "height": 900})
    open_view(page, server, f"/circuit-diff/{diff_id}")
    page.wait_for_selector("#circuit-graph .main-svg")
    assert page.locator("#circuit-graph").get_attribute("data-roles") == "original ln_free"
    assert page.locator("#circuit-graph").get_attribute("data-arrangement") == "columns"
    drawn = drawn_nodes(page)
    result = api(server, f"/results/{diff_id}")["result"]
    for role in ("original", "ln_free"):
        assert 0 < len(drawn[role]) <= MAX_NODES, (role, len(drawn[role]))
        assert len(drawn[role]) < len(result["roles"][role]["graph"]["nodes"]) or len(drawn[role]) <= 50 + 10
    # the same axes in both subplots (x linked to the first)
    assert page.evaluate("() => document.getElementById('circuit-graph')._fullLayout.xaxis2._matchGroup !== undefined"
                         " || document.getElementById('circuit-graph').layout.xaxis2.matches === 'x'")
    assert "gained" in page.locator("#circuit-counts").inner_text()
    # scores per role and the diff summary
    rows = page.locator("#circuit-scores tbody tr")
    assert rows.count() == 2
    for i, role in enumerate(("original", "ln_free")):
        rep = result["roles"][role]["summary"]["replacement_score"]
        assert f"{rep:.3g}"[:4] in rows.nth(i).inner_text()
    assert page.locator("#circuit-jaccard").inner_text() == f"{result['diff']['node_jaccard']:.3g}"
    n_matched = sum(1 for m in result["diff"]["matched_nodes"] if m["kind"] == "feature")
    assert page.locator("#circuit-matched tbody tr").count() == n_matched > 0
    assert page.locator("#circuit-paths-original li").count() == len(result["roles"]["original"]["top_paths"])
    assert page.locator("#circuit-edge-changes").count() == 1
    shot(page, shots, "circuit-diff-1440")


def test_hovering_a_node_rings_its_match(page, server, diff_id):  # noqa: F811
    id_a, id_b = a_drawn_matched_feature(page, server, diff_id)
    hover_node(page, "ln_free", id_b)
    page.wait_for_function("(m) => (document.getElementById('circuit-graph').dataset.marked || '').includes(m)",
                           arg=f"original:{id_a}")
    ring = page.evaluate("""() => document.getElementById('circuit-graph').data
        .find(t => t.meta === 'mark:original')""")
    assert len(ring["x"]) == 1
    # the table row of the pair is marked too; hovering a row marks both nodes
    assert page.locator(f'#circuit-matched tr.circuit-marked[data-node-b="{id_b}"]').count() == 1
    page.mouse.move(5, 5)
    row = page.locator(f'#circuit-matched tr[data-node-a="{id_a}"]')
    row.hover()
    page.wait_for_function("(m) => (document.getElementById('circuit-graph').dataset.marked || '') === m",
                           arg=f"original:{id_a} ln_free:{id_b}")


def test_pins_survive_a_reload(page, server, shots, diff_id):  # noqa: F811
    id_a, _ = a_drawn_matched_feature(page, server, diff_id)
    page.evaluate("() => window.scrollTo(0, 0)")
    click_node(page, "original", id_a)
    page.wait_for_function("(id) => document.querySelector('#node-panel dd.mono')?.textContent === id", arg=id_a)
    page.click("#pin-node")
    page.wait_for_function("() => location.hash.includes('pins=')")
    assert f"original%3A{id_a}" in page.url or f"original:{id_a}" in page.url
    page.reload()
    page.wait_for_selector("#circuit-graph .main-svg")
    assert page.locator(f'#circuit-pins [data-pin="original:{id_a}"]').count() == 1
    pinned = page.evaluate("() => document.getElementById('circuit-graph').data.find(t => t.meta === 'pins:original')")
    assert len(pinned["x"]) == 1 and re.match(r"L\d+ #\d+", pinned["text"][0])
    # the pinned subgraph: only the pinned node is drawn
    page.check("#circuit-subgraph")
    page.wait_for_function("() => location.hash.includes('sub=1')")
    assert drawn_nodes(page).get("original") == [id_a]
    shot(page, shots, "circuit-diff-pinned")
    page.uncheck("#circuit-subgraph")
    page.click("#circuit-unpin-all")
    page.wait_for_function("() => !location.hash.includes('pins=')")


def test_matched_feature_opens_both_roles(page, server, shots, diff_id):  # noqa: F811
    row = page.locator("#circuit-matched tbody tr").first
    layer = row.locator("td").nth(0).inner_text().lstrip("L")
    fa = row.locator("td").nth(2).inner_text().lstrip("#")
    fb = row.locator("td").nth(3).inner_text().lstrip("#")
    row.locator("button.circuit-open").first.click()
    page.wait_for_url("**/#/feature/*", timeout=120_000)
    assert f"match=ln_free%3A{layer}%3A{fb}" in page.url or f"match=ln_free:{layer}:{fb}" in page.url
    page.wait_for_selector("#feature-page #feature-histogram .main-svg")
    page.wait_for_selector("#feature-page-ln_free #feature-histogram-ln_free .main-svg", timeout=120_000)
    assert page.locator("#feature-page h2").first.inner_text().startswith(f"Feature L{layer} #{fa}")
    assert f"L{layer} #{fb}" in page.locator("#feature-page-ln_free h2").inner_text()
    # side by side: the two pages share a row
    boxes = [page.locator(sel).bounding_box() for sel in ("#feature-page", "#feature-page-ln_free")]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 5 and boxes[1]["x"] > boxes[0]["x"] + boxes[0]["width"] - 1
    assert page.locator("#feature-page-ln_free .logit-list.up li").count() == 10
    shot(page, shots, "feature-across-roles")
    page.click("#feature-back")
    page.wait_for_selector("#circuit-graph .main-svg")


def test_node_panel_in_view_at_1024(page, server, shots, diff_id):  # noqa: F811
    page.set_viewport_size({"width": 1024, "height": 768})
    open_view(page, server, f"/circuit-diff/{diff_id}")
    page.wait_for_selector("#circuit-graph .main-svg")
    drawn = drawn_nodes(page)
    assert all(0 < len(v) <= MAX_NODES for v in drawn.values())
    node = next(i for i in drawn["ln_free"] if re.match(r"^\d+_\d+_\d+$", i) and not i.startswith("E"))
    page.locator("#circuit-graph").scroll_into_view_if_needed()
    click_node(page, "ln_free", node)
    page.wait_for_function("(id) => document.querySelector('#node-panel dd.mono')?.textContent === id", arg=node)
    box = page.locator("#node-panel").bounding_box()
    head = page.locator("#node-panel h3").first.bounding_box()
    graph = page.locator("#circuit-graph").bounding_box()
    assert 0 <= head["y"] and head["y"] + head["height"] <= 768, head
    assert box["x"] + box["width"] <= 1024 and box["x"] >= graph["x"] + graph["width"] - 1  # beside the graph
    shot(page, shots, "circuit-diff-1024")
    page.set_viewport_size({"width": 1440, "height": 900})


def test_circuit_with_three_roles(page, server, shots):  # noqa: F811
    kinds = {k["name"] for k in api(server, "/kinds")}
    if "circuit" not in kinds:
        pytest.skip("this server has no circuit kind")
    out = api(server, "/analyses/circuit", {"pair": "local", "prompts": [IOI]}, wait="true", timeout=300)
    assert out["status"] == "done", out
    open_view(page, server, f"/circuit/{out['id']}")
    page.wait_for_selector("#circuit-graph .main-svg")
    drawn = drawn_nodes(page)
    assert set(drawn) == set(out["result"]["roles"]) and len(drawn) == 3
    assert all(0 < len(v) <= MAX_NODES for v in drawn.values())
    assert page.locator("#circuit-scores tbody tr").count() == 3
    assert page.locator("#run-circuit-diff").count() == 1
    shot(page, shots, "circuit-three-roles")


def test_no_request_left_the_server_and_no_script_errors(page, foreign):  # noqa: F811
    assert foreign == []
    assert page.errors == []
