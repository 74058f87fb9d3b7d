"""Attribution graphs, paired circuits and feature pages on the random trio.

References: the completeness identity (every target's input = its incoming edges + bias, bias from an
all-nodes-zero pass); edges against node ablations in an explicitly frozen model (patterns, LN scales
and every MLP output held at their clean values); influence against (I - A)^-1; top paths against
brute-force enumeration; matching against a permuted copy; feature pages against brute force; and,
when an interpreter with circuit-tracer is available, circuit-tracer's own graph.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.transcoders import (
    AttributionGraph,
    CTGraphJSON,
    FeatureIndex,
    TranscoderSet,
    attribute,
    build_feature_index,
    diff_graphs,
    feature_page,
    hungarian,
    match_features,
    paired_circuits,
    random_transcoders,
    save_transcoders,
    train_transcoders,
)
from lnscope.analysis.transcoders.graph import compute_influence, normalize_matrix
from lnscope.analysis.transcoders.matching import greedy_assign
from lnscope.analysis.transcoders.targets import LogitTarget
from tests.checkpoints import TEXT

torch.set_num_threads(1)

PROMPT = "When Mary and John went to the store, John"
ROLES = ("original", "ln_free")


@pytest.fixture(scope="module")
def models(trio_dirs):
    out = {}
    for r in ROLES:
        for dt in ("float32", "float64"):
            out[r, dt] = load_model(ModelSource(path=trio_dirs[r]), r, device="cpu", dtype=dt)
    return out


@pytest.fixture(scope="module")
def transcoders(models):
    """Tiny transcoders trained on each role (a few hundred steps, d_transcoder 128)."""
    out = {}
    for r in ROLES:
        out[r], _ = train_transcoders(models[r, "float32"], TEXT * 6, d_transcoder=128, l1_coeff=2e-3, n_tokens=19_200,
                                      batch_size=64, lr=3e-3, seed=0, show_progress_bar=False)
    return out


def _term_scale(g: AttributionGraph) -> torch.Tensor:
    """Per row: |bias| + sum |edges| (the size of the terms summed)."""
    return g.adjacency.double().abs().sum(1) + g.node_bias.abs()


def _rows(g: AttributionGraph) -> torch.Tensor:
    return torch.cat([torch.arange(g.n_features), torch.arange(g.logit_start, g.n_nodes)])


# ----------------------------------------------------------------------------- completeness bar
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("bos", ["bias", "error", "features"])
def test_identity_float64(models, transcoders, role, bos):
    g = attribute(models[role, "float64"], transcoders[role], PROMPT, bos=bos)
    rows = _rows(g)
    assert g.n_features == g.active_features.shape[0] > 10
    gap = (g.adjacency.double()[rows].sum(1) + g.node_bias[rows] - g.node_inputs[rows]).abs()
    # adjacency is stored in float32: compare at its precision, and the float64 gap at 1e-10
    assert float((gap / g.node_inputs[rows].abs().clamp(min=1e-3)).max()) < 1e-4
    assert g.identity_max_rel_error < 1e-10
    # inputs are the real pre-activations / demeaned logits
    with torch.no_grad():
        logits = models[role, "float64"].bridge(torch.tensor([g.token_ids]))[0, -1].double()
    for k, t in enumerate(g.logit_targets):
        assert float(g.node_inputs[g.logit_start + k]) == pytest.approx(
            float(logits[t.vocab_idx] - logits.mean()), abs=1e-9)


@pytest.mark.parametrize("role", ROLES)
def test_identity_float32(models, transcoders, role):
    g = attribute(models[role, "float32"], transcoders[role], PROMPT)
    rows = _rows(g)
    assert float((g.identity_gap[rows].abs() / _term_scale(g)[rows].clamp(min=1e-12)).max()) < 1e-4
    s = g.summary()
    assert s.n_active_features == g.active_features.shape[0] and 0 < s.replacement_score <= 1
    json.loads(s.model_dump_json())


@pytest.mark.parametrize("role", ROLES)
def test_identity_skip_topk_and_missing_layer(models, role):
    model = models[role, "float64"]
    skip = random_transcoders(64, 96, [0, 1], seed=7, skip=True, bias=-0.1)
    topk = random_transcoders(64, 96, [1], seed=8, activation="topk", k=5)  # layer 0: no transcoder (all error)
    for tset in (skip, topk):
        g = attribute(model, tset, PROMPT, bos="error")
        assert g.identity_max_rel_error < 1e-9
    assert set(g.active_features[:, 0].tolist()) == {1}


def test_logit_diff_target_and_partial_rows(models, transcoders):
    model = models["ln_free", "float64"]
    a, b = 300, 17
    g = attribute(model, transcoders["ln_free"], PROMPT, logit_diff=(a, b))
    with torch.no_grad():
        logits = model.bridge(torch.tensor([g.token_ids]))[0, -1].double()
    assert g.n_logits == 1 and g.logit_targets[0].other_token_id == b
    assert float(g.node_inputs[-1]) == pytest.approx(float(logits[a] - logits[b]), abs=1e-9)
    assert g.identity_max_rel_error < 1e-10
    full = attribute(model, transcoders["ln_free"], PROMPT)
    part = attribute(model, transcoders["ln_free"], PROMPT, max_feature_nodes=20, batch_size=8)
    assert part.n_features == 20 and part.identity_max_rel_error < 1e-10
    # the chosen rows are exact rows of the full graph (same columns for the chosen features)
    for i in range(part.n_features):
        j = full.feature_index(*part.active_features[part.selected_features[i]].tolist())
        torch.testing.assert_close(part.adjacency[i, part.n_features:part.logit_start],
                                   full.adjacency[j, full.n_features:full.logit_start])
        torch.testing.assert_close(part.adjacency[i, :part.n_features], full.adjacency[j, part.selected_features])


# ------------------------------------------------------------------- edges vs frozen ablations
def _frozen_target(model, g: AttributionGraph, tset: TranscoderSet, target: int, *, embed_delta=None, mlp_delta=None):
    """The target's input in the frozen model: patterns / LN scales / MLP outputs fixed at clean values."""
    bridge = model.bridge
    toks = torch.tensor([g.token_ids])
    names = [n for n in bridge.hook_dict if n.endswith((".hook_pattern", ".hook_scale", "hook_mlp_out"))]
    with torch.no_grad():
        clean_logits, cache = bridge.run_with_cache(toks, names_filter=lambda n: n in names)
    live = {}

    def hook(t, hook):
        name = hook.name
        if name.endswith((".hook_pattern", ".hook_scale")):
            return cache[name]
        if name == "hook_embed":
            return t if embed_delta is None else t + embed_delta
        if name.endswith("mlp.hook_in"):
            live[int(name.split(".")[1])] = t
            return t
        l = int(name.split(".")[1])
        out = cache[name].clone()
        if mlp_delta is not None and mlp_delta[0] == l:
            out = out + mlp_delta[1]
        return out

    hooked = names + ["hook_embed"] + [f"blocks.{l}.mlp.hook_in" for l in range(g.n_layers)]
    with torch.no_grad():
        logits = bridge.run_with_hooks(toks, fwd_hooks=[(n, hook) for n in hooked])
    node = g.node(target)
    if node.kind == "logit":
        last = logits[0, -1].double()
        return float(last[node.feature] - last.mean())
    w = tset[node.layer].W_enc.detach()[node.feature].double()
    return float(live[node.layer][0, node.pos].double() @ (w - w.mean()))


@pytest.mark.parametrize("role", ROLES)
def test_edges_equal_frozen_ablations(models, transcoders, role):
    model = models[role, "float64"]
    tset = transcoders[role]
    g = attribute(model, tset, PROMPT)
    gen = torch.Generator().manual_seed(0)
    targets = [g.logit_start] + [int(i) for i in torch.randint(0, g.n_features, (3,), generator=gen)]
    checked = 0
    for t in targets:
        row = g.adjacency[t]
        base = _frozen_target(model, g, tset, t)
        nz = row.nonzero().flatten()
        by_kind = {}
        for s in nz.tolist():
            by_kind.setdefault(g.node(s).kind, []).append(s)
        for kind, srcs in by_kind.items():
            for s in sorted(srcs, key=lambda s: -abs(float(row[s])))[:2]:
                n = g.node(s)
                if kind == "token":
                    delta = torch.zeros(1, g.n_pos, 64, dtype=torch.float64)
                    delta[0, n.pos] = -model.bridge.W_E.detach()[g.token_ids[n.pos]].double()
                    ablated = _frozen_target(model, g, tset, t, embed_delta=delta)
                else:
                    delta = torch.zeros(1, g.n_pos, 64, dtype=torch.float64)
                    if kind == "feature":
                        vec = n.activation * tset[n.layer].W_dec.detach()[n.feature].double()
                    else:  # error node: MLP output - reconstruction
                        x = _clean_mlp_in(model, g, n.layer)
                        z = tset[n.layer].encode(x)
                        z[0] = 0
                        recon = tset[n.layer].decode(z, x)[n.pos]
                        vec = _clean_mlp_out(model, g, n.layer)[n.pos] - recon
                    delta[0, n.pos] = -vec
                    ablated = _frozen_target(model, g, tset, t, mlp_delta=(n.layer, delta))
                assert base - ablated == pytest.approx(float(row[s]), rel=1e-5, abs=1e-6), (g.node(t), n)
                checked += 1
    assert checked >= 8


def _clean_mlp_in(model, g, layer):
    _, cache = model.bridge.run_with_cache(torch.tensor([g.token_ids]))
    return cache[f"blocks.{layer}.mlp.hook_in"][0].double()


def _clean_mlp_out(model, g, layer):
    _, cache = model.bridge.run_with_cache(torch.tensor([g.token_ids]))
    return cache[f"blocks.{layer}.hook_mlp_out"][0].double()


# ---------------------------------------------------------------------- pruning, scores, paths
def _toy_graph(adjacency: torch.Tensor, n_layers: int, n_pos: int, features, probs) -> AttributionGraph:
    n = adjacency.shape[0]
    feats = torch.tensor(features, dtype=torch.long).reshape(-1, 3)
    return AttributionGraph(
        prompt="a b", token_ids=list(range(n_pos)), token_strs=[f"t{i}" for i in range(n_pos)], n_layers=n_layers,
        active_features=feats, activation_values=torch.ones(len(feats), dtype=torch.float64),
        selected_features=torch.arange(len(feats)), adjacency=adjacency,
        logit_targets=[LogitTarget(token=f"o{i}", vocab_idx=100 + i, probability=p, weight=p, value=0.0)
                       for i, p in enumerate(probs)],
        node_inputs=torch.zeros(n, dtype=torch.float64), node_bias=torch.zeros(n, dtype=torch.float64),
        identity_gap=torch.zeros(n, dtype=torch.float64))


def _random_dag(seed=0):
    """2 layers x 2 positions: 3 features, 4 errors, 2 tokens, 2 logits (N = 11), random weights."""
    gen = torch.Generator().manual_seed(seed)
    features = [(0, 1, 5), (1, 0, 2), (1, 1, 7)]
    N = 3 + 4 + 2 + 2
    A = torch.zeros(N, N)
    layer = {0: 0, 1: 1, 2: 1, 3: 0, 4: 0, 5: 1, 6: 1, 7: -1, 8: -1, 9: 2, 10: 2}
    for t in list(range(3)) + [9, 10]:
        for s in range(9):
            if layer[s] < layer[t]:
                A[t, s] = torch.randn((), generator=gen)
    return _toy_graph(A, 2, 2, features, [0.7, 0.2])


def test_influence_equals_matrix_inverse():
    g = _random_dag()
    norm = normalize_matrix(g.adjacency.double())
    w = g.logit_weights.double()
    ref = w @ (torch.linalg.inv(torch.eye(g.n_nodes, dtype=torch.float64) - norm)
               - torch.eye(g.n_nodes, dtype=torch.float64))
    torch.testing.assert_close(compute_influence(norm, w), ref)
    rep, comp = g.scores()
    infl = ref
    tok, err = infl[g.token_start:g.logit_start].sum(), infl[g.error_start:g.token_start].sum()
    assert rep == pytest.approx(float(tok / (tok + err)), rel=1e-5)
    out = infl + w
    non_err = 1 - norm[:, g.error_start:g.token_start].sum(1)
    assert comp == pytest.approx(float((non_err * out).sum() / out.sum()), rel=1e-5)


def test_prune_keeps_tokens_logits_and_is_consistent():
    g = _random_dag(1)
    pr = g.prune(0.5, 0.9)
    assert pr.node_mask[g.token_start:].all()
    # kept edges join kept nodes; every kept feature has kept incoming and outgoing edges
    d, s = pr.edge_mask.nonzero(as_tuple=True)
    assert pr.node_mask[d].all() and pr.node_mask[s].all()
    for i in pr.node_mask[: g.n_features].nonzero().flatten().tolist():
        assert pr.edge_mask[i].any() and pr.edge_mask[:, i].any()
    full = g.prune(1.0, 1.0)
    assert full.edge_mask.sum() == (g.adjacency != 0).sum()


def test_top_paths_against_brute_force():
    g = _random_dag(2)
    A = g.adjacency
    for target in (9, 1):
        paths = []

        def walk(node, path, ws):
            if g.token_start <= node < g.logit_start:
                paths.append((float(np.prod([abs(w) for w in ws])), list(reversed(path))))
            for s in A[node].nonzero().flatten().tolist():
                walk(s, path + [s], ws + [float(A[node, s])])

        walk(target, [target], [])
        paths.sort(key=lambda p: -p[0])
        got = g.top_paths(target, k=4)
        assert [abs(p.score) for p in got] == pytest.approx([p[0] for p in paths[:4]], rel=1e-6)
        assert [g.index_of(p.nodes[0].node_id) for p in got] == [p[1][0] for p in paths[:4]]
        assert all(p.nodes[-1].node_id == g.node_id(target) for p in got)


def test_graph_json_schema(models, transcoders, tmp_path):
    g = attribute(models["ln_free", "float32"], transcoders["ln_free"], PROMPT)
    js = g.to_json("test-slug", node_threshold=0.8, edge_threshold=0.98, scan="lnscope/test")
    data = json.loads(js.model_dump_json())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "test-slug" and meta["scan"] == "lnscope/test" and meta["prompt"] == PROMPT
    assert meta["prompt_tokens"] == g.token_strs and meta["node_threshold"] == 0.8
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])  # unique ids
    for n in data["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                "activation", "token_prob", "is_target_logit"} <= set(n)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == g.n_pos
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert all(l["source"] in ids and l["target"] in ids for l in data["links"])
    assert {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"} == set(data["qParams"])
    CTGraphJSON.model_validate(data)
    path = g.write_json(tmp_path, "slug2")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert path.is_file() and [x["slug"] for x in index["graphs"]] == ["slug2"]
    g.save(tmp_path / "g.pt")
    back = AttributionGraph.load(tmp_path / "g.pt")
    assert torch.equal(back.adjacency, g.adjacency) and back.logit_targets == g.logit_targets
    paths = g.top_paths(g.logit_start, k=3)
    assert paths and all(p.nodes[0].node_id.startswith("E_") for p in paths)


# ----------------------------------------------------------------------------- paired circuits
def test_hungarian_against_brute_force():
    rng = np.random.default_rng(0)
    for n, m in ((5, 5), (4, 6), (6, 4), (1, 3)):
        cost = rng.normal(size=(n, m))
        r, c = hungarian(cost)
        assert len(set(r)) == len(r) == min(n, m) and len(set(c)) == len(c)
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[r, c].sum() == pytest.approx(best)


def _permuted(tset: TranscoderSet, seed: int) -> tuple[TranscoderSet, dict[int, torch.Tensor]]:
    out, perms = {}, {}
    for l in tset.layers:
        tc = tset[l]
        perm = torch.randperm(tc.d_transcoder, generator=torch.Generator().manual_seed(seed + l))
        new = random_transcoders(tset.d_model, tc.d_transcoder, [l], seed=99)[l]
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc"):
                getattr(new, name).copy_(getattr(tc, name)[perm])
            new.b_dec.copy_(tc.b_dec)
            new.b_in.copy_(tc.b_in)
        out[l], perms[l] = new, perm
    return TranscoderSet(out, d_model=tset.d_model), perms


def test_matching_recovers_a_permutation(transcoders):
    tset = transcoders["ln_free"]
    permuted, perms = _permuted(tset, 3)
    for method in ("optimal", "greedy"):
        m = match_features(tset, permuted, method=method)
        for l in tset.layers:
            # feature f of A is feature inv[f] of B, where permuted[j] = A[perm[j]]
            assert torch.equal(m.a_to_b[l][perms[l]], torch.arange(tset[l].d_transcoder))
            assert torch.allclose(m.cos[l], torch.ones_like(m.cos[l]))
    r, c = greedy_assign(torch.eye(4)[[2, 0, 3, 1]])
    assert c[r.argsort()].tolist() == [2, 0, 3, 1]


def test_diff_of_a_permuted_copy_is_empty(models, transcoders):
    model = models["ln_free", "float32"]
    tset = transcoders["ln_free"]
    permuted, _ = _permuted(tset, 5)
    ga = attribute(model, tset, PROMPT)
    gb = attribute(model, permuted, PROMPT)
    diff = diff_graphs(ga, gb, match_features(tset, permuted))
    assert diff.node_jaccard == pytest.approx(1.0)
    assert not diff.only_a and not diff.only_b
    assert diff.edges and max(abs(e.delta) for e in diff.edges) < 1e-5
    assert all(m.in_pruned_a and m.in_pruned_b for m in diff.matched_nodes)
    assert diff.scores[0].replacement_score == pytest.approx(diff.scores[1].replacement_score, rel=1e-5)


def test_paired_circuits_original_vs_ln_free(models, transcoders):
    ms = {r: models[r, "float32"] for r in ROLES}
    graphs, diff = paired_circuits(ms, transcoders, PROMPT, pair="trio")
    assert diff.roles == ["original", "ln_free"] and [s.role for s in diff.scores] == diff.roles
    ga, gb = graphs["original"], graphs["ln_free"]
    assert [t.vocab_idx for t in ga.logit_targets] == [t.vocab_idx for t in gb.logit_targets]
    assert diff.matched_nodes and 0 <= diff.node_jaccard <= 1
    kept_a = int(ga.prune().node_mask.sum())
    both_or_a = (sum(m.in_pruned_a for m in diff.matched_nodes)
                 + sum(r.reason != "counterpart pruned" for r in diff.only_a))
    assert both_or_a == kept_a
    for e in diff.edges[:20]:
        assert e.delta == pytest.approx(e.weight_b - e.weight_a)
        assert e.weight_a == pytest.approx(float(ga.adjacency[ga.index_of(e.target_a), ga.index_of(e.source_a)]))
    json.loads(diff.model_dump_json())


def test_cli_transcoder_graph(transcoders, trio_dirs, tmp_path, capsys):
    import argparse

    from lnscope.analysis.transcoders.cli import register

    (tmp_path / "lnscope.toml").write_text(
        "[pairs.trio]\n"
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n')
    dirs = []
    for role in ROLES:
        dirs.append(str(save_transcoders(transcoders[role], tmp_path / "tc" / role)))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["transcoder-graph", "trio", "--prompt", PROMPT, "--out", str(tmp_path / "graphs"),
                              "--slug", "s", "--transcoders", *dirs, "--dtype", "float32"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "original:" in out and "ln_free:" in out and "diff:" in out
    for name in ("s-original.json", "s-ln_free.json", "s-diff.json", "graph-metadata.json"):
        assert (tmp_path / "graphs" / name).is_file()
    CTGraphJSON.model_validate_json((tmp_path / "graphs" / "s-ln_free.json").read_text())


# -------------------------------------------------------------------------------- feature pages
def test_feature_index_and_page(models, transcoders, tmp_path):
    model = models["original", "float32"]
    tset = transcoders["original"]
    tset.to(dtype=torch.float32)
    texts = TEXT * 2
    index = build_feature_index(model, tset, texts, top_k=5, n_bins=8)
    index.save(tmp_path)
    index = FeatureIndex.load(tmp_path)
    # brute force over all (sequence, position) activations of layer 1
    seqs = text_sequences(model.tokenizer, texts, 64)
    acts = []
    for s in seqs:
        _, cache = model.bridge.run_with_cache(torch.tensor([s]))
        acts.append(tset[1].encode(cache["blocks.1.mlp.hook_in"][0, 1:]).detach())
    all_acts = torch.cat(acts)  # [n_tokens, d_tc]
    assert index.n_tokens == all_acts.shape[0]
    fired = (all_acts > 0).sum(0)
    torch.testing.assert_close(index.count[1], fired)
    torch.testing.assert_close(index.hist[1].sum(1), fired)
    torch.testing.assert_close(index.max_act[1], all_acts.max(0).values)
    f = int(fired.argmax())
    torch.testing.assert_close(index.top_acts[1][f], all_acts[:, f].topk(5).values)
    page = feature_page(model, tset, index, 1, f, window=(3, 2))
    assert page.firing_rate == pytest.approx(float(fired[f]) / all_acts.shape[0])
    assert sum(page.histogram.counts) == int(fired[f]) and len(page.histogram.bin_edges) == 9
    for ctx in page.top_contexts:
        assert ctx.activations[ctx.highlight] == pytest.approx(ctx.activation, rel=1e-5)
        assert ctx.token_ids == index.sequence(ctx.sequence)[
            ctx.position - ctx.highlight: ctx.position - ctx.highlight + len(ctx.token_ids)]
    effects = tset[1].W_dec.detach()[f].double() @ model.bridge.W_U.detach().double()
    assert page.promoted[0].token_id == int(effects.argmax())
    assert page.suppressed[0].token_id == int(effects.argmin())
    assert [t.token_id for t in page.promoted] == effects.topk(10).indices.tolist()
    assert page.promoted[0].value == pytest.approx(float(effects.max()))
    json.loads(page.model_dump_json())


# ------------------------------------------------------------------------------ circuit-tracer
CT_SCRIPT = (r'''
import json, math, sys, warnings
warnings.filterwarnings("ignore")
import torch, yaml
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, AutoTokenizer
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from circuit_tracer import attribute
from circuit_tracer.graph import prune_graph, compute_graph_scores
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

torch.set_num_threads(1)
for job in json.loads(sys.argv[1]):
    dtype = torch.float64
    hf = GPT2LMHeadModel.from_pretrained(job["model_dir"], torch_dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", tokenizer_name=job["model_dir"],
        model_name="lnscope-test", dtype=dtype, device="cpu", default_prepend_bos=False)
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, '''
r'''refactor_factored_attn_matrices=False)
    # lnscope's transcoders read the bridge's MLP input x (LN folded); this model's MLP reads u = x * g + beta
    tcfg = yaml.safe_load(open(job["transcoder_dir"] + "/config.yaml"))
    tcs = {}
    for i, name in enumerate(tcfg["transcoders"]):
        t = load_file(job["transcoder_dir"] + "/" + name)
        ln = hf.transformer.h[i].ln_2
        g = ln.weight.detach().to(dtype) / (math.sqrt(ln.eps) if ln.eps >= 1e10 else 1.0)
        beta = ln.bias.detach().to(dtype)
        W_enc = t["W_enc"].to(dtype)
        tc = SingleLayerTranscoder(c.n_embd, W_enc.shape[0], torch.relu, i, dtype=dtype, device="cpu")
        with torch.no_grad():
            tc.W_enc.copy_(W_enc / g)
            tc.b_enc.copy_(t["b_enc"].to(dtype) - W_enc @ (beta / g))
            tc.W_dec.copy_(t["W_dec"].to(dtype))
            tc.b_dec.copy_(t["b_dec"].to(dtype))
        tcs[i] = tc
    model._configure_replacement_model(TranscoderSet(tcs, feature_input_hook="mlp.hook_in",
                                                     feature_output_hook="hook_mlp_out", scan="lnscope-test"))
    graph = attribute(torch.tensor(job["token_ids"]), model, batch_size=64)
    pr = prune_graph(graph, 0.8, 0.98)
    rep, comp = compute_graph_scores(graph)
    torch.save({"adjacency": graph.adjacency_matrix.double(), "active_features": graph.active_features.long(),
                "logit_tokens": [t.vocab_idx for t in graph.logit_targets], "node_mask": pr.node_mask,
                "edge_mask": pr.edge_mask, "replacement": float(rep), "completeness": float(comp)}, job["out"])
    print("done", job["out"], tuple(graph.adjacency_matrix.shape))
''')


def _circuit_tracer_python() -> str | None:
    """An interpreter that can import circuit_tracer: $LNSCOPE_CIRCUIT_TRACER_PYTHON, this one, or /tmp/ct."""
    for cand in (os.environ.get("LNSCOPE_CIRCUIT_TRACER_PYTHON"), sys.executable, "/tmp/ct/bin/python"):
        if cand and Path(cand).exists():
            ok = subprocess.run(
                [cand, "-c", "import circuit_tracer, transformer_lens; transformer_lens.HookedTransformer"],
                capture_output=True, timeout=120)
            if ok.returncode == 0:
                return cand
    return None


def test_same_graph_as_circuit_tracer(models, transcoders, trio_dirs, tmp_path):
    python = _circuit_tracer_python()
    if python is None:
        pytest.skip("circuit-tracer is not importable "
                    "(install it in a separate venv and set LNSCOPE_CIRCUIT_TRACER_PYTHON)")
    jobs, ours = [], {}
    for role in ROLES:
        g = attribute(models[role, "float64"], transcoders[role], PROMPT, bos="bias")
        ours[role] = g
        save_transcoders(transcoders[role], tmp_path / role)
        jobs.append({"model_dir": str(trio_dirs[role]), "transcoder_dir": str(tmp_path / role),
                     "token_ids": g.token_ids, "out": str(tmp_path / f"ct-{role}.pt")})
    script = tmp_path / "ct_run.py"
    script.write_text(CT_SCRIPT)
    run = subprocess.run([python, str(script), json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for role in ROLES:
        g, ct = ours[role], torch.load(tmp_path / f"ct-{role}.pt", weights_only=True)
        assert torch.equal(g.active_features, ct["active_features"])
        assert [t.vocab_idx for t in g.logit_targets] == ct["logit_tokens"]
        A, C = g.adjacency.double(), ct["adjacency"]
        assert A.shape == C.shape
        big = C.abs() > 1e-6 * C.abs().max()
        assert float(((A - C).abs()[big] / C.abs()[big]).max()) < 1e-3
        assert float((A - C).abs().max()) < 1e-5 * float(C.abs().max())
        pr = g.prune()
        assert torch.equal(pr.node_mask, ct["node_mask"]) and torch.equal(pr.edge_mask, ct["edge_mask"])
        rep, comp = g.scores()
        assert rep == pytest.approx(ct["replacement"], rel=1e-4) and comp == pytest.approx(ct["completeness"], rel=1e-4)
