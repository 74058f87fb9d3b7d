"""The transcoder kinds over HTTP (circuit, circuit-diff, feature, GET /features): results equal the
library's, graphs keep their exact identities, and every bad input is a 4xx naming the field."""

import pytest
import torch
from fastapi.testclient import TestClient

from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.analysis.transcoders import attribute
from lnscope.analysis.transcoders.formats import load_transcoders
from lnscope.server.app import create_app
from lnscope.server.settings import Settings
from tests.transcoder_fixtures import build_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to"
ROLES = ("original", "ln_free", "control")
D_TC = 96


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def transcoder_dirs(trio_dirs, tmp_path_factory, cache):
    return build_transcoders(trio_dirs, tmp_path_factory.mktemp("transcoders"), d_transcoder=D_TC, cache=cache)


def _toml(trio_dirs, transcoder_dirs, roles=ROLES) -> str:
    lines = ['default_pair = "local"', "[pairs.local]"]
    lines += [f'{r} = {{ path = "{trio_dirs[r]}" }}' for r in ROLES]
    lines += ["[pairs.local.transcoders]"] + [f'{r} = "{transcoder_dirs[r]}"' for r in roles]
    return "\n".join(lines) + "\n"


@pytest.fixture
def client(trio_dirs, transcoder_dirs, tmp_path, cache):
    (tmp_path / "lnscope.toml").write_text(_toml(trio_dirs, transcoder_dirs))
    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data", workers=2, inline_wait_s=300),
                     registry=PairRegistry.load(), cache=cache)
    with TestClient(app) as c:
        yield c


def post(client, kind, body):
    return client.post(f"/api/v1/analyses/{kind}?wait=true&timeout=300", json=body)


def test_circuit_graphs_equal_the_library_and_share_targets(client, cache, transcoder_dirs):
    r = post(client, "circuit", {"pair": "local", "roles": ["original", "ln_free"], "prompts": [PROMPT],
                                 "options": {"max_n_logits": 3, "top_paths": 2}})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert r.json()["manifest"]["kind"] == "circuit"
    assert list(result["roles"]) == ["original", "ln_free"]
    targets = {role: [t["vocab_idx"] for t in v["summary"]["targets"]] for role, v in result["roles"].items()}
    assert targets["original"] == targets["ln_free"] and len(targets["original"]) <= 3
    for role, v in result["roles"].items():
        s = v["summary"]
        assert s["identity_max_rel_error"] < 1e-4, (role, s["identity_max_rel_error"])
        graph = v["graph"]
        ids = {n["node_id"] for n in graph["nodes"]}
        assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
        assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "logit"}
        assert graph["metadata"]["prompt"] == PROMPT
        assert len(v["top_paths"]) <= 2
        # the library's own graph on the same model and transcoders
        pair = PairRegistry.load().get("local")
        model = cache.get(pair.source(role), role, device="cpu", dtype="float32")
        lib = attribute(model, load_transcoders(transcoder_dirs[role], model=model), PROMPT, max_n_logits=3,
                        max_feature_nodes=4096, target_tokens=targets["original"])
        ref = lib.summary()
        assert s["n_active_features"] == ref.n_active_features
        assert s["replacement_score"] == pytest.approx(ref.replacement_score, abs=1e-5)
        assert s["completeness_score"] == pytest.approx(ref.completeness_score, abs=1e-5)
        assert len(graph["nodes"]) == len(lib.to_json().nodes)


def test_circuit_with_a_logit_diff_target(client):
    r = post(client, "circuit", {"pair": "local", "roles": ["ln_free"], "prompts": [PROMPT],
                                 "options": {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}}})
    assert r.status_code == 200, r.text
    s = r.json()["result"]["roles"]["ln_free"]["summary"]
    assert len(s["targets"]) == 1 and s["identity_max_rel_error"] < 1e-4


def test_circuit_diff_matches_nodes_and_reports_both_scores(client):
    r = post(client, "circuit-diff", {"pair": "local", "roles": ["original", "ln_free"], "prompts": [PROMPT],
                                      "options": {"max_n_logits": 2}})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    diff = result["diff"]
    assert diff["roles"] == ["original", "ln_free"]
    assert [s["role"] for s in diff["scores"]] == ["original", "ln_free"]
    assert diff["matched_nodes"], "token embeddings and logits always match"
    kinds = {m["kind"] for m in diff["matched_nodes"]}
    assert {"token", "logit"} <= kinds or {"embedding", "logit"} <= kinds
    assert 0.0 <= diff["node_jaccard"] <= 1.0
    # "only in a": kept in a's pruned circuit while the counterpart is unmatched, inactive or pruned in b
    by_a = {m["node_id_a"]: m for m in diff["matched_nodes"]}
    by_b = {m["node_id_b"]: m for m in diff["matched_nodes"]}
    for node in diff["only_a"]:
        assert (node["reason"] == "counterpart pruned") == (node["node_id"] in by_a)
        if node["node_id"] in by_a:
            assert by_a[node["node_id"]]["in_pruned_a"] and not by_a[node["node_id"]]["in_pruned_b"]
    for node in diff["only_b"]:
        if node["node_id"] in by_b:
            assert by_b[node["node_id"]]["in_pruned_b"] and not by_b[node["node_id"]]["in_pruned_a"]
    for m in diff["matched_nodes"]:
        if m["kind"] == "feature":
            assert -1.0 - 1e-6 <= m["decoder_cos"] <= 1.0 + 1e-6


def test_feature_page_over_get_and_post(client, cache, transcoder_dirs):
    r = client.get("/api/v1/features/local/ln_free/1/7")
    assert r.status_code == 200, r.text
    page = r.json()["result"]["roles"]["ln_free"]
    assert page["layer"] == 1 and page["feature"] == 7
    assert len(page["promoted"]) == 10 and len(page["suppressed"]) == 10
    assert page["promoted"][0]["value"] >= page["promoted"][-1]["value"]
    assert len(page["histogram"]["bin_edges"]) == len(page["histogram"]["counts"]) + 1
    # W_dec[f] @ W_U computed independently
    pair = PairRegistry.load().get("local")
    model = cache.get(pair.source("ln_free"), "ln_free", device="cpu", dtype="float32")
    tset = load_transcoders(transcoder_dirs["ln_free"], model=model)
    effects = (tset[1].W_dec[7].double() @ model.bridge.W_U.double()).detach()
    assert page["promoted"][0]["token_id"] == int(effects.argmax())
    assert page["promoted"][0]["value"] == pytest.approx(float(effects.max()), rel=1e-5)
    # the same page through POST, for two roles; the GET result is reused when asked again
    again = client.get("/api/v1/features/local/ln_free/1/7")
    assert again.json()["id"] == r.json()["id"] and again.json()["cached"] is True
    both = post(client, "feature",
                {"pair": "local", "roles": ["original", "ln_free"], "options": {"layer": 1, "feature": 7}})
    assert both.status_code == 200 and set(both.json()["result"]["roles"]) == {"original", "ln_free"}


@pytest.mark.parametrize(("kind", "body", "field"), [
    ("circuit", {"prompts": ["a", "b"]}, ["body", "prompts"]),
    ("circuit", {"task": {"name": "ioi"}}, ["body", "prompts"]),
    ("circuit", {"prompts": [PROMPT], "options": {"node_threshold": 0}}, ["body", "options", "node_threshold"]),
    ("circuit", {"prompts": [PROMPT], "options": {"target": {"kind": "logit", "token": " Mary Mary Mary"}}},
     ["body", "options", "target", "token"]),
    ("circuit-diff", {"roles": ["ln_free"], "prompts": [PROMPT]}, ["body", "roles"]),
    ("circuit-diff", {"roles": ["original", "ln_free", "control"], "prompts": [PROMPT]}, ["body", "roles"]),
    ("feature", {"options": {"layer": 0}}, ["body", "options", "feature"]),
    ("feature", {"prompts": [PROMPT], "options": {"layer": 0, "feature": 1}}, ["body", "prompts"]),
    ("feature", {"roles": ["ln_free"], "options": {"layer": 0, "feature": D_TC}}, ["body", "options", "feature"]),
    ("feature", {"roles": ["ln_free"], "options": {"layer": 7, "feature": 0}}, ["body", "options", "layer"]),
])
def test_bad_circuit_inputs_are_422_naming_the_field(client, kind, body, field):
    r = post(client, kind, {"pair": "local", **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    text = str(detail)
    assert ".".join(field[1:]) in text or any(list(d.get("loc", []))[: len(field)] == field for d in detail
                                              if isinstance(d, dict)), detail


def test_feature_route_errors(client):
    assert client.get("/api/v1/features/nope/ln_free/0/0").status_code == 404
    assert client.get("/api/v1/features/local/sideways/0/0").status_code == 404
    assert client.get("/api/v1/features/local/ln_free/-1/0").status_code == 422
    r = client.get(f"/api/v1/features/local/ln_free/0/{D_TC + 5}")
    assert r.status_code == 422 and "out of range" in r.text


def test_roles_without_transcoders_are_refused_up_front(trio_dirs, transcoder_dirs, tmp_path, cache):
    (tmp_path / "lnscope.toml").write_text(_toml(trio_dirs, transcoder_dirs, roles=("ln_free",)).replace(
        "[pairs.local.transcoders]", "[pairs.local.transcoders]\noriginal = \"./no/such/dir\""))
    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data"), registry=PairRegistry.load(),
                     cache=cache)
    with TestClient(app) as c:
        r = c.post("/api/v1/analyses/circuit", json={"pair": "local", "prompts": [PROMPT]})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "roles", 0] and "train-transcoders" in r.text
        r = c.get("/api/v1/features/local/control/0/0")
        assert r.status_code == 422 and "no transcoders" in r.text
        assert c.get("/api/v1/results").json()["total"] == 0


def test_retrained_transcoders_are_not_served_from_the_old_result(client, transcoder_dirs):
    first = client.get("/api/v1/features/local/control/0/3").json()
    layer0 = transcoder_dirs["control"] / "layer_0.safetensors"
    import os
    st = layer0.stat()
    os.utime(layer0, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = client.get("/api/v1/features/local/control/0/3").json()
    assert second["id"] != first["id"] and not second["cached"]
    assert second["result"]["roles"]["control"]["promoted"] == first["result"]["roles"]["control"]["promoted"]
    assert torch.isfinite(torch.tensor(second["result"]["roles"]["control"]["max_activation"]))


def test_circuit_diff_without_roles_compares_original_and_ln_free(client):
    r = post(client, "circuit-diff", {"pair": "local", "prompts": [PROMPT], "options": {"max_n_logits": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["diff"]["roles"] == ["original", "ln_free"]


def test_feature_index_next_to_a_single_transcoder_file_and_damaged_ones(tmp_path, transcoder_dirs):
    import shutil

    from lnscope.analysis.transcoders import FeatureIndex, TranscoderFormatError

    single = tmp_path / "transcoders.pt"
    single.write_bytes(b"not an index")
    with pytest.raises(TranscoderFormatError, match="no feature index"):
        FeatureIndex.load(single)
    shutil.copy(transcoder_dirs["ln_free"] / "feature_index.safetensors", tmp_path / "feature_index.safetensors")
    assert FeatureIndex.load(single).layers == [0, 1]  # the index beside the file
    (tmp_path / "feature_index.safetensors").write_bytes(b"damaged")
    with pytest.raises(TranscoderFormatError, match="cannot read the feature index"):
        FeatureIndex.load(tmp_path)
