"""Confidence neurons against independent references: numpy SVD, brute-force hooked forwards."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lnscope.analysis.checks import tokenize_prompts
from lnscope.analysis.confidence_neurons import (
    KNOWN_ENTROPY_NEURONS,
    ConfidenceModelResult,
    ConfidenceNeuronsError,
    ConfidenceResult,
    confidence_neurons,
    default_candidates,
    neuron_ablation_effects,
    parse_neuron,
    top_candidate,
    weight_statistics,
)
from lnscope.analysis.kinds import KINDS, Inputs
from lnscope.analysis.kinds.confidence import ConfidenceOptions
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.pipeline import run_units
from lnscope.analysis.progress import Progress
from tests.checkpoints import TEXT

NEURONS = [3, 17, 100, 255]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors on shared cores: one thread is several times faster than many."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trio64(trio_dirs):
    return {role: load_model(ModelSource(path=path), role, device="cpu", dtype="float64")
            for role, path in trio_dirs.items()}


@pytest.fixture(scope="module")
def sample(trio64):
    return tokenize_prompts(trio64["original"].tokenizer, TEXT, 64)  # (tokens [5, p], lengths [5])


def scored_mask(tokens, lengths):
    return torch.arange(tokens.shape[1])[None, :] < (lengths[:, None] - 1)


def token_metrics(logits, tokens, lengths):
    """(CE [t], entropy [t]) of the scored positions, straight from full logits."""
    mask = scored_mask(tokens, lengths)
    lp = logits.log_softmax(-1)
    targets = torch.roll(tokens, -1, dims=1)
    loss = -lp.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return loss[mask], entropy[mask]


def mean_post(bridge, tokens, lengths, layer):
    name = f"blocks.{layer}.mlp.hook_post"
    _, cache = bridge.run_with_cache(tokens, names_filter=[name])
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return cache[name][real].mean(0)  # [d_mlp]


def test_weight_statistics_match_numpy(trio64):
    model = trio64["original"]
    layer, k = 1, 3
    weights, bottom = weight_statistics(model, layer, k)
    w_out = model.bridge.blocks[layer].mlp.W_out.detach().numpy().astype(np.float64)
    w_u = model.bridge.W_U.detach().numpy().astype(np.float64)
    u, s, _ = np.linalg.svd(w_u, full_matrices=False)
    proj = w_out @ u[:, -k:]
    rho = np.linalg.norm(proj, axis=1) / np.linalg.norm(w_out, axis=1)
    cos = (w_out / np.linalg.norm(w_out, axis=1, keepdims=True)) @ (w_u / np.linalg.norm(w_u, axis=0, keepdims=True))
    np.testing.assert_allclose(weights.rho, rho, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weights.logit_var, cos.var(axis=1), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(weights.w_out_norm, np.linalg.norm(w_out, axis=1), rtol=1e-12)
    np.testing.assert_allclose(bottom, s[-k:], rtol=1e-9, atol=1e-12)


@torch.no_grad()
def test_total_and_direct_equal_brute_force_on_last_layer(trio64, sample):
    model = trio64["original"]
    bridge = model.bridge
    tokens, lengths = sample
    layer = bridge.cfg.n_layers - 1
    post = f"blocks.{layer}.mlp.hook_post"
    # small chunks so several neuron x token blocks are exercised
    eff = neuron_ablation_effects(model, tokens, NEURONS, layer=-1, lengths=lengths, chunk_size=37, batch_size=2)
    mean = mean_post(bridge, tokens, lengths, layer)
    clean_logits, cache = bridge.run_with_cache(tokens, names_filter=["ln_final.hook_scale"])
    clean_scale = cache["ln_final.hook_scale"]
    loss0, ent0 = token_metrics(clean_logits, tokens, lengths)
    torch.testing.assert_close(eff.loss, loss0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eff.entropy, ent0, rtol=0, atol=1e-10)
    for j, n in enumerate(NEURONS):
        def ablate(act, hook, n=n):
            act = act.clone()
            act[..., n] = mean[n]
            return act

        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(post, ablate)])
        loss, ent = token_metrics(logits, tokens, lengths)
        torch.testing.assert_close(eff.dloss_total[j], loss - loss0, rtol=0, atol=1e-6)
        torch.testing.assert_close(eff.dentropy_total[j], ent - ent0, rtol=0, atol=1e-6)

        with warnings.catch_warnings():  # the bridge warns when a hook edits the LN scale
            warnings.simplefilter("ignore")
            logits = bridge.run_with_hooks(tokens, fwd_hooks=[
                (post, ablate), ("ln_final.hook_scale", lambda s, hook: clean_scale.clone())])
        loss, ent = token_metrics(logits, tokens, lengths)
        torch.testing.assert_close(eff.dloss_direct[j], loss - loss0, rtol=0, atol=1e-6)
        torch.testing.assert_close(eff.dentropy_direct[j], ent - ent0, rtol=0, atol=1e-6)
        assert (eff.dloss_total[j] - eff.dloss_direct[j]).abs().max() > 1e-6  # LN matters here


@torch.no_grad()
def test_propagate_on_earlier_layer_equals_brute_force(trio64, sample):
    model = trio64["original"]
    bridge = model.bridge
    tokens, lengths = sample
    post = "blocks.0.mlp.hook_post"
    eff = neuron_ablation_effects(model, tokens, [5, 42], layer=0, lengths=lengths, propagate=True)
    mean = mean_post(bridge, tokens, lengths, 0)
    loss0, ent0 = token_metrics(bridge(tokens), tokens, lengths)
    for j, n in enumerate([5, 42]):
        def ablate(act, hook, n=n):
            act = act.clone()
            act[..., n] = mean[n]
            return act

        loss, ent = token_metrics(bridge.run_with_hooks(tokens, fwd_hooks=[(post, ablate)]), tokens, lengths)
        torch.testing.assert_close(eff.dloss_total[j], loss - loss0, rtol=0, atol=1e-6)
        torch.testing.assert_close(eff.dentropy_total[j], ent - ent0, rtol=0, atol=1e-6)
    # on the last layer the re-run and the direct-to-final-residual ablation agree
    a = neuron_ablation_effects(model, tokens, NEURONS[:2], lengths=lengths, propagate=True)
    b = neuron_ablation_effects(model, tokens, NEURONS[:2], lengths=lengths)
    for key in ("dloss_total", "dloss_direct", "dentropy_total", "dentropy_direct"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=1e-9)


@torch.no_grad()
def test_ln_free_fraction_is_zero_and_original_is_not(trio64, sample):
    tokens, lengths = sample
    pair = {role: trio64[role] for role in ("original", "ln_free")}
    roles = {role: confidence_neurons(model, tokens, lengths=lengths, candidates="all", chunk_size=4096)
             for role, model in pair.items()}
    free = roles["ln_free"]
    assert not free.has_final_scale and roles["original"].has_final_scale
    assert len(free.neurons) == free.d_mlp
    for row in free.neurons:
        assert row.abs_dloss_total == row.abs_dloss_direct and row.dloss_total == row.dloss_direct
        assert row.abs_dentropy_total == row.abs_dentropy_direct
        assert abs(row.ln_mediated_fraction_loss) < 1e-9
        assert abs(row.ln_mediated_fraction_entropy) < 1e-9
    fractions = [abs(r.ln_mediated_fraction_loss) for r in roles["original"].neurons]
    assert max(fractions) > 1e-3
    for res in roles.values():
        assert res.clean_logit_rel_error < 1e-10
        assert [r.rank for r in res.neurons] == list(range(1, len(res.neurons) + 1))
        totals = [r.abs_dloss_total for r in res.neurons]
        assert totals == sorted(totals, reverse=True)
    top = top_candidate(roles, "original")
    assert set(top.by_role) == set(pair) and top.from_role == "original"
    assert top.by_role["ln_free"].ln_mediated_fraction_loss == pytest.approx(0.0, abs=1e-9)


def test_json_round_trip_and_single_model(trio64, sample):
    tokens, lengths = sample
    stages = []
    result = run_units(KINDS["confidence-neurons"], trio64, Inputs(extra={"tokens": tokens, "lengths": lengths}),
                       ConfidenceOptions(top_n=5), progress=Progress(lambda s, f: stages.append((s, f))))
    assert result.candidate_source == "top_norm_rho" and len(result.candidates) == 5
    assert all(c.startswith("1.") for c in result.candidates)
    for res in result.roles.values():  # the same neurons in every role
        assert sorted(r.neuron for r in res.neurons) == sorted(result.candidates)
    assert stages and stages[-1][1] == 1.0 and all(0 <= f <= 1 for _, f in stages)
    again = ConfidenceResult.model_validate_json(result.model_dump_json())
    assert again == result
    assert json.loads(result.model_dump_json())["manifest"]["kind"] == "confidence-neurons"

    single = confidence_neurons(trio64["original"], tokens, lengths=lengths, candidates=["1.7", 9],
                                rank_by="norm_rho", k=2)
    assert single.k == 2 and single.candidate_source == "given"
    scores = [r.w_out_norm * r.rho for r in single.neurons]
    assert scores == sorted(scores, reverse=True)
    assert ConfidenceModelResult.model_validate_json(single.model_dump_json()) == single


def test_default_candidates_and_ids(trio64):
    model = trio64["original"]
    assert parse_neuron("1.584", 1) == 584 and parse_neuron(3, 1) == 3
    with pytest.raises(ConfidenceNeuronsError):
        parse_neuron("0.5", 1)
    assert KNOWN_ENTROPY_NEURONS["gpt2-small"][0] == "11.584"
    # a GPT-2 pair name on a model of another shape falls back to the weights
    idx, source = default_candidates(model, pair="gpt2-small", top_n=4)
    assert source == "top_norm_rho" and len(idx) == 4
    weights, _ = weight_statistics(model)
    score = np.array(weights.w_out_norm) * np.array(weights.rho)
    assert idx == list(np.argsort(-score)[:4])
    # the known neurons when the pair name (or the original's Hub id) and the shape match
    cfg = SimpleNamespace(n_layers=12, d_model=768, d_mlp=3072)
    gpt2 = SimpleNamespace(bridge=SimpleNamespace(cfg=cfg), role="original",
                           source=ModelSource(hub_id="openai-community/gpt2"))
    assert default_candidates(gpt2, pair="gpt2-small") == ([584, 2378, 2870, 2123, 1611, 2910], "known")
    assert default_candidates(gpt2)[1] == "known"
    medium = SimpleNamespace(bridge=SimpleNamespace(cfg=SimpleNamespace(n_layers=24, d_model=1024, d_mlp=4096)),
                             role="original", source=ModelSource(hub_id="gpt2-medium"))
    assert default_candidates(medium, pair="gpt2-medium") == ([3144, 1083, 1108], "known")
