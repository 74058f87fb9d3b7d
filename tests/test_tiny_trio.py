"""The shipped tiny trio (models/tiny): the issue bars, measured through lnscope's own bridges."""

import json

import pytest

from lnscope.analysis.checks import check_model
from lnscope.analysis.dla import DLATarget
from lnscope.analysis.eval_text import pair_eval_text
from lnscope.analysis.evaluation import evaluate_trio
from lnscope.analysis.kinds import KINDS, Inputs
from lnscope.analysis.kinds.confidence import ConfidenceOptions
from lnscope.analysis.kinds.dla import DLAOptions
from lnscope.analysis.kinds.patching import ActPatchOptions, AtPOptions
from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry, models_dir
from lnscope.analysis.pipeline import run_units
from lnscope.analysis.tasks import evaluate_task, make_ioi
from lnscope.analysis.tasks.base import pad_id, pad_right

TINY = models_dir() / "tiny"
ROLES = ("original", "ln_free", "control")


@pytest.fixture(scope="module")
def models():
    pair = PairRegistry.load().get("tiny")
    return ModelCache().load_pair(pair, device="cpu", dtype="float32")


def test_the_trio_is_shipped_small():
    sizes = [p.stat().st_size for p in TINY.rglob("*") if p.is_file()]
    assert sum(sizes) < 60e6 and max(sizes) < 50e6
    for role in ROLES:
        assert (TINY / role / "model.safetensors").is_file()
    assert "Cross-entropy on the held-out split" in (TINY / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("role", ROLES)
def test_check_pair_bars_on_the_shipped_trio(role):
    result = check_model(PairRegistry.load().get("tiny").source(role), role, device="cpu", dtype="float64")
    assert result.max_rel_logit_error < 1e-6 and result.dla_sum_rel_error < 1e-6
    assert (result.hook_scale_hooks == 0) == (role == "ln_free")


@pytest.fixture(scope="module")
def quality(models):
    # 200 prompts per task, as in the model card (the greater-than metric's std is ~0.5 per prompt)
    return evaluate_trio(models, pair_eval_text(PairRegistry.load().get("tiny")), pair="tiny", n_prompts=200,
                         max_tokens=20_000)


def test_ln_free_cross_entropy_bar(quality):
    ce = {row.role: row.ce for row in quality.ce_table}
    assert ce["ln_free"] <= ce["original"] + 0.10, ce
    assert abs(ce["control"] - ce["original"]) < 0.10, ce


def test_induction_bar(quality):
    for role, ev in quality.roles.items():
        ind = ev.tasks["induction"]
        assert ind.second_half_loss <= ind.first_half_loss / 3, (role, ind.first_half_loss, ind.second_half_loss)


def test_ioi_on_training_templates(models):
    """Every role does IOI on the corpus's own templates and name pairs (split "train")."""
    batch = make_ioi(models["original"].tokenizer, n_prompts=100, seed=0, split="train")
    for role in ROLES:
        result = evaluate_task(lambda tokens: models[role].bridge(tokens), batch)
        assert result.accuracy >= 0.90 and result.metric_mean >= 2.0, (role, result.accuracy, result.metric_mean)


def test_ioi_and_greater_than_bars_on_held_out_prompts(quality):
    """Issue 4's bars on held-out templates and name / year combinations, for each of the three models."""
    for role, ev in quality.roles.items():
        ioi, gt = ev.tasks["ioi"], ev.tasks["greater_than"]
        assert ioi.accuracy >= 0.90 and ioi.metric_mean >= 2.0, (role, ioi.accuracy, ioi.metric_mean)
        assert gt.metric_mean >= 0.5, (role, gt.metric_mean)


def test_ioi_head_attribution_and_resid_pre_patching_for_all_roles(models):
    batch = make_ioi(models["original"].tokenizer, n_prompts=8, seed=1, split="heldout")
    dla = run_units(KINDS["dla"], models,
                    Inputs(tokens=batch.clean_tokens, extra={"target": DLATarget.from_task(batch)}),
                    DLAOptions(n_bootstrap=100))
    n_layers, n_heads = models["original"].bridge.cfg.n_layers, models["original"].bridge.cfg.n_heads
    for role in ROLES:
        heads = dla.roles[role].treatments["cached_scale"].heads
        assert len(heads) == n_layers and all(len(row) == n_heads for row in heads)
    assert dla.roles["ln_free"].errors["cached_scale"].nmae.value < 1e-3
    assert dla.roles["original"].errors["cached_scale"].nmae.value > 0

    task = Inputs(task=batch)
    atp = run_units(KINDS["attribution-patching"], models, task, AtPOptions(nodes=["resid_pre"]))
    act = run_units(KINDS["activation-patching"], models, task, ActPatchOptions(nodes=["resid_pre"]))
    for role in ROLES:
        shape = [n_layers, batch.clean_tokens.shape[1]]
        assert atp.roles[role].atp["resid_pre"].shape == shape
        assert act.roles[role].effects["resid_pre"].shape == shape
    json.loads(act.model_dump_json())


def test_entropy_neuron_candidate_is_ln_mediated_only_with_ln():
    pair = PairRegistry.load().get("tiny")
    models64 = ModelCache().load_pair(pair, device="cpu", dtype="float64")
    tokenizer = models64["original"].tokenizer
    seqs = text_sequences(tokenizer, pair_eval_text(pair)[:16], 128, max_tokens=1500)
    tokens = pad_right(seqs, pad_id(tokenizer))
    inputs = Inputs(extra={"tokens": tokens, "lengths": [len(s) for s in seqs]})
    result = run_units(KINDS["confidence-neurons"], models64, inputs, ConfidenceOptions(top_n=10), pair=pair)
    top = result.top_candidate
    assert top is not None
    fractions = {role: v.ln_mediated_fraction_loss for role, v in top.by_role.items()}
    assert fractions["original"] is not None and abs(fractions["original"]) > 1e-6
    assert abs(fractions["ln_free"]) < 1e-9


@pytest.mark.parametrize("role", ROLES)
def test_shipped_transcoders_recover_the_loss_at_low_l0(models, role):
    """Issue 6's bar, recomputed here on held-out corpus documents (not read from metrics.json)."""
    from lnscope.analysis.tinymodel.build import trio_ioi_grammar
    from lnscope.analysis.tinymodel.corpus import generate_documents
    from lnscope.analysis.transcoders import evaluate_transcoders, load_transcoders_for

    model = models[role]
    tset = load_transcoders_for("tiny", role, model=model)
    assert sorted(tset.transcoders) == [0, 1, 2, 3]
    seqs = [[model.tokenizer.bos_token_id] + model.tokenizer.encode(d)[:127]
            for d in generate_documents(60, seed=0, split="heldout", ioi_grammar=trio_ioi_grammar(TINY / "original"))]
    result = evaluate_transcoders(model, tset, seqs, max_tokens=6000)
    mean_l0 = sum(layer.l0 for layer in result.layers) / len(result.layers)
    assert mean_l0 <= 64 and result.ce_recovered >= 0.85, (mean_l0, result.ce_recovered)
    assert "| CE recovered |" in (TINY / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("role", ["ln_free", "original"])
def test_shipped_circuit_identities_hold(role):
    """Every node's incoming edges + error + bias = its input, on the real tiny models in float64."""
    from lnscope.analysis.transcoders import attribute, load_transcoders_for

    pair = PairRegistry.load().get("tiny")
    model = ModelCache().get(pair.source(role), role, device="cpu", dtype="float64")
    tset = load_transcoders_for("tiny", role, model=model)
    graph = attribute(model, tset, "When Mary and John went to the store, John gave a drink to", max_n_logits=5)
    assert graph.identity_max_rel_error < 1e-4
    assert graph.n_features > 0
