"""Direct logit attribution against independent references (TL's cache, float64 maths, brute force)."""

from types import SimpleNamespace

import pytest
import torch

from lnscope.analysis.checks import CHECK_PROMPTS, tokenize_prompts
from lnscope.analysis.dla import DLAResult, DLATarget, bootstrap_nmae, dla
from lnscope.analysis.kinds import KINDS, Inputs
from lnscope.analysis.kinds.dla import DLAOptions
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.pipeline import run_units
from lnscope.analysis.progress import Cancelled, Progress

A, B = 5, 7  # target: logit(A) - logit(B)


def T(values):
    """A result's lists as a float64 tensor."""
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def models(trio_dirs):
    return {role: load_model(ModelSource(path=d), role, device="cpu", dtype="float64") for role, d in trio_dirs.items()}


@pytest.fixture(scope="module")
def batch(models):
    tokens, lengths = tokenize_prompts(models["original"].tokenizer, CHECK_PROMPTS, 64)
    return tokens, lengths


@pytest.fixture(scope="module")
def trio_result(models, batch):
    tokens, _ = batch
    inputs = Inputs(tokens=tokens, extra={"target": DLATarget.logit_diff(A, B)})
    return run_units(KINDS["dla"], models, inputs, DLAOptions(top_k_neurons=5, n_bootstrap=200))


def _end(result):
    return torch.tensor(result.end_pos)


def _gather(stack, end):
    """stack [n, batch, pos, d] -> [n, batch, d] at end[batch]."""
    return stack[:, torch.arange(stack.shape[1]), end]


def test_default_end_pos_is_the_last_real_token(trio_result, batch):
    _, lengths = batch
    for res in trio_result.roles.values():
        assert res.end_pos == (lengths - 1).tolist()


@torch.no_grad()
def test_cached_scale_equals_transformer_lens(models, batch, trio_result):
    """(a) TL: stack_head_results / stack_neuron_results + apply_ln_to_stack, dotted with residual directions."""
    loaded = models["original"]
    bridge, res = loaded.bridge, trio_result.roles["original"]
    tokens, _ = batch
    end = _end(res)
    _, cache = bridge.run_with_cache(tokens)
    dirs = bridge.tokens_to_residual_directions(torch.tensor([A, B]))  # [2, d_model]
    direction = dirs[0] - dirs[1]  # [d_model]
    heads = _gather(cache.apply_ln_to_stack(cache.stack_head_results(layer=-1), layer=-1), end)  # [L*H, b, d]
    ours = T(res.treatments["cached_scale"].heads_per_prompt)  # [b, L, H]
    ref = (heads @ direction).T.reshape(ours.shape)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # every component via logit_attrs (per prompt tokens, all positions), then read at end_pos
    comps = [cache["hook_embed"], cache["hook_pos_embed"]]
    for layer in range(bridge.cfg.n_layers):
        h = cache.stack_head_results(layer=layer + 1)[-bridge.cfg.n_heads:]
        comps += list(h) + [bridge.blocks[layer].attn.b_O.expand_as(cache["hook_embed"]),
                            cache[f"blocks.{layer}.hook_mlp_out"]]
    stack = torch.stack(comps)  # [n_comp, b, pos, d]
    n = tokens.shape[0]
    # [n_comp, b, pos]
    attrs = cache.logit_attrs(stack, tokens=torch.full((n,), A), incorrect_tokens=torch.full((n,), B))
    ref_all = attrs[:, torch.arange(n), end]  # [n_comp, b]
    torch.testing.assert_close(T(res.treatments["cached_scale"].per_prompt).T, ref_all, rtol=1e-10, atol=1e-10)
    # neurons
    # [L*d_mlp, b]
    neurons = _gather(cache.apply_ln_to_stack(cache.stack_neuron_results(layer=-1), layer=-1), end) @ direction
    d_mlp = bridge.cfg.d_mlp
    for top in res.treatments["cached_scale"].top_neurons:
        torch.testing.assert_close(T(top.per_prompt), neurons[top.layer * d_mlp + top.neuron], rtol=1e-10, atol=1e-10)
    best = neurons.mean(1).abs().topk(5).indices.tolist()
    assert [t.layer * d_mlp + t.neuron for t in res.treatments["cached_scale"].top_neurons] == best


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
@torch.no_grad()
def test_matches_a_float64_recomputation(trio_dirs, batch, dtype, tol):
    """(b) From hook_z, W_O, hook_post, W_out and resid_post, in float64 (float32: the two forwards
    differ by float32 rounding, so the tolerance is float32's)."""
    loaded = load_model(ModelSource(path=trio_dirs["original"]), "original", device="cpu", dtype=dtype)
    bridge, cfg = loaded.bridge, loaded.bridge.cfg
    tokens, lengths = batch
    res = dla(loaded, tokens, target=DLATarget.logit_diff(A, B), treatments=("cached_scale", "raw"),
              top_k_neurons=3, n_bootstrap=0)
    _, cache = bridge.run_with_cache(tokens)
    rows, end = torch.arange(tokens.shape[0]), lengths - 1
    d = (bridge.W_U[:, A] - bridge.W_U[:, B]).double()  # [d_model]
    resid = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"][rows, end].double()  # [b, d]
    xc = resid - resid.mean(-1, keepdim=True)
    scale = (xc.pow(2).mean(-1) + cfg.eps).sqrt()  # [b]
    for layer in range(cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, end].double()  # [b, H, d_head]
        out = torch.einsum("bhe,hed->bhd", z, bridge.blocks[layer].attn.W_O.double())  # [b, H, d]
        raw = out @ d  # [b, H]
        cent = (out - out.mean(-1, keepdim=True)) @ d / scale[:, None]
        torch.testing.assert_close(T(res.treatments["raw"].heads_per_prompt)[:, layer], raw, rtol=tol, atol=tol)
        torch.testing.assert_close(T(res.treatments["cached_scale"].heads_per_prompt)[:, layer], cent,
                                   rtol=tol, atol=tol)
    top = res.treatments["cached_scale"].top_neurons[0]
    post = cache[f"blocks.{top.layer}.mlp.hook_post"][rows, end, top.neuron].double()  # [b]
    w = bridge.blocks[top.layer].mlp.W_out[top.neuron].double()
    torch.testing.assert_close(T(top.per_prompt), post * ((w - w.mean()) @ d) / scale, rtol=tol, atol=tol)
    # with the scale frozen, the components sum to the actual logit difference
    assert res.treatments["cached_scale"].max_abs_sum_gap < 10 * tol
    assert "direct_effect" not in res.treatments and res.errors == {}


@torch.no_grad()
def test_direct_effect_equals_brute_force_removal(models, batch, trio_result):
    """(c) One forward per component, subtracting it from the residual stream before ln_final."""
    loaded = models["original"]
    bridge, res = loaded.bridge, trio_result.roles["original"]
    tokens, _ = batch
    end, rows = _end(res), torch.arange(tokens.shape[0])
    logits, cache = bridge.run_with_cache(tokens)

    def metric(lg):
        return lg[rows, end, A] - lg[rows, end, B]

    clean = metric(logits)
    heads = cache.stack_head_results(layer=-1)  # [L*H, b, pos, d]
    n_heads = bridge.cfg.n_heads
    comps = {"embed": cache["hook_embed"], "pos_embed": cache["hook_pos_embed"]}
    for layer in range(bridge.cfg.n_layers):
        for h in range(n_heads):
            comps[f"L{layer}H{h}"] = heads[layer * n_heads + h]
        comps[f"L{layer}b_O"] = bridge.blocks[layer].attn.b_O.expand_as(cache["hook_embed"])
        comps[f"L{layer}MLP"] = cache[f"blocks.{layer}.hook_mlp_out"]
    top = res.treatments["direct_effect"].top_neurons[:2]
    for t in top:
        comps[t.label] = (cache[f"blocks.{t.layer}.mlp.hook_post"][..., t.neuron, None]
                          * bridge.blocks[t.layer].mlp.W_out[t.neuron])
    assert set(res.labels) <= set(comps)
    de = T(res.treatments["direct_effect"].per_prompt).T  # [n_comp, b]
    for label, c in comps.items():
        removed = bridge.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_in", lambda act, hook, c=c: act - c)])
        brute = clean - metric(removed)
        ours = de[res.labels.index(label)] if label in res.labels else T(
            next(t.per_prompt for t in top if t.label == label))
        torch.testing.assert_close(ours, brute, rtol=0, atol=1e-6, msg=label)
    torch.testing.assert_close(T(res.target_value), clean)


def test_ln_free_dla_is_exact_and_treatments_coincide(trio_result):
    """(d) No scale: DLA == DE, the components + b_U term give the target, the treatments agree."""
    res = trio_result.roles["ln_free"]
    assert not res.has_ln and res.final_scale == "none"
    for err in res.errors.values():
        assert err.nmae.value < 1e-3 and err.nmae_heads.value < 1e-3
    assert res.treatments_max_abs_diff < 1e-10
    assert res.treatments["cached_scale"].per_prompt == res.treatments["raw"].per_prompt
    scale = max(abs(v) for v in res.target_value)
    for t in res.treatments.values():
        assert t.max_abs_sum_gap < 1e-10 * scale
    original = trio_result.roles["original"]
    assert original.has_ln and original.errors["cached_scale"].nmae.value > 1e-2
    assert original.treatments_max_abs_diff > 1e-3
    assert original.treatments["cached_scale"].max_abs_sum_gap < 1e-10
    assert original.treatments["raw"].max_abs_sum_gap > 1e-3


def test_result_tables_are_consistent(trio_result, models):
    res = trio_result.roles["original"]
    cfg = models["original"].bridge.cfg
    t = res.treatments["cached_scale"]
    heads = T(t.heads)
    assert heads.shape == (cfg.n_layers, cfg.n_heads)
    torch.testing.assert_close(heads, T(t.heads_per_prompt).mean(0))
    torch.testing.assert_close(T(t.attn_layer_totals), heads.sum(1) + T(t.attn_bias))
    err = res.errors["cached_scale"]
    assert [c.label for c in err.components] == res.labels
    assert err.nmae.n_components == len(res.labels) and err.nmae_heads.n_components == cfg.n_layers * cfg.n_heads
    diff = trio_result.head_diffs["ln_free - original"]["cached_scale"]
    expect = T(trio_result.roles["ln_free"].treatments["cached_scale"].heads) - heads
    torch.testing.assert_close(T(diff), expect)
    assert set(trio_result.head_diffs) == {"ln_free - original", "control - original"}
    assert trio_result.manifest.kind == "dla" and set(trio_result.manifest.roles) == set(models)


def test_bootstrap_ci_contains_the_estimate_and_is_seeded(trio_result):
    """(e)"""
    nmae = trio_result.roles["original"].errors["cached_scale"].nmae
    assert nmae.ci_low <= nmae.value <= nmae.ci_high
    gen = torch.Generator().manual_seed(1)
    err, de = (torch.rand(6, 40, generator=gen, dtype=torch.float64),
               torch.rand(6, 40, generator=gen, dtype=torch.float64))
    a = bootstrap_nmae(err, de, n_bootstrap=1000, seed=3, over="components")
    assert a == bootstrap_nmae(err, de, n_bootstrap=1000, seed=3, over="components")
    assert a != bootstrap_nmae(err, de, n_bootstrap=1000, seed=4, over="components")
    assert a.ci_low < a.value < a.ci_high
    assert a.value == pytest.approx(float(err.mean() / de.mean() * 100), rel=1e-12)


def test_json_round_trip(trio_result):
    """(f)"""
    text = trio_result.model_dump_json()
    assert DLAResult.model_validate_json(text) == trio_result


@torch.no_grad()
def test_task_metric_target_and_explicit_positions(models, batch):
    loaded = models["control"]
    tokens, lengths = batch
    answers = torch.tensor([[3, 4], [5, 6], [7, 8], [9, 10], [11, 12]])
    task = SimpleNamespace(answer_tokens=answers, end_pos=lengths - 2, name="toy")
    target = DLATarget.from_task(task)
    assert target.kind == "task_metric" and target.task == "toy"
    res = dla(loaded, tokens, target=target, top_k_neurons=0, n_bootstrap=50)
    assert res.end_pos == (lengths - 2).tolist()
    logits = loaded.bridge(tokens)
    rows = torch.arange(tokens.shape[0])
    end_logits = logits[rows, lengths - 2]
    metric = end_logits.gather(1, answers)[:, 0] - end_logits.gather(1, answers)[:, 1]
    torch.testing.assert_close(T(res.target_value), metric)
    assert res.treatments["cached_scale"].top_neurons == []
    # a single logit at a fixed position
    single = dla(loaded, tokens, target=DLATarget.logit(A), end_pos=3, treatments=("raw",), top_k_neurons=0)
    torch.testing.assert_close(T(single.target_value), logits[:, 3, A])
    with pytest.raises(ValueError):
        DLATarget(kind="task_metric", answer_tokens=[[1, 2, 3]])
    with pytest.raises(ValueError):
        dla(loaded, tokens, target=DLATarget.logit(A), treatments=("bogus",))


def test_progress_and_cancellation(models, batch):
    tokens, _ = batch
    seen = []
    dla(models["ln_free"], tokens[:2], target=DLATarget.logit(A), top_k_neurons=0, n_bootstrap=10,
        progress=Progress(on_progress=lambda s, f: seen.append((s, f))))
    assert seen and seen[-1][1] == 1.0 and all(0.0 <= f <= 1.0 for _, f in seen)
    with pytest.raises(Cancelled):
        dla(models["ln_free"], tokens[:2], target=DLATarget.logit(A), progress=Progress(should_cancel=lambda: True))
