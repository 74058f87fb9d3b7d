"""Attribution patching, AtP*, batched activation patching and fidelity, against independent references:
TransformerLens 4.3's own patching sweeps and attribution_patch, exact linear cases, numpy statistics."""


import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.patching import (
    ActPatchResult,
    AtPResult,
    FidelityResult,
    TaskSetFidelity,
    activation_patching,
    attribution_patching,
    bootstrap_mean_ci,
    normalized_error,
    patching_fidelity,
    pearson,
    rankdata,
    spearman,
    task_set_fidelity,
    top_k_recall,
)
from lnscope.analysis.patching.fidelity import node_fidelity
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.analysis.tasks import CustomBatch

N_POS = 5
ANSWERS = torch.tensor([[5, 9], [11, 7]])


def make_pair(seed: int = 0, n: int = 2, pos: int = N_POS):
    """clean/corrupt [n, pos] differing at two positions (a subject-swap-like corruption)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 300, (n, pos), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(1, 300, (n,), generator=gen)
    corrupt[:, 3] = torch.randint(1, 300, (n,), generator=gen)
    return clean, corrupt


def logit_diff(answers: torch.Tensor):
    """metric(logits [b, pos, vocab]) = logit[a0] - logit[a1] at the last position, per prompt."""

    def metric(logits):
        last = logits[:, -1]
        a = answers.to(last.device)
        return last.gather(1, a[:, :1])[:, 0] - last.gather(1, a[:, 1:])[:, 0]

    return metric


METRIC = logit_diff(ANSWERS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: thread contention costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(trio_dirs):
    return {role: load_model(ModelSource(path=trio_dirs[role]), role, device="cpu", dtype="float64")
            for role in ("original", "ln_free")}


@pytest.fixture(scope="module")
def pair():
    return make_pair()


# --- ground truth == TransformerLens --------------------------------------------------------------

@pytest.mark.parametrize("role", ["original", "ln_free"])
def test_batched_activation_patching_equals_transformer_lens_sweeps(models, pair, role):
    model = models[role]
    bridge = model.bridge
    clean, corrupt = pair
    # chunk_size 7: chunks mix node types and layers and the last one is short
    ours = activation_patching(model, clean, corrupt, METRIC, ["resid_pre", "head", "head_pos", "mlp", "head_k"],
                               chunk_size=7)
    _, clean_cache = bridge.run_with_cache(clean)
    corrupt_value = ours.metric.corrupt
    sweeps = {
        "resid_pre": tl_patching.get_act_patch_resid_pre,
        "head": tl_patching.get_act_patch_attn_head_out_all_pos,
        "mlp": tl_patching.get_act_patch_mlp_out,
        "head_k": tl_patching.get_act_patch_attn_head_k_all_pos,
    }
    for node, sweep in sweeps.items():
        reference = sweep(bridge, corrupt, clean_cache, METRIC, reduce="mean").double()  # patched metric
        assert torch.allclose(ours.effects[node].tensor() + corrupt_value, reference, atol=1e-5, rtol=0), node
    # head x position: a subset of cells (one TransformerLens forward per cell)
    rows = [(0, 0, 1), (0, 3, 2), (1, 1, 0), (1, 3, 3), (1, 4, 1), (0, 4, 0)]
    index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"])
    reference = tl_patching.get_act_patch_attn_head_out_by_pos(
        bridge, corrupt, clean_cache, METRIC, index_axis_names=None, index_df=index_df, reduce="mean").double()
    head_pos = ours.effects["head_pos"].tensor()
    assert ours.effects["head_pos"].axes == ["layer", "pos", "head"]
    got = torch.stack([head_pos[r] for r in rows]) + corrupt_value
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)
    # clean and corrupt differ at positions 1 and 3 only: position 0 of resid_pre, head_pos and mlp in both
    # layers (2 + 2 * 4 + 2) and resid_pre 0 at positions 2 and 4 are unchanged, so they are not run
    n_nodes = 2 * N_POS + 8 + 2 * N_POS * 4 + 2 * N_POS + 8
    assert ours.n_unchanged_nodes == 14
    assert ours.n_forward_passes == -(-(n_nodes - 14) // 7)
    assert bridge._lnscope_suffix_exact and bridge._lnscope_prefix_kv_ok  # both shortcuts were taken
    assert ours.shortcuts == ["later_layers", "later_positions", "read_positions", "read_vocab", "last_mlp_read_only"]
    assert ours.effects["resid_pre"].tensor()[:, 0].abs().max() == 0


@pytest.mark.parametrize("role", ["original", "ln_free"])
def test_activation_patching_shortcuts_change_nothing(models, pair, role):
    """Later-layer and later-position runs give the full forwards' effects (to float64 rounding)."""
    bridge = models[role].bridge
    clean, corrupt = pair
    nodes = ["resid_pre", "head", "head_pos", "mlp", "head_v", "neuron_pos"]
    fast = activation_patching(models[role], clean, corrupt, METRIC, nodes, chunk_size=5)
    slow = _slow(bridge, lambda: activation_patching(models[role], clean, corrupt, METRIC, nodes, chunk_size=5))
    assert fast.n_unchanged_nodes == slow.n_unchanged_nodes > 0
    assert len(fast.shortcuts) == 5 and slow.shortcuts == []
    for node in nodes:
        assert torch.allclose(fast.effects[node].tensor(), slow.effects[node].tensor(), atol=1e-10, rtol=0), node
        assert fast.effects[node].tensor().abs().max() > 1e-6, node  # not vacuous


def _slow(bridge, run):
    """run() with every chunk a full forward (the shortcuts' per-model verdicts set to False)."""
    saved = bridge._lnscope_suffix_exact, bridge._lnscope_prefix_kv_ok
    try:
        bridge._lnscope_suffix_exact, bridge._lnscope_prefix_kv_ok = False, False
        return run()
    finally:
        bridge._lnscope_suffix_exact, bridge._lnscope_prefix_kv_ok = saved


@pytest.mark.parametrize("ends", [[2, 4], [2, 2]], ids=["per-prompt-ends", "early-end"])
def test_activation_patching_shortcuts_with_earlier_read_positions(models, pair, ends):
    """A metric read at per-prompt end positions, or before the last corrupted position (so that some chunks
    start after everything it reads and are not run), still gives the full forwards' effects."""
    model = models["original"]
    clean, corrupt = pair
    end = torch.tensor(ends)

    def metric(logits):
        at = logits[torch.arange(logits.shape[0]), end.to(logits.device)]
        return at[:, 5] - at[:, 9]

    nodes = ["resid_pre", "head_pos", "mlp", "neuron_pos"]
    fast = activation_patching(model, clean, corrupt, metric, nodes, chunk_size=3)
    slow = _slow(model.bridge, lambda: activation_patching(model, clean, corrupt, metric, nodes, chunk_size=3))
    assert {"read_positions", "read_vocab", "last_mlp_read_only"} <= set(fast.shortcuts)
    for node in nodes:
        assert torch.allclose(fast.effects[node].tensor(), slow.effects[node].tensor(), atol=1e-10, rtol=0), node
    if ends == [2, 2]:  # chunks whose nodes all come after position 2 were not run
        assert fast.n_forward_passes < slow.n_forward_passes


def test_hooks_already_on_the_last_mlp_see_full_length_tensors(models, pair):
    """Some bridges keep their own hooks on an MLP (a block-level hook_mlp_out): while the last MLP runs only at
    the read positions, those hooks still see every position it was given, in and out."""
    model = models["original"]
    mlp = model.bridge.blocks[len(model.bridge.blocks) - 1].mlp
    seen: list[tuple[int, int]] = []
    inputs: list[int] = []
    handles = [mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape[1])),
               mlp.register_forward_hook(lambda module, args, out: seen.append((inputs.pop(), out.shape[1])))]
    try:
        result = activation_patching(model, *pair, METRIC, ["resid_pre", "mlp"], chunk_size=3)
    finally:
        for handle in handles:
            handle.remove()
    assert "last_mlp_read_only" in result.shortcuts
    assert seen and all(n_in == n_out for n_in, n_out in seen)
    assert any(n_in > 1 for n_in, _ in seen)  # runs with more positions than the one read


@pytest.mark.parametrize("role", ["original", "ln_free"])
def test_atp_equals_transformer_lens_attribution_patch(models, pair, role):
    model = models[role]
    clean, corrupt = pair
    shared = torch.tensor([[5, 9], [5, 9]])  # TL's metric sees one prompt at a time: same answers for all
    ours = attribution_patching(model, clean, corrupt, logit_diff(shared), ["head_pos", "mlp"], qk_fix=False)
    one = logit_diff(shared[:1])
    reference = attribution_patch(model.bridge, clean, corrupt, lambda logits: one(logits)[0])  # batch means
    head_pos, mlp = ours.atp["head_pos"].tensor(), ours.atp["mlp"].tensor()
    n_checked = 0
    for node, score in reference.node_scores.items():
        if node.kind == "attn_head_out":
            assert abs(head_pos[node.layer, node.position, node.head].item() - score) < 1e-6
        elif node.kind == "mlp_out":
            assert abs(mlp[node.layer, node.position].item() - score) < 1e-6
        else:
            continue
        n_checked += 1
    assert n_checked == 2 * N_POS * 4 + 2 * N_POS
    assert mlp.abs().max() > 1e-3  # not vacuous


def test_atp_is_exact_where_the_metric_is_linear_in_the_node(models, pair):
    """Final-layer MLP output and neurons feed the logits linearly in the LN-free model (no ln_final):
    AtP == activation patching there; with LayerNorm (ln_final) it is not."""
    clean, corrupt = pair
    nodes = ["mlp", "neuron"]
    gaps = {}
    for role, model in models.items():
        atp = attribution_patching(model, clean, corrupt, METRIC, nodes, qk_fix=False)
        act = activation_patching(model, clean, corrupt, METRIC, nodes, chunk_size=128)
        gaps[role] = {n: (atp.atp[n].tensor()[-1] - act.effects[n].tensor()[-1]).abs().max().item() for n in nodes}
        assert act.effects["mlp"].tensor()[-1].abs().max() > 1e-3
    assert max(gaps["ln_free"].values()) < 1e-9
    assert min(gaps["original"].values()) > 1e-6


# --- AtP* QK fix ----------------------------------------------------------------------------------

QK_NODES = ["head", "head_q", "head_k", "head_q_pos", "head_k_pos"]


def test_qk_fix_is_exact_when_downstream_of_the_pattern_is_linear(models, pair):
    """LN-free model with the last MLP zero-ablated: the metric is linear in the last layer's attention
    pattern, so recomputing the softmax exactly for a patched query/key (AtP*) equals activation patching of
    hook_q / hook_k there, while plain AtP (linear through the softmax) does not."""
    clean, corrupt = pair
    model = models["ln_free"]
    zero = [("blocks.1.hook_mlp_out", lambda t, hook=None: torch.zeros_like(t))]
    with model.bridge.hooks(fwd_hooks=zero):
        atp = attribution_patching(model, clean, corrupt, METRIC, QK_NODES[1:], qk_fix=True)
        act = activation_patching(model, clean, corrupt, METRIC, QK_NODES[1:], chunk_size=64)
    for node in QK_NODES[1:]:
        truth = act.effects[node].tensor()[-1]
        assert (atp.atp_star[node].tensor()[-1] - truth).abs().max() < 1e-13, node
        assert (atp.atp[node].tensor()[-1] - truth).abs().max() > 1e-9, node  # measured 2.5e-8 .. 4.4e-6
        assert truth.abs().max() > 1e-5, node


def test_qk_fix_is_closer_to_query_key_patching_than_plain_atp(models, pair):
    clean, corrupt = pair
    model = models["original"]
    atp = attribution_patching(model, clean, corrupt, METRIC, QK_NODES, qk_fix=True)
    act = activation_patching(model, clean, corrupt, METRIC, QK_NODES, chunk_size=128)
    for node in ["head_q", "head_k", "head_q_pos", "head_k_pos"]:
        truth = act.effects[node].tensor()
        star_err = (atp.atp_star[node].tensor() - truth).abs().sum()
        plain_err = (atp.atp[node].tensor() - truth).abs().sum()
        assert star_err < plain_err, node
    # rows are independent: patching every query = the sum over positions of single-query patches
    star = atp.atp_star
    assert torch.allclose(star["head_q"].tensor(), star["head_q_pos"].tensor().sum(1), atol=1e-12)
    # AtP* for a head = its Q + K + V node estimates (V is linear: plain AtP on hook_v)
    v = attribution_patching(model, clean, corrupt, METRIC, ["head_v"], qk_fix=False).atp["head_v"].tensor()
    assert torch.allclose(star["head"].tensor(), star["head_q"].tensor() + star["head_k"].tensor() + v, atol=1e-12)


def test_zero_difference_gives_zero_estimates(models, pair):
    clean, _ = pair
    model = models["original"]
    atp = attribution_patching(model, clean, clean.clone(), METRIC, ["resid_pre", "neuron", *QK_NODES])
    for maps in (atp.atp, atp.atp_star):
        for node, m in maps.items():
            assert m.tensor().abs().max() == 0.0, node
    act = activation_patching(model, clean, clean.clone(), METRIC, ["head_q", "head_k_pos"], chunk_size=64)
    for node, m in act.effects.items():
        assert m.tensor().abs().max() < 1e-12, node


# --- fidelity statistics --------------------------------------------------------------------------

def test_correlations_match_numpy_references():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y = 0.6 * x + y
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    ranks = lambda a: np.argsort(np.argsort(a)) + 1.0  # no ties  # noqa: E731
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], abs=1e-12)
    # ties share their mean rank (scipy's 'average'): x ranks [1, 2.5, 2.5, 4]
    assert rankdata([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1.0, 3.0, 2.0, 4.0])
    expected = ((rx - 2.5) * (ry - 2.5)).sum() / np.sqrt(((rx - 2.5) ** 2).sum() * ((ry - 2.5) ** 2).sum())
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expected, abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    # torch tensors of any shape are flattened
    assert pearson(torch.tensor(x).reshape(5, 10), torch.tensor(y).reshape(5, 10)) == pytest.approx(pearson(x, y))


def test_top_k_recall_and_normalized_error_hand_examples():
    act = np.array([10, -9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.1])
    attr = act.copy()
    attr[0], attr[11] = 0.0, -100.0  # the largest node drops out of the top 10, a small one enters
    assert top_k_recall(act, attr) == (0.9, 10)
    assert top_k_recall(act, act) == (1.0, 10)
    assert top_k_recall([3.0, -1.0, 2.0], [0.0, 5.0, 1.0], k=2) == (0.5, 2)  # top {0,2} vs {1,2}
    # both maps divided by act at the reference cell (argmax |act| = index 1, value -4)
    err, ref, value = normalized_error([2.0, -4.0, 1.0], [1.0, -3.0, 0.0])
    assert (ref, value) == (1, -4.0) and err == pytest.approx((1 + 1 + 1) / 4)
    f = node_fidelity("resid_pre", "atp", torch.tensor([[2.0, -4.0], [1.0, 0.0]]),
                      torch.tensor([[1.0, -3.0], [0.0, 0.0]]))
    assert f.reference_index == [0, 1] and f.normalized_error == pytest.approx(0.75) and f.top_k == 4


def test_bootstrap_ci():
    values = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [10.0, 5.0]])
    mean, lo, hi = bootstrap_mean_ci(values, n_bootstrap=2000, seed=1)
    assert mean.tolist() == [4.0, 5.0] and lo[1] == hi[1] == 5.0
    assert 1.0 <= lo[0] < 4.0 < hi[0] <= 10.0
    assert torch.equal(bootstrap_mean_ci(values, 2000, 1)[1], lo)  # seeded
    one = bootstrap_mean_ci(values[:1])
    assert one[1].tolist() == one[2].tolist() == [1.0, 5.0]


# --- fidelity, task sets, JSON --------------------------------------------------------------------

def test_normalised_fidelity_and_json_round_trip(models, pair):
    clean, corrupt = pair
    seen = []
    fid = patching_fidelity(models["original"], clean, corrupt, METRIC, ["resid_pre", "head", "head_q"],
                            normalize=True, progress=Progress(lambda s, f: seen.append(f)))
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert {(f.node_type, f.method) for f in fid.fidelity} == {
        ("resid_pre", "atp"), ("head", "atp"), ("head", "atp_star"), ("head_q", "atp"), ("head_q", "atp_star")}
    # normalised: effects are raw effects / (mean clean - mean corrupt)
    raw = activation_patching(models["original"], clean, corrupt, METRIC, ["resid_pre"])
    assert torch.allclose(fid.activation.effects["resid_pre"].tensor() * raw.metric.denominator,
                          raw.effects["resid_pre"].tensor(), atol=1e-12)
    assert FidelityResult.model_validate_json(fid.model_dump_json()) == fid


def test_task_set_fidelity_and_json_round_trip(models):
    model = models["ln_free"]
    groups = []
    for seed in range(2):
        clean, corrupt = make_pair(seed + 10)
        groups.append((f"set{seed}", clean, corrupt, METRIC))
    clean, corrupt = make_pair(12)
    task = CustomBatch(name="custom", clean_tokens=clean, corrupt_tokens=corrupt, end_pos=torch.tensor([N_POS - 1] * 2),
                       prompts=["a", "b"], corrupt_prompts=["c", "d"], answer_tokens=ANSWERS)
    groups.append(task)  # a task batch is a group (its .metric reads end_pos)
    result = task_set_fidelity(model, groups, ["resid_pre", "mlp"], n_bootstrap=200, keep_groups=True)
    assert result.groups == ["set0", "set1", "custom#2"] and result.n_prompts == 6
    by_metric = attribution_patching(model, clean, corrupt, METRIC, ["mlp"], qk_fix=False)
    by_task = attribution_patching(model, clean, corrupt, task, ["mlp"], qk_fix=False)
    assert by_task.atp["mlp"] == by_metric.atp["mlp"] == result.per_group[2].atp.atp["mlp"]
    s = result.summary("mlp", "pearson")
    assert s.per_group == [g.get("mlp").pearson for g in result.per_group]
    assert s.interval.mean == pytest.approx(np.mean(s.per_group)) and s.interval.lo <= s.interval.mean <= s.interval.hi
    act = next(m for m in result.node_maps if m.node_type == "mlp" and m.method == "activation")
    pooled = torch.stack([g.activation.effects["mlp"].tensor() for g in result.per_group]).mean(0)  # equal group sizes
    assert torch.allclose(act.mean.tensor(), pooled, atol=1e-12)
    assert (act.lo.tensor() <= act.mean.tensor() + 1e-12).all() and (act.hi.tensor() >= act.mean.tensor() - 1e-12).all()
    assert TaskSetFidelity.model_validate_json(result.model_dump_json()) == result


def test_results_round_trip_and_cancel(models, pair):
    clean, corrupt = pair
    model = models["original"]
    atp = attribution_patching(model, clean, corrupt, METRIC, ["resid_pre", "head", "head_k_pos"])
    assert AtPResult.model_validate_json(atp.model_dump_json()) == atp
    assert atp.atp["resid_pre"].shape == [2, N_POS]
    assert atp.atp["head_k_pos"].axis_labels["head"] == ["H0", "H1", "H2", "H3"]
    with pytest.raises(Cancelled):
        activation_patching(model, clean, corrupt, METRIC, ["resid_pre"], progress=Progress(should_cancel=lambda: True))
    with pytest.raises(ValueError):
        attribution_patching(model, clean, corrupt[:, :3], METRIC)
    with pytest.raises(ValueError):
        activation_patching(model, clean, corrupt, lambda logits: logits[:, -1, 0].sum(), ["mlp"])
    assert ActPatchResult  # exported


def test_metric_reads_are_found_and_confirmed():
    from lnscope.analysis.patching.activation import _metric_reads

    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    diff = logit_diff(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    reads = _metric_reads(diff, logits, 3)  # a logit difference at the last position: 6 of 11 ids there
    assert reads.pos.tolist() == [5] and reads.vocab is None  # 6 / 11 ids is too many to restrict
    two = logit_diff(torch.tensor([[1, 2], [1, 2], [2, 1]]))
    reads = _metric_reads(two, logits, 3)
    assert reads.pos.tolist() == [5] and reads.vocab.tolist() == [1, 2]
    ends = torch.tensor([2, 4, 4])
    at_ends = lambda lg: lg[torch.arange(3), ends, 0]  # noqa: E731 - per-prompt end positions
    reads = _metric_reads(at_ends, logits, 3)
    assert reads.pos.tolist() == [2, 4] and reads.vocab.tolist() == [0]
    every_pos = lambda lg: lg[..., 0].sum(-1)  # noqa: E731 - one id at every position
    reads = _metric_reads(every_pos, logits, 3)
    assert reads.pos.tolist() == list(range(6)) and reads.vocab.tolist() == [0]
    softmax = lambda lg: lg[:, -1].log_softmax(-1)[:, 0]  # noqa: E731 - the whole vocabulary at one position
    reads = _metric_reads(softmax, logits, 3)
    assert reads.pos.tolist() == [5] and reads.vocab is None
    assert _metric_reads(lambda lg: lg.mean((1, 2)), logits, 3) is None  # reads everything
    assert _metric_reads(lambda lg: (lg[:, -1].argmax(-1) == 0).double(), logits, 3) is None  # no gradient
    # a gradient that vanishes where the metric still reads: the noise check refuses the shortcut
    relu_read = lambda lg: lg[:, -1, 0] + torch.relu(lg[:, 0, 0] - 5)  # noqa: E731 - zero gradient at N(0, 1) logits
    assert _metric_reads(relu_read, logits, 3) is None
    relu_id = lambda lg: lg[:, -1, 0] + torch.relu(lg[:, -1, 3] - 5)  # noqa: E731 - id 3 read, zero gradient
    reads = _metric_reads(relu_id, logits, 3)
    assert reads.pos.tolist() == [5] and reads.vocab is None  # positions alone still hold
