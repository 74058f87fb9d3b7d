"""`lnscope remove-ln`: FakeLN forward, schedule, export in the released format, resume, report."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from lnscope.analysis.errors import ConfigError, ModelLoadError
from lnscope.analysis.remove_ln import (
    FakeLNGPT2,
    RemoveLNConfig,
    Schedule,
    fold_v_scale,
    released_ln_free_model,
    removal_order,
    remove_layernorm,
)
from lnscope.analysis.remove_ln.train import DataOrder, split_documents, tokenize_documents
from tests.checkpoints import TEXT, make_tokenizer

N_LAYER = 2
ORDER = removal_order(N_LAYER)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and robust on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed: int = 0, vocab_size: int = 320) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=N_LAYER, n_head=4, n_embd=64, n_positions=64, vocab_size=vocab_size,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model.eval()


def small_config(**kw) -> RemoveLNConfig:
    # start 2, gaps 1/1/1, ln_f 8, total 12 (the formula with total_steps=12 for 2 layers)
    base = dict(total_steps=12, batch_size=4, checkpoint_every=4, lr=1e-3, min_lr=1e-4, warmup_steps=2, device="cpu")
    base.update(kw)
    return RemoveLNConfig(**base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("remove_ln") / "src"
    tokenizer = make_tokenizer()
    random_model(0, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_tokens():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 320, (24, 32), generator=gen)
    tokens[:, 0] = 0  # BOS (= EOT) first, as the text pipeline does
    return tokens


@pytest.fixture(scope="module")
def trained(src_dir, train_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("remove_ln_out")
    result = remove_layernorm(src_dir, out, small_config(), train_tokens=train_tokens, control=True, progress=False)
    return result


def load_ckpt_wrapper(src_dir, ckpt_path, dtype=torch.float64) -> FakeLNGPT2:
    wrapper = FakeLNGPT2(GPT2LMHeadModel.from_pretrained(src_dir, dtype=dtype))
    wrapper.load_state_dict(torch.load(ckpt_path, weights_only=False)["model"])
    return wrapper.to(dtype).eval()


# ------------------------------------------------------------------------- functional forward
def reference_forward(model: GPT2LMHeadModel, tokens: torch.Tensor, sigma: dict[str, float | None]) -> torch.Tensor:
    """Independent, deliberately plain GPT-2 forward with per-site LN modes (None = real)."""
    tr, D = model.transformer, model.config.n_embd
    H = model.config.n_head
    eps = model.config.layer_norm_epsilon

    def ln(x, mod, s):
        xc = x - x.mean(-1, keepdim=True)
        scale = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt() if s is None else s
        return xc / scale * mod.weight + mod.bias

    T = tokens.shape[1]
    x = tr.wte.weight[tokens] + tr.wpe.weight[:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i, block in enumerate(tr.h):
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        q, k, _ = (ln(x, block.ln_1, sigma[f"blocks.{i}.ln_1_qk"]) @ W + b).split(D, -1)
        v = (ln(x, block.ln_1, sigma[f"blocks.{i}.ln_1_v"]) @ W + b)[..., 2 * D :]
        heads = lambda t: t.view(*t.shape[:2], H, D // H).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = (pattern @ v).transpose(1, 2).reshape(x.shape)
        x = x + z @ block.attn.c_proj.weight + block.attn.c_proj.bias
        h = ln(x, block.ln_2, sigma[f"blocks.{i}.ln_2"]) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
        x = x + F.gelu(h, approximate="tanh") @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    return ln(x, tr.ln_f, sigma["ln_f"]) @ tr.wte.weight.T


@torch.no_grad()
def test_functional_forward_all_real_equals_hf():
    model = random_model(3)
    tokens = torch.randint(0, 320, (3, 64), generator=torch.Generator().manual_seed(0))
    wrapper = FakeLNGPT2(model).eval()
    assert rel_err(wrapper(tokens), model(tokens).logits) < 1e-5
    model64 = random_model(3).double()
    wrapper64 = FakeLNGPT2(model64).eval()
    assert (wrapper64(tokens) - model64(tokens).logits).abs().max() < 1e-10


@torch.no_grad()
def test_functional_forward_mixed_modes_equals_reference():
    model = random_model(4).double()
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    wrapper = FakeLNGPT2(model).eval()
    # ln_2 of both blocks and ln_1 Q/K of block 0 fake; ln_1 V and ln_f still real
    sigma = {name: None for name in ORDER}
    for name, s in [("blocks.0.ln_2", 0.7), ("blocks.1.ln_2", 1.3), ("blocks.0.ln_1_qk", 0.9)]:
        sigma[name] = s
        wrapper.set_sigma({name: s})
        wrapper.set_fake(name)
    assert (wrapper(tokens) - reference_forward(model, tokens, sigma)).abs().max() < 1e-10
    # every site fake, ln_1 Q/K and V with different sigmas
    for k, name in enumerate(ORDER):
        sigma[name] = 0.5 + 0.1 * k
    wrapper.set_sigma(sigma)
    wrapper.set_all_fake()
    assert (wrapper(tokens) - reference_forward(model, tokens, sigma)).abs().max() < 1e-10
    assert wrapper.n_fake == len(ORDER)


def test_sigma_ema_and_freeze():
    model = random_model(5)
    wrapper = FakeLNGPT2(model).train()
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))

    def embed_std():  # block 0's ln_1 reads the embeddings
        with torch.no_grad():
            x = model.transformer.wte.weight[tokens] + model.transformer.wpe.weight[:16]
            return float((x.var(-1, unbiased=False) + 1e-5).sqrt().mean())

    qk, v, ln2 = (wrapper.index[f"blocks.0.{k}"] for k in ("ln_1_qk", "ln_1_v", "ln_2"))
    wrapper.losses(tokens)
    wrapper.update_sigma()  # the first batch initialises
    first = wrapper.sigma.clone()
    assert float(first[qk]) == pytest.approx(embed_std(), rel=1e-5) and first[qk] == first[v]
    wrapper.set_fake("blocks.0.ln_2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(2.0)  # every std changes
    wrapper.losses(tokens)
    wrapper.update_sigma()
    assert wrapper.sigma[ln2] == first[ln2]  # fake: frozen
    assert float(wrapper.sigma[qk]) == pytest.approx(0.9 * float(first[qk]) + 0.1 * embed_std(), rel=1e-5)


def test_v_fold_identity():
    gen = torch.Generator().manual_seed(0)
    d, dv = 16, 8
    x = torch.randn(5, d, generator=gen, dtype=torch.float64) * 3 + 1
    gamma = 1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    beta = torch.randn(d, generator=gen, dtype=torch.float64)
    W = torch.randn(d, dv, generator=gen, dtype=torch.float64)
    b = torch.randn(dv, generator=gen, dtype=torch.float64)
    s_qk, s_v = 0.7, 1.9
    xc = x - x.mean(-1, keepdim=True)
    want = (xc * gamma / s_v + beta) @ W + b
    W2, b2 = fold_v_scale(W, b, beta, s_qk, s_v)
    got = (xc * gamma / s_qk + beta) @ W2 + b2
    assert (got - want).abs().max() < 1e-12


@torch.no_grad()
def test_released_export_equals_all_fake_forward_float64():
    model = random_model(6).double()
    wrapper = FakeLNGPT2(model).eval()
    wrapper.set_sigma({name: 0.3 + 0.2 * k for k, name in enumerate(ORDER)})
    wrapper.set_all_fake()
    released = released_ln_free_model(wrapper)
    assert released.config.layer_norm_epsilon == 1e12
    assert all(m.eps == 1e12 for m in released.modules() if isinstance(m, torch.nn.LayerNorm))
    tokens = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(3))
    assert rel_err(released(tokens).logits, wrapper(tokens)) < 1e-9


# ---------------------------------------------------------------------------------- schedule
def test_schedule_defaults_follow_the_paper():
    small = Schedule.from_depth(12, scale=1)
    assert (small.start_step, small.gap_ln2, small.gap_ln1qk, small.gap_ln1v, small.ln_f_step) == (20, 2, 2, 3, 104)
    assert small.total_steps == 312
    assert Schedule.from_depth(12) == small
    assert Schedule.from_depth(24).ln_f_step == 188  # medium
    large = Schedule.from_depth(36, start_step=30, gap_ln2=4, gap_ln1qk=4, gap_ln1v=6, total_steps=600)
    assert large.ln_f_step == 534
    tiny = Schedule.from_depth(4)
    assert (tiny.start_step, tiny.gap_ln2, tiny.gap_ln1v, tiny.ln_f_step, tiny.total_steps) == (60, 6, 9, 144, 432)
    fitted = Schedule.from_depth(4, total_steps=1000)
    assert fitted.total_steps == 1000 and fitted.ln_f_step < 400
    events = small.events()
    assert [name for _, name in events] == removal_order(12)
    assert events[:2] == [(20, "blocks.0.ln_2"), (22, "blocks.1.ln_2")]
    assert events[12] == (44, "blocks.0.ln_1_qk") and events[24] == (68, "blocks.0.ln_1_v")
    assert events[-2] == (101, "blocks.11.ln_1_v") and events[-1] == (104, "ln_f")
    with pytest.raises(ConfigError):
        Schedule.from_depth(12, total_steps=100, scale=1)
    with pytest.raises(ConfigError):
        Schedule.from_depth(2, start_step=0)


def test_data_helpers():
    docs = split_documents("one doc\nstill one\n\n\ntwo<|endoftext|>three\n  \nfour")
    assert docs == ["one doc\nstill one", "two", "three", "four"]
    tok = make_tokenizer()
    seqs = tokenize_documents(TEXT * 3, tok, 16)
    assert seqs.shape[1] == 16 and (seqs[:, 0] == tok.eos_token_id).all()
    order = DataOrder(10, 4, 2, seed=0)
    first = torch.cat([order.step_indices(s).flatten() for s in range(5)])  # 40 = 4 epochs of 10
    for e in range(4):
        assert sorted(first[10 * e : 10 * (e + 1)].tolist()) == list(range(10))
    assert torch.equal(order.step_indices(3), DataOrder(10, 4, 2, seed=0).step_indices(3))


# ------------------------------------------------------------------------------- full runs
def test_layer_norms_removed_in_schedule_order(trained):
    log = json.loads(trained.log_path.read_text())
    run = log["runs"]["ln_free"]
    removed = [run["removed_at"][name] for name in ORDER]
    assert removed == sorted(removed) and len(set(removed)) == len(removed)
    assert removed == [2, 3, 4, 5, 6, 7, 8]
    assert run["n_fake"][-1] == len(ORDER) and run["n_fake"][0] == 0
    assert [list(e) for e in log["schedule"]["events"]] == [[s, n] for n, s in zip(ORDER, removed)]
    assert log["runs"]["control"]["n_fake"] == [0] * 12
    assert trained.removal_steps == dict(zip(ORDER, removed))
    assert all(math.isfinite(v) for v in run["loss"] + log["runs"]["control"]["loss"])


def test_sigma_frozen_after_removal(trained):
    run = json.loads(trained.log_path.read_text())["runs"]["ln_free"]
    for name in ORDER:
        s = run["removed_at"][name]
        curve = run["sigma"][name]
        assert len(set(curve[s - 1 :])) == 1, name  # value after step s-1's update, never updated again
        assert curve[-1] == pytest.approx(trained.sigma[name])
    ln_f = run["sigma"]["ln_f"][: run["removed_at"]["ln_f"]]
    assert len(set(ln_f)) > 1  # it was tracked (EMA) while real


def test_export_equals_all_fake_forward(trained, src_dir, train_tokens):
    meta = json.loads((trained.ln_free_dir / "lnscope_removal.json").read_text())
    assert meta["role"] == "ln_free" and meta["steps"] == 12 and meta["seed"] == 0
    assert meta["sigmas"] == pytest.approx(trained.sigma)
    assert meta["source"].endswith("src") and meta["schedule"]["ln_f_step"] == 8
    exported = GPT2LMHeadModel.from_pretrained(trained.ln_free_dir, dtype=torch.float64).eval()
    assert exported.config.layer_norm_epsilon == 1e12
    assert all(m.eps == 1e12 for m in exported.modules() if isinstance(m, torch.nn.LayerNorm))
    ckpt = trained.out_dir / "checkpoints" / "ln_free" / "step_0000012.pt"
    wrapper = load_ckpt_wrapper(src_dir, ckpt)
    assert wrapper.n_fake == len(ORDER)
    with torch.no_grad():
        assert rel_err(exported(train_tokens[:4]).logits, wrapper(train_tokens[:4])) < 1e-6
    assert (trained.ln_free_dir / "model.safetensors").is_file()
    assert (trained.ln_free_dir / "tokenizer.json").is_file()


def test_control_is_a_normal_ln_checkpoint(trained, src_dir, train_tokens):
    control = GPT2LMHeadModel.from_pretrained(trained.control_dir, dtype=torch.float64).eval()
    assert control.config.layer_norm_epsilon == 1e-5
    for m in control.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-5 and m.weight.abs().max() < 10
    meta = json.loads((trained.control_dir / "lnscope_removal.json").read_text())
    assert meta["role"] == "control" and meta["ln_removed"] is False and meta["aux_weight"] == 0.0
    wrapper = load_ckpt_wrapper(src_dir, trained.out_dir / "checkpoints" / "control" / "step_0000012.pt")
    assert wrapper.n_fake == 0
    with torch.no_grad():
        assert rel_err(wrapper(train_tokens[:2]), control(train_tokens[:2]).logits) < 1e-10
    source = GPT2LMHeadModel.from_pretrained(src_dir, dtype=torch.float64)
    assert not torch.equal(source.transformer.h[0].mlp.c_fc.weight, control.transformer.h[0].mlp.c_fc.weight)


def test_report_is_self_contained(trained):
    html = trained.report_path.read_text()
    assert "Plotly.newPlot" in html or "plotly" in html.lower()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)  # plotly.js inlined, no CDN / https script
    for name in ORDER:
        assert name in html


def test_resume_continues_exactly(trained, src_dir, train_tokens, tmp_path):
    out = tmp_path / "resumed"
    first = remove_layernorm(src_dir, out, small_config(stop_at_step=6), train_tokens=train_tokens, progress=False)
    assert not first.completed and first.ln_free_dir is None
    assert sorted(p.name for p in (out / "checkpoints" / "ln_free").glob("*.pt")) == [
        "step_0000004.pt", "step_0000006.pt"]
    with pytest.raises(ConfigError):  # no silent overwrite of a half-done run
        remove_layernorm(src_dir, out, small_config(), train_tokens=train_tokens, progress=False)
    with pytest.raises(ConfigError):  # settings must match the checkpoint's
        remove_layernorm(src_dir, out, small_config(lr=5e-4), train_tokens=train_tokens, progress=False, resume=True)
    second = remove_layernorm(src_dir, out, small_config(), train_tokens=train_tokens, progress=False, resume=True)
    assert second.completed
    want = load_file(trained.ln_free_dir / "model.safetensors")
    got = load_file(second.ln_free_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    a = json.loads(trained.log_path.read_text())["runs"]["ln_free"]
    b = json.loads(second.log_path.read_text())["runs"]["ln_free"]
    assert a["loss"] == b["loss"] and a["sigma"] == b["sigma"] and a["removed_at"] == b["removed_at"]


def test_refuses_an_ln_free_source(trained, train_tokens, tmp_path):
    with pytest.raises(ModelLoadError):
        remove_layernorm(trained.ln_free_dir, tmp_path / "x", small_config(), train_tokens=train_tokens, progress=False)


def test_cli_with_train_text(src_dir, tmp_path):
    from lnscope.analysis.remove_ln.cli import register

    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(TEXT * 8) + "<|endoftext|>" + " ".join(TEXT))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "remove-ln", str(src_dir), str(tmp_path / "out"), "--train-text", str(text), "--context", "16",
        "--batch-size", "2", "--total-steps", "10", "--start-step", "1", "--gap-ln2", "1", "--gap-ln1qk", "1",
        "--gap-ln1v", "1", "--ln-f-step", "7", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup", "1",
        "--aux-weight", "0.05", "--seed", "3", "--device", "cpu", "--checkpoint-every", "0", "--no-progress",
    ])
    assert args.func(args) == 0
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["data"]["context"] == 16 and log["config"]["aux_weight"] == 0.05 and log["config"]["seed"] == 3
    assert log["runs"]["ln_free"]["removed_at"]["ln_f"] == 7
    assert (tmp_path / "out" / "ln_free" / "config.json").is_file()
    assert not (tmp_path / "out" / "control").exists()


def test_exported_ln_free_loads_with_exact_dla(trained):
    loading = pytest.importorskip("lnscope.analysis.loading")
    checks = pytest.importorskip("lnscope.analysis.checks")
    if hasattr(loading, "load_model_dir"):
        loaded = loading.load_model_dir(trained.ln_free_dir, role="ln_free", device="cpu", dtype=torch.float64)
    else:
        from lnscope.analysis.pairs import ModelSource

        loaded = loading.load_model(ModelSource(path=trained.ln_free_dir), "ln_free", device="cpu", dtype=torch.float64)
    tokens, _ = checks.tokenize_prompts(loaded.tokenizer, checks.CHECK_PROMPTS, 64)
    assert not [n for n in loaded.bridge.hook_dict if n.endswith("hook_scale")]
    assert checks.dla_sum_rel_error(loaded, tokens) < 1e-6
