"""The `intervene` kind against independent references: plain Hugging Face hooks, DLA, recomputed means."""

import json
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2LMHeadModel

from lnscope.analysis.checks import tokenize_prompts
from lnscope.analysis.dla import DLATarget, dla
from lnscope.analysis.eval_text import PACKAGED, split_documents
from lnscope.analysis.interventions.edits import AblateHead
from lnscope.analysis.interventions.means import MEAN_TOKENS, cached_means
from lnscope.analysis.interventions.resolve import FeatureMatch, ModelParts, resolve_head
from lnscope.analysis.interventions.sites import Batch, Sources
from lnscope.analysis.kinds import KINDS, Inputs, Limits, RequestError
from lnscope.analysis.kinds.circuits import pair_feature_matching
from lnscope.analysis.kinds.intervene import IntervenOptions, absolute_positions, prepare
from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource, PairSpec
from lnscope.analysis.pipeline import prepare_run, run_units
from lnscope.analysis.requests import AnalysisRequest
from lnscope.analysis.transcoders.formats import cached_transcoders_for
from tests.transcoder_fixtures import build_transcoders

ROLES = ("original", "ln_free", "control")
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The war lasted from the year 1732 to the year 17",
    "Once upon a time, a little dog found a red ball in the garden. The dog",
]
TARGET = {"kind": "logit_diff", "token": " Mary", "other": " John"}
D_HEAD = 16
EXACT = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def models(trio_dirs):
    return {role: load_model(ModelSource(path=d), role, device="cpu", dtype="float64") for role, d in trio_dirs.items()}


@pytest.fixture(scope="module")
def pair(trio_dirs, tmp_path_factory):
    dirs = build_transcoders(trio_dirs, tmp_path_factory.mktemp("transcoders"))
    return PairSpec(name="iv", original=ModelSource(path=trio_dirs["original"]),
                    ln_free=ModelSource(path=trio_dirs["ln_free"]), control=ModelSource(path=trio_dirs["control"]),
                    transcoders=dirs)


def run(models, pair, edits, roles=ROLES, prompts=PROMPTS, task=None, **options):
    """The kind through prepare_run and run_units, as the API runs it."""
    body = {"target": TARGET, **options, "edits": edits} if task is None else {**options, "edits": edits}
    request = AnalysisRequest(pair=pair.name, roles=list(roles), options=body,
                              **({"task": task} if task is not None else {"prompts": prompts}))
    prepared = prepare_run("intervene", request, pair, Limits())
    return run_units(KINDS["intervene"], {r: models[r] for r in roles}, prepared.inputs, prepared.options, pair=pair)


def tokens_of(models, prompts=PROMPTS):
    return tokenize_prompts(models["original"].tokenizer, prompts, 64)  # [b, pos], [b]


def token_id(models, text):
    (i,) = models["original"].tokenizer.encode(text, add_special_tokens=False)
    return i


# -- independent references ------------------------------------------------------------------------
class LinearLayerNorm(torch.nn.Module):
    """The LN-free checkpoint's LayerNorm made exactly linear: (x - mean(x)) * weight / sqrt(eps) + bias."""

    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.root_eps = norm.weight, norm.bias, math.sqrt(norm.eps)

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight / self.root_eps + self.bias


def hf_reference(path, role):
    """The plain Hugging Face model in float64 (the LN-free one with its LayerNorms linear, as released)."""
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float64).eval()
    if role == "ln_free":
        for parent in list(hf.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.LayerNorm):
                    setattr(parent, name, LinearLayerNorm(child))
    return hf


def value_bias(hf, layer, head):
    """The head's value bias after ln_1 is folded in: b_ln1 W_V + b_V ([d_head]); TL folds it into b_O."""
    block, d = hf.transformer.h[layer], hf.config.n_embd
    cols = slice(2 * d + head * D_HEAD, 2 * d + (head + 1) * D_HEAD)
    return block.ln_1.bias @ block.attn.c_attn.weight[:, cols] + block.attn.c_attn.bias[cols]


@torch.no_grad()
def hf_head_zeroed(hf, tokens, layer, head, positions=None):
    """Logits with the head's z W_O removed: its slice of c_proj's input set to its value bias (the part of the
    head's output that TL's value-bias folding keeps in b_O)."""
    bias = value_bias(hf, layer, head)
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)

    def pre(module, args):
        x = args[0].clone()
        where = slice(None) if positions is None else positions
        x[:, where, cols] = bias
        return (x,)

    handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)
    try:
        return hf(tokens).logits
    finally:
        handle.remove()


def centred(logits):
    return logits - logits.mean(-1, keepdim=True)


def metric_of(logits, end, a, b):
    rows = torch.arange(logits.shape[0])
    return logits[rows, end, a] - logits[rows, end, b]


# -- exactness against references ----------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("positions", ["all", 2])
def test_zero_head_equals_hugging_face_hooks(models, pair, trio_dirs, role, positions):
    layer, head = 1, 2
    result = run(models, pair, [{"type": "ablate_head", "layer": layer, "head": head, "positions": positions}],
                 roles=[role])
    tokens, lengths = tokens_of(models)
    hf = hf_reference(trio_dirs[role], role)
    clean = hf(tokens).logits
    edited = hf_head_zeroed(hf, tokens, layer, head, None if positions == "all" else positions)
    a, b = token_id(models, " Mary"), token_id(models, " John")
    r = result.roles[role]
    end = lengths - 1
    assert (centred(edited) - centred(clean)).abs().max() > 1e-3  # the head matters
    torch.testing.assert_close(torch.tensor([p.metric_clean for p in r.prompts], dtype=torch.float64),
                               metric_of(clean, end, a, b), **EXACT)
    torch.testing.assert_close(torch.tensor([p.metric_intervened for p in r.prompts], dtype=torch.float64),
                               metric_of(edited, end, a, b), **EXACT)
    rows = torch.arange(len(end))
    hf_top = edited[rows, end].softmax(-1).max(-1)
    assert [p.intervened_top[0].token_id for p in r.prompts] == hf_top.indices.tolist()
    torch.testing.assert_close(torch.tensor([p.intervened_top[0].prob for p in r.prompts], dtype=torch.float64),
                               hf_top.values, **EXACT)
    # the bridge's whole logits under the same hooks, every real position (compat mode centres the unembedding)

    edit = AblateHead(type="ablate_head", layer=layer, head=head, positions=positions)
    absolute = absolute_positions(positions, end.tolist(), ["x"])
    hooks = resolve_head(0, edit, _parts(models[role]), absolute).hooks(
        Batch(rows=torch.arange(len(end)), width=tokens.shape[1]), Sources(), torch.device("cpu"))
    ours = models[role].bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    real = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(centred(ours)[real], centred(edited)[real], **EXACT)


def _parts(model):
    """What resolving a head edit reads of a model (no transcoders)."""
    return ModelParts(model=model, transcoders=lambda: None, match=lambda layer, f: FeatureMatch(f))


def test_direct_path_head_ablation_is_minus_its_dla(models, pair):
    layer, head = 0, 1
    edit = {"type": "ablate_head", "layer": layer, "head": head, "scope": "direct"}
    result = run(models, pair, [edit], roles=["original", "ln_free"])
    tokens, lengths = tokens_of(models)
    target = DLATarget.logit_diff(token_id(models, " Mary"), token_id(models, " John"))
    for role in ("ln_free", "original"):
        ref = dla(models[role], tokens, target=target, end_pos=lengths - 1, treatments=["cached_scale"],
                  top_k_neurons=0, n_bootstrap=0)
        minus_dla = -torch.tensor(ref.treatments["cached_scale"].heads_per_prompt, dtype=torch.float64)[:, layer, head]
        effect = result.roles[role].edits[0]
        torch.testing.assert_close(torch.tensor(effect.predicted, dtype=torch.float64), minus_dla, **EXACT)
        if role == "ln_free":
            torch.testing.assert_close(torch.tensor(effect.actual, dtype=torch.float64), minus_dla, **EXACT)
            assert max(abs(g) for g in effect.prediction_gap) < 1e-9
        else:
            assert max(abs(g) for g in effect.prediction_gap) > 1e-6  # ln_final's scale moves with the residual
    diff = result.differences["ln_free - original"].edits[0]
    assert diff.prediction_gap == pytest.approx(result.roles["ln_free"].edits[0].mean_gap
                                                - result.roles["original"].edits[0].mean_gap)


@torch.no_grad()
def test_mean_ablation_uses_the_eval_text_mean(models, pair):
    layer, neuron = 0, 3
    result = run(models, pair, [{"type": "ablate_neuron", "layer": layer, "neuron": neuron, "how": "mean"}],
                 roles=["original"])
    model = models["original"]
    hook = f"blocks.{layer}.mlp.hook_post"
    # independently: every real token of the packaged text's BOS-prefixed 64-token chunks
    seqs = text_sequences(model.tokenizer, split_documents(PACKAGED.read_text()), 64, max_tokens=MEAN_TOKENS)
    acts = [model.bridge.run_with_cache(torch.tensor([s]), names_filter=[hook])[1][hook][0] for s in seqs]
    mean = torch.cat(acts).mean(0)  # [d_mlp]
    torch.testing.assert_close(cached_means(model, [hook], list, "pair:iv", 64)[hook], mean, rtol=1e-12, atol=1e-12)
    tokens, lengths = tokens_of(models)

    def set_mean(post, hook):
        post = post.clone()
        post[:, :, neuron] = mean[neuron]
        return post

    logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, set_mean)])
    expected = metric_of(logits, lengths - 1, token_id(models, " Mary"), token_id(models, " John"))
    got = torch.tensor([p.metric_intervened for p in result.roles["original"].prompts], dtype=torch.float64)
    torch.testing.assert_close(got, expected, **EXACT)


# -- identities -------------------------------------------------------------------------------------
def _assert_clean(role_result):
    for p in role_result.prompts:
        assert p.metric_intervened == pytest.approx(p.metric_clean, abs=1e-10)
        assert abs(p.kl) < 1e-12
        assert [t.token_id for t in p.intervened_top] == [t.token_id for t in p.clean_top]


@pytest.mark.parametrize("direction", [{"logit": " Mary"}, {"neuron": [0, 5]}, {"feature": [1, 7]},
                                       {"vector": [1.0] * 64}])
def test_steering_with_alpha_zero_is_the_clean_run(models, pair, direction):
    result = run(models, pair, [{"type": "steer", "layer": 1, "alpha": 0.0, "direction": direction}])
    for role_result in result.roles.values():
        _assert_clean(role_result)


def test_steering_moves_the_metric_along_the_logit_direction(models, pair):
    """Steering at the last residual (resid_post of the last layer) of an LN-free model: exactly alpha u . d."""
    edit = {"type": "steer", "layer": 1, "site": "resid_post", "alpha": 3.0, "direction": {"logit": " Mary"},
            "positions": -1}
    effect = run(models, pair, [edit], roles=["ln_free"]).roles["ln_free"].edits[0]
    torch.testing.assert_close(torch.tensor(effect.actual), torch.tensor(effect.predicted), **EXACT)
    assert min(effect.actual) > 0


@torch.no_grad()
def test_setting_a_feature_to_its_own_activation_is_the_clean_run(models, pair):
    layer, feature, position = 1, 7, 4
    model = models["ln_free"]
    tc = cached_transcoders_for(pair, "ln_free", model)[layer]
    tokens, _ = tokens_of(models, PROMPTS[:1])
    _, cache = model.bridge.run_with_cache(tokens, names_filter=[f"blocks.{layer}.mlp.hook_in"])
    own = float(tc.encode(cache[f"blocks.{layer}.mlp.hook_in"])[0, position, feature])
    edits = [{"type": "feature", "layer": layer, "feature": feature, "set": own, "positions": position},
             {"type": "feature", "layer": layer, "feature": feature, "scale": 1.0}]
    _assert_clean(run(models, pair, edits, roles=["ln_free"], prompts=PROMPTS[:1]).roles["ln_free"])


def test_feature_off_at_the_last_layer_is_its_direct_effect(models, pair):
    """Last layer, end position only, LN-free: the change is all direct, (0 - a) W_dec[f] . d exactly."""
    edit = {"type": "feature", "layer": 1, "feature": 7, "scale": 0.0, "positions": -1}
    result = run(models, pair, [edit])
    effect = result.roles["ln_free"].edits[0]
    torch.testing.assert_close(torch.tensor(effect.actual), torch.tensor(effect.predicted), **EXACT)
    assert result.lead == "original"
    assert result.roles["original"].edits[0].feature == 7 and result.roles["original"].edits[0].match_cos is None
    for role in ("ln_free", "control"):
        matching = pair_feature_matching(pair, "original", role)
        e = result.roles[role].edits[0]
        assert e.feature == matching.match(1, 7)
        assert e.match_cos == pytest.approx(float(matching.cos[1][7]))


def test_every_edit_runs_together_and_alone(models, pair):
    edits = [{"type": "ablate_head", "layer": 0, "head": 0, "what": "pattern_uniform"},
             {"type": "ablate_head", "layer": 1, "head": 3, "what": "pattern_bos", "positions": [1, -1]},
             {"type": "ablate_neuron", "layer": 1, "neuron": 10, "positions": -2},
             {"type": "ablate_mlp", "layer": 0, "how": "mean"},
             {"type": "ablate_resid", "layer": 1, "positions": [0]},
             {"type": "steer", "layer": 0, "alpha": 2.0, "direction": {"neuron": [1, 2]}}]
    result = run(models, pair, edits, continuation_tokens=3, top_k=5)
    for r in result.roles.values():
        assert [e.index for e in r.edits] == list(range(len(edits)))
        assert all(len(p.clean_top) == 5 and p.kl >= -1e-12 for p in r.prompts)
        assert all(p.continuation_clean is not None and p.continuation_intervened is not None for p in r.prompts)
        assert any(abs(p.metric_change) > 1e-6 for p in r.prompts)
    assert set(result.differences) == {"ln_free - original", "control - original"}


def test_resample_ablation_reads_the_corrupt_prompt(models, pair):
    task = {"name": "custom", "pairs": [
        {"clean": "When Mary and John went to the store, John gave a drink to",
         "corrupt": "When Mary and John went to the store, Mary gave a drink to", "correct": " Mary",
         "wrong": " John"}]}
    result = run(models, pair, [{"type": "ablate_resid", "layer": 0, "how": "resample"}], roles=["original"],
                 task=task)
    p = result.roles["original"].prompts[0]
    corrupt = run(models, pair, [{"type": "ablate_resid", "layer": 0, "how": "resample"}], roles=["original"],
                  task={"name": "custom", "pairs": [{**task["pairs"][0], "clean": task["pairs"][0]["corrupt"]}]})
    # every position of resid_pre 0 from the corrupt prompt: the intervened run is the corrupt run
    assert p.metric_intervened == pytest.approx(corrupt.roles["original"].prompts[0].metric_clean, abs=1e-9)


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "loc"), [
    ({"type": "ablate_head", "layer": 5, "head": 0}, ["layer"]),
    ({"type": "ablate_head", "layer": 0, "head": 4}, ["head"]),
    ({"type": "ablate_neuron", "layer": 0, "neuron": 256}, ["neuron"]),
    ({"type": "feature", "layer": 0, "feature": 96, "scale": 0.0}, ["feature"]),
    ({"type": "ablate_mlp", "layer": 0, "positions": 40}, ["positions"]),
    ({"type": "ablate_mlp", "layer": 0, "positions": [1, -40]}, ["positions", 1]),
    ({"type": "ablate_mlp", "layer": 0, "how": "resample"}, ["how"]),
    ({"type": "feature", "layer": 0, "feature": 1, "set": 1.0, "scale": 2.0}, ["set"]),
    ({"type": "feature", "layer": 0, "feature": 1}, ["scale"]),
    ({"type": "steer", "layer": 0, "alpha": 1.0, "direction": {"vector": [1.0, 2.0]}}, ["direction", "vector"]),
    ({"type": "steer", "layer": 0, "alpha": 1.0, "direction": {"neuron": [0, 999]}}, ["direction", "neuron", 1]),
    ({"type": "ablate_head", "layer": 0, "head": 0, "what": "pattern_bos", "scope": "direct"}, ["scope"]),
])
def test_bad_edits_are_request_errors_naming_the_field(models, pair, edit, loc):
    with pytest.raises(RequestError) as err:
        run(models, pair, [{"type": "ablate_mlp", "layer": 0}, edit], roles=["original"])
    assert err.value.loc == ["body", "options", "edits", 1, *loc], err.value


def test_alpha_not_finite_is_refused(models):
    with pytest.raises(ValidationError) as err:
        IntervenOptions.model_validate({"edits": [{"type": "steer", "layer": 0, "alpha": math.inf,
                                                   "direction": {"logit": " Mary"}}]})
    assert ("edits", 0, "steer", "alpha") in [e["loc"] for e in err.value.errors()]
    options = IntervenOptions.model_validate({"target": TARGET, "edits": [
        {"type": "steer", "layer": 0, "alpha": 1.0, "direction": {"logit": " Mary"}}]})
    options.edits[0].alpha = math.nan  # past validation (a programmatic caller): prepare refuses it
    tokens, lengths = tokens_of(models)
    with pytest.raises(RequestError) as caught:
        prepare(options, Inputs(tokens=tokens, end_pos=lengths - 1), models["original"].tokenizer, Limits(), 64)
    assert caught.value.loc == ["body", "options", "edits", 0, "alpha"]


def test_cost_counts_passes_per_edit_and_continuation(models, pair):
    request = AnalysisRequest(pair="iv", prompts=PROMPTS, options={
        "target": TARGET, "continuation_tokens": 4,
        "edits": [{"type": "ablate_mlp", "layer": 0}, {"type": "ablate_neuron", "layer": 0, "neuron": 1}]})
    prepared = prepare_run("intervene", request, pair, Limits())
    assert prepared.cost.forward_passes == 3 * (1 + 2 + 1 + 2 * 4)


# -- over HTTP --------------------------------------------------------------------------------------
@pytest.fixture
def client(trio_dirs, pair, tmp_path):
    from fastapi.testclient import TestClient

    from lnscope.analysis.loading import ModelCache
    from lnscope.analysis.pairs import PairRegistry
    from lnscope.server.app import create_app
    from lnscope.server.settings import Settings

    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n'
        + "".join(f'{role} = {{ path = "{trio_dirs[role]}" }}\n' for role in ROLES)
        + "[pairs.local.transcoders]\n" + "".join(f'{role} = "{pair.transcoders[role]}"\n' for role in ROLES))
    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data", workers=2),
                     registry=PairRegistry.load(), cache=ModelCache())
    with TestClient(app) as c:
        yield c


def test_intervene_over_http(client):
    body = {"pair": "local", "prompts": PROMPTS, "options": {"target": TARGET, "edits": [
        {"type": "ablate_head", "layer": 0, "head": 1, "scope": "direct"},
        {"type": "feature", "layer": 1, "feature": 7, "scale": 0.0},
        {"type": "steer", "layer": 1, "alpha": 1.5, "direction": {"logit": " Mary"}, "positions": -1}]}}
    r = client.post("/api/v1/analyses/intervene?wait=true", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert set(result["roles"]) == set(ROLES)
    assert max(abs(g) for g in result["roles"]["ln_free"]["edits"][0]["prediction_gap"]) < 1e-4  # float32
    assert result["roles"]["control"]["edits"][1]["match_cos"] is not None
    bad = {**body, "options": {**body["options"], "edits": [{"type": "ablate_mlp", "layer": 0, "positions": 99}]}}
    r = client.post("/api/v1/analyses/intervene?wait=true", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "options", "edits", 0, "positions"]
    bad["options"]["edits"] = [{"type": "ablate_head", "layer": 0, "head": 9}]
    r = client.post("/api/v1/analyses/intervene?wait=true", json=bad)
    assert r.status_code == 422 and "edits.0.head" in r.text, r.text
    raw = json.dumps({**body, "options": {**body["options"], "edits": [
        {"type": "steer", "layer": 0, "alpha": float("inf"), "direction": {"logit": " Mary"}}]}})
    r = client.post("/api/v1/analyses/intervene?wait=true", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "alpha" in r.text, r.text
