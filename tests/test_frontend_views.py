"""The result views in a real browser at 1440x900 and 1024x768 (issue 22): patching position labels,
normalisation and difference maps, dense neuron maps, fidelity panels and the few-groups warning,
the log-scale confidence scatter, symbols and byte tokens, DLA labels and prompt selector, history
inputs and the cached badge. Runs the random trio (pair `local`); no request may leave loopback.
Screenshots go to a pytest temp dir (printed at the end)."""

from __future__ import annotations

import json
import math

import pytest
from playwright import sync_api as playwright_api

from lnscope.analysis.kinds.patching import FidelityOptions, default_group_size
from tests.test_frontend import (  # noqa: F401  (server, shots, foreign are fixtures)
    CHROMIUM,
    CHROMIUM_ARGS,
    CUSTOM_TASK,
    IOI,
    ROLES,
    api,
    foreign,
    open_view,
    plot_z,
    server,
    shot,
    shots,
)

VIEWPORTS = {"1440x900": (1440, 900), "1024x768": (1024, 768)}
NAMED_TASK = {"name": "custom", "pairs": CUSTOM_TASK["pairs"] * 5}  # 10 aligned IOI-like pairs


@pytest.fixture(scope="module")
def views(server, foreign):
    """One page per viewport, each blocking non-loopback requests and collecting script errors."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages, contexts = {}, []
        for name, (width, height) in VIEWPORTS.items():
            context = browser.new_context(viewport={"width": width, "height": height})

            def guard(route):
                url = route.request.url
                if url.startswith(server + "/") or url == server:
                    route.continue_()
                else:
                    foreign.append(url)
                    route.abort()

            context.route("**/*", guard)
            page = context.new_page()
            page.errors = []
            page.on("pageerror", lambda exc, errors=page.errors: errors.append(str(exc)))
            page.set_default_timeout(30_000)
            pages[name] = page
            contexts.append(context)
        yield pages
        for context in contexts:
            context.close()
        browser.close()


@pytest.fixture(scope="module")
def runs(server):
    """The analyses the views show, run once (inline) on the random trio."""
    kinds = {k["name"] for k in api(server, "/kinds")}
    bodies = {
        "attribution-patching": {"pair": "local", "task": CUSTOM_TASK,
                                 "options": {"nodes": ["resid_pre", "head", "mlp", "neuron"]}},
        "patching-fidelity": {"pair": "local", "task": CUSTOM_TASK,
                              "options": {"nodes": ["resid_pre", "head"], "n_bootstrap": 20}},
        "fidelity-5-groups": {"pair": "local", "task": NAMED_TASK, "options": {"nodes": ["head"], "n_bootstrap": 20}},
        "confidence-neurons": {"pair": "local", "options": {"max_tokens": 256, "top_n": 8}},
        "ln-stats": {"pair": "local", "prompts": ["café → naïve", IOI]},
        "dla": {"pair": "local", "prompts": [IOI, "When John and Mary went to the store, Mary gave a drink to"],
                "options": {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 20}},
    }
    out = {}
    for name, body in bodies.items():
        kind = "patching-fidelity" if name.startswith("fidelity") else name
        if kind in kinds:
            out[name] = api(server, f"/analyses/{kind}", body, wait="true", timeout=240)
            assert out[name]["status"] == "done", out[name]
    return out


def each_view(views, server, route):
    """Open `route` in every viewport; yields (name, page)."""
    for name, page in views.items():
        open_view(page, server, route)
        yield name, page


def overlapping_ticks(page, plot_id, axis="xtick"):
    """Pairs of neighbouring tick labels of a plot that overlap (rotated labels: closer than a line)."""
    return page.evaluate("""([id, axis]) => {
        const texts = [...document.querySelectorAll(`#${id} .${axis} text`)].filter(t => t.textContent.trim());
        const boxes = texts.map(t => t.getBoundingClientRect()).filter(b => b.width > 0);
        const rotated = texts.some(t => /rotate\\(-?[1-9]/.test(t.getAttribute('transform') || ''));
        boxes.sort((a, b) => a.left - b.left);
        let n = 0;
        for (let i = 1; i < boxes.length; i++) {
            const a = boxes[i - 1], b = boxes[i];
            if (rotated ? (b.left + b.right - a.left - a.right) / 2 * 0.7 < 8 : a.right > b.left + 1) n++;
        }
        return n;
    }""", [plot_id, axis])


def no_horizontal_overflow(page):
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")


def layout_of(page, plot_id):
    return page.evaluate(f"() => document.getElementById({json.dumps(plot_id)}).layout")


# -- patching -------------------------------------------------------------------------------------
def test_patching_positions_are_tokens_and_template_roles(views, server, shots, runs):
    out = runs["attribution-patching"]
    for name, page in each_view(views, server, f"/attribution-patching/{out['id']}?node=resid_pre"):
        page.wait_for_selector("#patch-atp-original .main-svg")
        x = page.evaluate("() => document.getElementById('patch-atp-original').data[0].x")
        assert not any(label.startswith("P") and label[1:].isdigit() for label in x), x
        assert {"3 IO", "5 S1", "16 S2", "25 END"} <= set(x), x  # BOS, 'Whe', 'n', ' Mary' ...
        assert any("·and" in label for label in x), x
        assert "IO" in page.locator("#position-note").inner_text()
        shown = page.locator("#patch-atp-original .xtick text").all_text_contents()
        assert {"0 BOS", "3 IO", "5 S1", "16 S2", "25 END"} <= set(shown), shown  # crowded axes keep the roles
        assert overlapping_ticks(page, "patch-atp-original") == 0
        assert no_horizontal_overflow(page)
        shot(page, shots, f"patching-positions-{name}")


def test_patching_normalisation_and_differences(views, server, shots, runs):
    out = runs["attribution-patching"]
    roles = api(server, f"/results/{out['id']}")["result"]["roles"]
    raw = {r: roles[r]["atp"]["resid_pre"]["values"] for r in ROLES}
    gap = {r: roles[r]["metric"]["denominator"] for r in ROLES}
    close = lambda a, b: all(abs(u - v) <= 1e-9 * max(1.0, abs(v)) for ra, rb in zip(a, b) for u, v in zip(ra, rb))  # noqa: E731
    for name, page in each_view(views, server, f"/attribution-patching/{out['id']}?node=resid_pre"):
        page.wait_for_selector("#patch-diff-atp-ln_free .main-svg")
        # roles are compared: normalised by each role's gap by default
        assert "active" in page.locator('#norm-toggle button[data-value="gap"]').get_attribute("class")
        for role in ROLES:
            assert close(plot_z(page, f"patch-atp-{role}"), [[v / gap[role] for v in row] for row in raw[role]])
        for role in ("ln_free", "control"):
            want = [[a / gap[role] - b / gap["original"] for a, b in zip(ra, rb)]
                    for ra, rb in zip(raw[role], raw["original"])]
            assert close(plot_z(page, f"patch-diff-atp-{role}"), want)
        shot(page, shots, f"patching-normalised-{name}")
        page.click('#norm-toggle button[data-value="raw"]')
        page.wait_for_function("() => /norm=raw/.test(location.hash)")
        page.wait_for_selector("#patch-atp-original .main-svg")
        assert close(plot_z(page, "patch-atp-ln_free"), raw["ln_free"])
        assert "gap" in page.locator("#norm-help").inner_text()


def test_dense_neuron_maps_get_top_k_lists(views, server, shots, runs):
    out = runs["attribution-patching"]
    for name, page in each_view(views, server, f"/attribution-patching/{out['id']}?node=neuron"):
        page.wait_for_selector("#patch-atp-original .main-svg")
        trace = page.evaluate("() => document.getElementById('patch-atp-original').data[0]")
        assert len(trace["x"]) > 64 and trace["xgap"] == 0  # no white gaps between 512 narrow cells
        rows = page.locator("#patch-atp-original-top tbody tr")
        assert rows.count() == 12
        values = [abs(float(rows.nth(i).locator("td").nth(2).inner_text())) for i in range(rows.count())]
        assert values == sorted(values, reverse=True)
        assert page.locator("#patch-diff-atp-ln_free-top tbody tr").count() == 12
        assert no_horizontal_overflow(page)
        shot(page, shots, f"patching-neurons-{name}")


# -- fidelity -------------------------------------------------------------------------------------
def test_fidelity_statistics_on_their_own_axes_and_few_groups_warning(views, server, shots, runs):
    out = runs["patching-fidelity"]
    for name, page in each_view(views, server, f"/patching-fidelity/{out['id']}?node=head"):
        page.wait_for_selector("#patching-stats .main-svg")
        layout = layout_of(page, "patching-stats")
        assert layout["yaxis"]["range"][1] <= 1.05 and layout["yaxis2"]["anchor"] == "x2"
        traces = page.evaluate("() => document.getElementById('patching-stats').data.map(t => [t.x, t.yaxis || 'y'])")
        assert all((x == ["normalised error"]) == (axis == "y2") for x, axis in traces), traces
        warning = page.locator("#fidelity-warning .notice.warn")
        assert warning.is_visible() and "fewer than 5" in warning.inner_text()
        assert "⚠" in page.locator("#fidelity-table tbody tr").first.inner_text()
        assert overlapping_ticks(page, "patching-stats") == 0
        shot(page, shots, f"fidelity-{name}")


def test_fidelity_default_grouping_gives_five_groups(views, server, shots, runs):
    assert FidelityOptions().group_size is None and FidelityOptions(group_size=2).group_size == 2
    assert [default_group_size(n) for n in (1, 4, 5, 10, 16, 100)] == [1, 1, 1, 2, 3, 20]
    out = runs["fidelity-5-groups"]
    assert all(len(r["groups"]) == 5 for r in out["result"]["roles"].values())
    assert {s["interval"]["n"] for r in out["result"]["roles"].values() for s in r["summaries"]} == {5}
    for name, page in each_view(views, server, f"/patching-fidelity/{out['id']}"):
        page.wait_for_selector("#patching-stats .main-svg")
        assert page.locator("#fidelity-warning .notice").count() == 0


# -- confidence neurons ---------------------------------------------------------------------------
def test_confidence_rho_on_a_log_scale_with_the_baseline_labelled(views, server, shots, runs):
    out = runs["confidence-neurons"]
    for name, page in each_view(views, server, f"/confidence-neurons/{out['id']}"):
        page.wait_for_selector("#conf-scatter-original .main-svg")
        layout = layout_of(page, "conf-scatter-original")
        assert layout["yaxis"]["type"] == "log"
        baseline = out["result"]["roles"]["original"]["rho_random_baseline"]
        assert layout["shapes"][0]["y0"] == pytest.approx(math.log10(baseline))  # log axes place shapes in log10
        assert "random direction" in layout["annotations"][0]["text"]
        baseline = page.locator("#conf-scatter-original .annotation-text").first.text_content()
        assert baseline.startswith("random direction")
        shot(page, shots, f"confidence-{name}")


# -- text ----------------------------------------------------------------------------------------
def test_headers_keep_greek_letters_and_symbols(views, server, shots, runs):
    out = runs["patching-fidelity"]
    for name, page in each_view(views, server, f"/patching-fidelity/{out['id']}?node=head"):
        page.wait_for_selector("#fidelity-table")
        header = page.locator("#fidelity-table thead").inner_text()  # innerText applies text-transform
        assert "Spearman ρ" in header and "SPEARMAN" not in header
        assert page.evaluate("() => getComputedStyle(document.querySelector('table.data th')).textTransform") == "none"


def test_byte_tokens_show_as_bytes(views, server, shots, runs):
    out = runs["ln-stats"]
    for name, page in each_view(views, server, f"/ln-stats/{out['id']}?prompt=0"):
        page.wait_for_selector("#ln-norm-map-original .main-svg")
        x = page.evaluate("() => document.getElementById('ln-norm-map-original').data[0].x")
        assert not any("\ufffd" in label for label in x), x
        assert any("<0xC3>" in label for label in x) and any("<0xA9>" in label for label in x), x
        shot(page, shots, f"ln-stats-bytes-{name}")


def test_messages_number_prompts_from_one(views, server):
    page = views["1440x900"]
    open_view(page, server, "/history")
    got = page.evaluate("""async () => {
        const { labelled } = await import('/js/format.js');
        return [labelled('prompt 1 has 90 tokens; the limit is 64', 'prompt 1: '),
                labelled("missing field 'clean'", 'pair 3: ')];
    }""")
    assert got == ["prompt 1 has 90 tokens; the limit is 64", "pair 3: missing field 'clean'"]


# -- DLA layout ----------------------------------------------------------------------------------
def test_dla_component_labels_readable_and_prompt_selector_shows_text(views, server, shots, runs):
    out = runs["dla"]
    for name, page in each_view(views, server, f"/dla/{out['id']}"):
        page.wait_for_selector("#dla-layers .main-svg")
        assert overlapping_ticks(page, "dla-layers") == 0
        options = page.locator("#dla-prompt option").all_inner_texts()
        assert "gave a drink to" in options[1] and "original" in options[1] and "LN-free" in options[1], options
        assert options[1].startswith("1: ")
        assert no_horizontal_overflow(page)
        shot(page, shots, f"dla-{name}")


# -- history and the cached badge -------------------------------------------------------------------
def test_history_rows_show_their_inputs(views, server, shots, runs):
    for name, page in each_view(views, server, "/history?pair=local"):
        page.wait_for_function("() => document.querySelectorAll('[data-inputs-for] .inputs-cell').length"
                               " === document.querySelectorAll('[data-inputs-for]').length")
        cells = page.locator("#history-table [data-inputs-for]").all_inner_texts()
        assert any("custom task, 2 pairs" in c for c in cells), cells
        assert any("2 prompts" in c and "gave a drink to" in c for c in cells), cells
        assert page.locator("#history-table .options-digest").count() >= 3
        assert page.locator("#history-table .inputs-cell .role-badge").count() >= 3
        shot(page, shots, f"history-{name}")


def test_a_cached_result_is_marked(views, server, shots, runs):
    body = {"pair": "local", "prompts": [IOI, "When John and Mary went to the store, Mary gave a drink to"],
            "options": {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 20}}
    again = api(server, "/analyses/dla", body, wait="true")
    assert again["cached"] is True and again["id"] == runs["dla"]["id"]
    for name, page in each_view(views, server, f"/dla/{again['id']}?cached=1"):
        assert page.locator("#cached-badge").is_visible()
        shot(page, shots, f"dla-cached-{name}")
    page = views["1440x900"]
    open_view(page, server, f"/dla/{again['id']}")
    assert page.locator("#cached-badge").count() == 0  # opened from history: not a cache answer
    page.evaluate("(id) => sessionStorage.setItem('lnscope.cached.' + id, '1')", again["id"])
    open_view(page, server, f"/dla/{again['id']}?treatment=raw")
    assert page.locator("#cached-badge").is_visible()


def test_no_request_left_loopback_and_no_script_errors(views, foreign):
    assert foreign == []
    assert {name: page.errors for name, page in views.items()} == {name: [] for name in views}
