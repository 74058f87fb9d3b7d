"""LN scales, frozen LN-free constants, residual norms and cross-entropy against independent references."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from lnscope.analysis.checks import CHECK_PROMPTS, tokenize_prompts
from lnscope.analysis.kinds import KINDS, Inputs
from lnscope.analysis.kinds.ln_stats import LNStatsOptions
from lnscope.analysis.ln_stats import (
    LNStatsResult,
    LossResult,
    ce_table,
    frozen_ln_constants,
    ln_stats,
    loss,
    text_sequences,
)
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.pipeline import run_units
from lnscope.analysis.results import PAPER_ORDER, make_manifest
from tests.checkpoints import TEXT

CONTEXT = 16


def T(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def models(trio_dirs):
    return {role: load_model(ModelSource(path=d), role, device="cpu", dtype="float64") for role, d in trio_dirs.items()}


@pytest.fixture(scope="module")
def batch(models):
    return tokenize_prompts(models["original"].tokenizer, CHECK_PROMPTS, 64)


@pytest.fixture(scope="module")
def stats(models, batch):
    tokens, _ = batch
    return run_units(KINDS["ln-stats"], models, Inputs(extra={"tokens": tokens, "lengths": None}), LNStatsOptions())


@pytest.fixture(scope="module")
def losses(models):
    per_role = {role: loss(models[role], TEXT, context=CONTEXT, batch_size=8, n_bootstrap=500) for role in PAPER_ORDER}
    return LossResult(manifest=make_manifest("loss", models), roles=per_role, table=ce_table(per_role))


@torch.no_grad()
def test_scales_equal_a_float64_recomputation_from_the_residuals(models, batch, stats):
    loaded, res = models["original"], stats.roles["original"]
    tokens, lengths = batch
    assert res.has_ln and res.frozen is None and res.lengths == lengths.tolist()
    cfg = loaded.bridge.cfg
    _, cache = loaded.bridge.run_with_cache(tokens)

    def scale(x):  # [b, pos, d] -> [b, pos]
        x = x.double()
        return ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1) + cfg.eps).sqrt()

    ln1 = torch.stack([scale(cache[f"blocks.{l}.hook_resid_pre"]) for l in range(cfg.n_layers)], 1)  # [b, L, pos]
    ln2 = torch.stack([scale(cache[f"blocks.{l}.hook_resid_mid"]) for l in range(cfg.n_layers)], 1)
    lnf = scale(cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"])  # [b, pos]
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(T(res.ln1_scale[i]), ln1[i, :, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T(res.ln2_scale[i]), ln2[i, :, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T(res.ln_final_scale[i]), lnf[i, :n], rtol=1e-12, atol=1e-12)
    # mean over the prompts that reach each position; None past the longest
    pos = int(lengths.min()) + 2
    have = lengths > pos
    torch.testing.assert_close(T([row[pos] for row in res.ln1_scale_mean]), ln1[have, :, pos].mean(0))
    assert res.ln_final_scale_mean[pos] == pytest.approx(float(lnf[have, pos].mean()), rel=1e-12)
    assert len(res.ln_final_scale_mean) == tokens.shape[1]
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    assert res.scale_layer_mean["ln_final"][0] == pytest.approx(float(lnf[mask].mean()), rel=1e-12)


@torch.no_grad()
def test_residual_norms_match_the_cache(models, batch, stats):
    tokens, lengths = batch
    for role in ("original", "ln_free"):
        loaded, res = models[role], stats.roles[role]
        L = loaded.bridge.cfg.n_layers
        _, cache = loaded.bridge.run_with_cache(tokens)
        names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + ["ln_final.hook_in"]
        norms = torch.stack([cache[n].norm(dim=-1) for n in names], 1)  # [b, L + 1, pos]
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(T(res.resid_norm[i]), norms[i, :, :n], rtol=1e-12, atol=1e-12)
        mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
        torch.testing.assert_close(T(res.resid_norm_layer_mean), norms.permute(1, 0, 2)[:, mask].mean(-1))


def test_ln_free_has_no_scales_but_reports_its_constants(trio_dirs, stats):
    res = stats.roles["ln_free"]
    assert res.has_ln is False and res.ln1_scale is None and res.ln_final_scale_mean is None
    assert res.scale_layer_mean is None and any("no lnscope_removal.json" in n for n in res.notes)
    hf = GPT2LMHeadModel.from_pretrained(trio_dirs["ln_free"], dtype=torch.float64)
    eps = hf.config.layer_norm_epsilon
    expect = [m.ln_1 for m in hf.transformer.h]
    assert [f.site for f in res.frozen] == ["ln1", "ln2"] * len(expect) + ["ln_final"]
    for f in res.frozen:
        module = (hf.transformer.ln_f if f.site == "ln_final"
                  else getattr(hf.transformer.h[f.layer], "ln_1" if f.site == "ln1" else "ln_2"))
        assert f.gain_mean == pytest.approx(float(module.weight.detach().mean()) / eps**0.5, rel=1e-6)
        assert f.sigma is None and f.gamma_mean is None
    row = next(r for r in stats.layer_table if r.site == "ln_final")
    assert row.kinds == {"original": "mean_scale", "control": "mean_scale", "ln_free": "frozen_sigma"}
    assert row.values["original"] == stats.roles["original"].scale_layer_mean["ln_final"][0]


def test_sigma_is_read_from_lnscope_removal_json(trio_dirs, tmp_path):
    path = shutil.copytree(trio_dirs["ln_free"], tmp_path / "ln_free")
    sigmas = {"blocks.0.ln_1_qk": 0.7, "blocks.0.ln_1_v": 0.9, "blocks.0.ln_2": 1.1,
              "blocks.1.ln_1_qk": 1.2, "blocks.1.ln_1_v": 1.3, "blocks.1.ln_2": 1.4, "ln_f": 2.0}
    (path / "lnscope_removal.json").write_text(json.dumps({"format": "lnscope-ln-free/1", "sigmas": sigmas}))
    frozen, notes = frozen_ln_constants(ModelSource(path=path), 2)
    by = {(f.site, f.layer): f for f in frozen}
    assert by[("ln1", 0)].sigma == 0.7 and by[("ln1", 0)].sigma_v == 0.9 and by[("ln2", 1)].sigma == 1.4
    assert by[("ln_final", None)].sigma == 2.0
    assert by[("ln_final", None)].gamma_mean == pytest.approx(by[("ln_final", None)].gain_mean * 2.0)
    assert notes == []
    missing, notes = frozen_ln_constants(ModelSource(path=tmp_path / "nowhere"), 2)
    assert all(f.sigma is None and f.gain_mean is None for f in missing) and notes


def test_text_sequences_prepend_bos_and_respect_context_and_budget(models):
    tok = models["original"].tokenizer
    seqs = text_sequences(tok, TEXT, CONTEXT)
    assert all(s[0] == tok.bos_token_id and 2 <= len(s) <= CONTEXT for s in seqs)
    flat = [t for text in TEXT for t in tok.encode(text, add_special_tokens=False)]
    assert [t for s in seqs for t in s[1:]] == flat
    capped = text_sequences(tok, TEXT, CONTEXT, max_tokens=20)
    assert sum(len(s) - 1 for s in capped) == 20


@torch.no_grad()
@pytest.mark.parametrize("role, tol", [("original", 1e-10), ("ln_free", 1e-6)])
def test_cross_entropy_equals_hugging_face(trio_dirs, models, losses, role, tol):
    """Independent reference: F.cross_entropy on the plain HF model's logits, sequence by sequence."""
    res = losses.roles[role]
    hf = GPT2LMHeadModel.from_pretrained(trio_dirs[role], dtype=torch.float64, attn_implementation="eager").eval()
    seqs = text_sequences(models[role].tokenizer, TEXT, CONTEXT)
    assert res.n_sequences == len(seqs)
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right-padded (causal: unread)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    logits = hf(ids).logits
    for i, (seq, ours) in enumerate(zip(seqs, res.token_losses)):
        n = len(seq) - 1
        ref = F.cross_entropy(logits[i, :n], ids[i, 1 : n + 1], reduction="none")
        torch.testing.assert_close(T(ours), ref, rtol=tol, atol=tol)


def test_per_token_losses_average_to_the_mean(losses):
    for res in losses.roles.values():
        flat = [v for seq in res.token_losses for v in seq]
        assert res.n_tokens == len(flat)
        assert res.mean_loss == pytest.approx(sum(flat) / len(flat), rel=1e-12)
        assert res.ci_low <= res.mean_loss <= res.ci_high
        assert res.per_sequence_mean[0] == pytest.approx(sum(res.token_losses[0]) / len(res.token_losses[0]))
        assert res.per_position_mean[0] == pytest.approx(sum(s[0] for s in res.token_losses) / len(res.token_losses))


def test_ce_table_and_bootstrap_reproducibility(models, losses):
    assert [r.role for r in losses.table] == ["original", "control", "ln_free"]
    base = losses.roles["original"].mean_loss
    for row in losses.table:
        assert row.gap_vs_original == pytest.approx(losses.roles[row.role].mean_loss - base)
    again = loss(models["control"], TEXT, context=CONTEXT, n_bootstrap=500, per_token=False)
    assert (again.ci_low, again.ci_high) == (losses.roles["control"].ci_low, losses.roles["control"].ci_high)
    assert again.token_losses is None


def test_json_round_trips(stats, losses):
    assert LNStatsResult.model_validate_json(stats.model_dump_json()) == stats
    assert LossResult.model_validate_json(losses.model_dump_json()) == losses
    assert stats.manifest.kind == "ln-stats" and list(stats.roles) == list(PAPER_ORDER)
    assert set(stats.manifest.roles) == set(PAPER_ORDER)


def test_per_prompt_can_be_left_out(models, batch):
    tokens, lengths = batch
    res = ln_stats(models["control"], tokens[:2], lengths=lengths[:2], per_prompt=False, batch_size=1)
    assert res.ln1_scale is None and res.resid_norm is None and res.ln1_scale_mean is not None
