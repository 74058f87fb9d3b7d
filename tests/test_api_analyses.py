"""The analysis kinds over HTTP: results equal the library's, errors name the field, and
concurrent clients get the same numbers as sequential runs."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from lnscope.analysis.checks import tokenize_prompts
from lnscope.analysis.dla import DLATarget, dla
from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.server.app import create_app
from lnscope.server.settings import Settings

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "When John and Mary went to the store, Mary gave a drink to",
    "The war lasted from the year 1732 to the year 17",
    "Once upon a time, a little dog found a red ball in the garden. The dog",
]


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture
def client(trio_dirs, tmp_path, cache):
    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n'
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
        f'control = {{ path = "{trio_dirs["control"]}" }}\n'
    )
    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data", workers=4),
                     registry=PairRegistry.load(), cache=cache)
    with TestClient(app) as c:
        yield c


def without_manifests(value):
    """A result's JSON without per-role manifests (a stored result has one manifest, for every role)."""
    if isinstance(value, dict):
        return {k: without_manifests(v) for k, v in value.items() if k != "manifest"}
    if isinstance(value, list):
        return [without_manifests(v) for v in value]
    return value


def dla_body(prompts=PROMPTS, token=" Mary", other=" John", **options):
    return {"pair": "local", "prompts": prompts,
            "options": {"target": {"kind": "logit_diff", "token": token, "other": other}, "n_bootstrap": 50, **options}}


def test_dla_over_http_equals_the_library_call(client, cache):
    r = client.post("/api/v1/analyses/dla?wait=true", json=dla_body())
    assert r.status_code == 200, r.text
    out = r.json()
    result = out["result"]
    assert set(result["roles"]) == {"original", "ln_free", "control"}
    assert out["manifest"]["kind"] == "dla" and out["manifest"]["pair"] == "local"
    assert out["manifest"]["roles"]["ln_free"]["ln_treatment"] == "removed"
    heads = result["roles"]["original"]["treatments"]["cached_scale"]["heads"]
    assert len(heads) == 2 and len(heads[0]) == 4
    assert result["roles"]["ln_free"]["errors"]["cached_scale"]["nmae"]["value"] < 1e-3
    assert result["roles"]["original"]["errors"]["cached_scale"]["nmae"]["value"] > 0

    app_state = client.app.state.lnscope
    models = {role: app_state.load_role(app_state.registry.get("local"), role)
              for role in ("original", "ln_free", "control")}
    tokenizer = models["original"].tokenizer
    tokens, lengths = tokenize_prompts(tokenizer, PROMPTS, 64)
    (mary,), (john,) = (tokenizer.encode(w, add_special_tokens=False) for w in (" Mary", " John"))
    target = DLATarget.logit_diff(mary, john)
    direct = {role: dla(model, tokens, target=target, end_pos=lengths - 1, n_bootstrap=50, seed=0)
              for role, model in models.items()}
    assert ({role: without_manifests(r.model_dump(mode="json")) for role, r in direct.items()}
            == without_manifests(result["roles"]))


def test_ln_stats_loss_and_confidence_neurons(client):
    stats = client.post("/api/v1/analyses/ln-stats?wait=true", json={"pair": "local", "prompts": PROMPTS[:2]})
    assert stats.status_code == 200, stats.text
    roles = stats.json()["result"]["roles"]
    assert roles["original"]["has_ln"] and not roles["ln_free"]["has_ln"]

    loss = client.post("/api/v1/analyses/loss?wait=true", json={"pair": "local", "options": {"n_bootstrap": 20}})
    assert loss.status_code == 200, loss.text
    table = loss.json()["result"]["table"]
    assert [row["role"] for row in table] == ["original", "control", "ln_free"]
    custom = client.post("/api/v1/analyses/loss?wait=true", json={"pair": "local", "text": ["The dog found a ball."]})
    assert custom.status_code == 200 and custom.json()["inputs"]["text"] == ["The dog found a ball."]

    neurons = client.post("/api/v1/analyses/confidence-neurons?wait=true",
                          json={"pair": "local", "options": {"candidates": ["1.3", "1.17"], "max_tokens": 256}})
    assert neurons.status_code == 200, neurons.text
    by_role = neurons.json()["result"]["roles"]
    assert {n["neuron"] for n in by_role["ln_free"]["neurons"]} == {"1.3", "1.17"}
    for n in by_role["ln_free"]["neurons"]:
        assert abs(n["ln_mediated_fraction_loss"] or 0.0) < 1e-6


@pytest.mark.parametrize(
    "kind, payload, field",
    [
        ("dla", dla_body(token=" Paris"), "token"),
        ("dla", dla_body(other=None), "other"),
        ("dla", {"pair": "local", "prompts": PROMPTS}, "target"),
        ("dla", dla_body(treatments=["psychic"]), "treatments"),
        ("dla", dla_body(n_bootstrap=-1), "n_bootstrap"),
        ("dla", {**dla_body(), "task": {"name": "ioi"}}, "prompts or task"),
        ("dla", {"pair": "local", "task": {"name": "ioi"}}, "task"),
        ("dla", {"pair": "local", "task": {"name": "custom"}}, "pairs"),
        ("loss", {"pair": "local", "prompts": ["a b"]}, "text"),
        ("confidence-neurons", {"pair": "local", "options": {"candidates": ["eleven"]}}, "candidates"),
        ("confidence-neurons", {"pair": "local", "options": {"candidates": ["9.1"]}}, "layer"),
    ],
)
def test_bad_analysis_inputs_are_422_naming_the_field(client, kind, payload, field):
    r = client.post(f"/api/v1/analyses/{kind}?wait=true", json=payload)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_eight_concurrent_clients_get_the_numbers_of_sequential_runs(client):
    bodies = [dla_body(prompts=[PROMPTS[i % 4], PROMPTS[(i + 1) % 4]], token=tok, other=oth)
              for i, (tok, oth) in enumerate([(" Mary", " John"), (" John", " Mary")] * 4)]
    for b, seed in zip(bodies, range(8)):
        b["seed"] = seed  # distinct requests: no result is shared through the store
    sequential = [client.post("/api/v1/analyses/dla?wait=true&timeout=120", json=b).json()["result"] for b in bodies]

    def submit(b):
        b = {**b, "seed": b["seed"] + 100}
        return client.post("/api/v1/analyses/dla?wait=true&timeout=120", json=b).json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(submit, bodies))
    for seq, con in zip(sequential, concurrent):
        assert con["status"] == "done"
        for role in ("original", "ln_free", "control"):
            a, b = seq["roles"][role], con["result"]["roles"][role]
            assert a["treatments"] == b["treatments"] and a["target_value"] == b["target_value"]


IOI_PAIRS = [
    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Mary and John went to the store, Mary gave a drink to", "correct": " Mary", "wrong": " John"},
    {"clean": "When John and Mary went to the store, Mary gave a drink to",
     "corrupt": "When John and Mary went to the store, John gave a drink to", "correct": " John", "wrong": " Mary"},
]


def test_patching_kinds_over_http_equal_the_library(client):
    from lnscope.analysis.patching import activation_patching
    from lnscope.analysis.tasks import make_custom

    task = {"name": "custom", "pairs": IOI_PAIRS}
    atp = client.post("/api/v1/analyses/attribution-patching?wait=true&timeout=120",
                      json={"pair": "local", "roles": ["ln_free"], "task": task, "options": {"nodes": ["head", "mlp"]}})
    assert atp.status_code == 200, atp.text
    maps = atp.json()["result"]["roles"]["ln_free"]["atp"]
    assert {m for m in maps} >= {"head", "mlp"}

    act = client.post("/api/v1/analyses/activation-patching?wait=true&timeout=120",
                      json={"pair": "local", "task": task, "options": {"nodes": ["resid_pre", "head"]}})
    assert act.status_code == 200, act.text
    state = client.app.state.lnscope
    models = {r: state.load_role(state.registry.get("local"), r) for r in ("original", "ln_free", "control")}
    batch = make_custom(models["original"].tokenizer, IOI_PAIRS)
    direct = {role: activation_patching(model, batch.clean_tokens, batch.corrupt_tokens, batch, ["resid_pre", "head"])
              for role, model in models.items()}
    assert {role: without_manifests(r.model_dump(mode="json")) for role, r in direct.items()} \
        == without_manifests(act.json()["result"]["roles"])

    fid = client.post("/api/v1/analyses/patching-fidelity?wait=true&timeout=120",
                      json={"pair": "local", "roles": ["original", "ln_free"], "task": task,
                            "options": {"nodes": ["head"], "group_size": 1, "n_bootstrap": 20}})
    assert fid.status_code == 200, fid.text
    summaries = fid.json()["result"]["roles"]["ln_free"]["summaries"]
    assert {(s["statistic"], s["method"]) for s in summaries} >= {("pearson", "atp"), ("top_k_recall", "atp_star")}
    assert client.post("/api/v1/analyses/activation-patching",
                       json={"pair": "local", "prompts": ["a"]}).status_code == 422
