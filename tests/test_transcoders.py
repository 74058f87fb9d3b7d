"""Transcoders: the module against a numpy reimplementation, metric definitions on hand-made data,
training on the random trio, and every file format (including a malicious pickle, refused)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from lnscope.analysis.ln_stats import loss as ln_loss
from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import load_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.transcoders import (
    Transcoder,
    TranscoderFormatError,
    TranscoderSet,
    load_transcoders,
    load_transcoders_for,
    random_transcoders,
    save_transcoders,
    train_transcoders,
)
from lnscope.analysis.transcoders.formats import circuit_tracer_config
from lnscope.analysis.transcoders.train import (
    ActivationBuffer,
    _resample,
    collect_activations,
    layer_metrics,
    spliced_loss,
)
from tests.checkpoints import TEXT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(trio_dirs):
    return {r: load_model(ModelSource(path=trio_dirs[r]), r, device="cpu", dtype="float32")
            for r in ("original", "ln_free")}


def _np_forward(tc: Transcoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy version of the transcoder maths."""
    W_enc, b_enc = tc.W_enc.detach().double().numpy(), tc.b_enc.detach().double().numpy()
    W_dec, b_dec = tc.W_dec.detach().double().numpy(), tc.b_dec.detach().double().numpy()
    b_in = tc.b_in.detach().double().numpy()
    pre = (x - b_in) @ W_enc.T + b_enc
    z = np.maximum(pre, 0.0)
    if tc.activation == "topk":
        out = np.zeros_like(z)
        for i, row in enumerate(z):
            keep = np.argsort(-row, kind="stable")[: tc.k]
            out[i, keep] = row[keep]
        z = out
    y = z @ W_dec + b_dec
    if tc.W_skip is not None:
        y = y + x @ tc.W_skip.detach().double().numpy().T
    return y, z


@pytest.mark.parametrize("activation,skip", [("relu", False), ("relu", True), ("topk", False), ("topk", True)])
def test_forward_matches_numpy(activation, skip):
    tset = random_transcoders(16, 40, [0], seed=1, activation=activation, k=5, skip=skip, dtype=torch.float64)
    tc = tset[0]
    x = np.random.default_rng(0).normal(size=(30, 16))
    y_ref, z_ref = _np_forward(tc, x)
    y, z = tc.forward_with_acts(torch.from_numpy(x))
    np.testing.assert_allclose(z.detach().numpy(), z_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    if activation == "topk":
        assert int((z > 0).sum(-1).max()) <= 5
    # the folded encoder bias gives the same pre-activations
    pre_folded = torch.from_numpy(x) @ tc.W_enc.T + tc.effective_b_enc()
    torch.testing.assert_close(pre_folded, tc.pre_acts(torch.from_numpy(x)))


def test_metric_definitions_on_hand_made_data():
    tc = Transcoder(2, 3, dtype=torch.float64)
    with torch.no_grad():
        tc.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        tc.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [2.0, 3.0], [-1.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # z rows: [1,0,0], [2,3,0], [0,0.5,0.5], [0,0,0]; y_hat = z[:, :2]
    y_hat = torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    m = layer_metrics(tc, x, y)
    assert m["l0"] == pytest.approx((1 + 2 + 2 + 0) / 4)
    sq = ((y_hat - y) ** 2).sum(-1)  # 1, 1, 0.25, 1
    assert m["mse"] == pytest.approx(float(sq.mean()))
    var = ((y - y.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(float(sq.sum() / var))
    assert m["dead_fraction"] == pytest.approx(0.0)
    m2 = layer_metrics(tc, x[[0, 3]], y[[0, 3]])  # features 1 and 2 never fire
    assert m2["dead_fraction"] == pytest.approx(2 / 3)


def test_buffer_shuffles_across_prompts(models):
    model = models["ln_free"]
    seqs = text_sequences(model.tokenizer, TEXT, 64)
    acts = collect_activations(model, seqs, [0])
    x_in_order = acts[0][0]
    buf = ActivationBuffer(model, seqs, [0], size=x_in_order.shape[0], batch_size=8, exclude_bos=True, seed=0)
    x = buf.x[0]
    assert x.shape == x_in_order.shape
    assert not torch.equal(x, x_in_order)  # shuffled ...
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(key(x), key(x_in_order))  # ... the same rows
    first = buf.next()[0][0]
    # one batch mixes rows of several prompts: find each row's sequence
    lengths = [len(s) - 1 for s in seqs]
    owner = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))
    rows = [int(((x_in_order - r).abs().sum(-1) < 1e-6).nonzero()[0, 0]) for r in first]
    assert len({int(owner[i]) for i in rows}) > 1


def test_resample_dead_features():
    torch.manual_seed(0)
    tc = random_transcoders(8, 12, [0], seed=2)[0]
    opt = torch.optim.Adam(tc.parameters(), lr=1e-3)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    tc(x).pow(2).sum().backward()
    opt.step()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    before = tc.W_dec.detach().clone()
    with torch.no_grad():
        resid = y - tc(x)
        resid = resid / resid.norm(dim=-1, keepdim=True)
    n = _resample(tc, dead, x, y, opt, torch.Generator().manual_seed(0))
    assert n == 3
    torch.testing.assert_close(tc.W_dec[~dead], before[~dead])
    torch.testing.assert_close(tc.W_dec[dead].norm(dim=-1), torch.ones(3))
    assert torch.all(tc.b_enc[dead] == 0)
    for p in (tc.W_enc, tc.W_dec):
        assert torch.all(opt.state[p]["exp_avg"][dead] == 0)
    # each new decoder row is the normalised residual error of one of the inputs
    dist = (tc.W_dec.detach()[dead][:, None] - resid[None]).norm(dim=-1).min(dim=1).values
    assert float(dist.max()) < 1e-5


@pytest.mark.parametrize("role,activation", [("original", "relu"), ("ln_free", "topk")])
def test_training_learns_and_reports(models, role, activation):
    model = models[role]
    tset, res = train_transcoders(model, TEXT * 6, d_transcoder=96, activation=activation, k=6, l1_coeff=3e-3,
                                  n_tokens=24_000, batch_size=96, lr=3e-3, seed=0, show_progress_bar=False)
    assert set(tset.layers) == {0, 1}
    assert [m.layer for m in res.layers] == [0, 1]
    for m in res.layers:
        assert 0 < m.fvu < 0.5, m
        assert 0 < m.l0 <= (6 if activation == "topk" else 96)
        assert 0 <= m.dead_fraction <= 1
        assert m.n_eval_tokens > 0
    # decoder rows stay unit norm after folding the scales back
    for l in tset.layers:
        torch.testing.assert_close(tset[l].W_dec.norm(dim=-1), torch.ones(96), atol=1e-5, rtol=0)
    # the reported clean CE is the model's loss on the same held-out sequences (analysis.ln_stats.loss)
    seqs = text_sequences(model.tokenizer, TEXT * 6, 64)
    n_eval = max(1, round(len(seqs) * 0.1))
    ce = spliced_loss(model, tset, seqs[-n_eval:])
    assert ce["clean"] == pytest.approx(res.ce_clean, rel=1e-9)
    assert ce["transcoders"] == pytest.approx(res.ce_transcoders, rel=1e-9)
    ref = ln_loss(model, TEXT * 6, n_bootstrap=10, per_token=False)
    all_ce = spliced_loss(model, tset, seqs)
    assert all_ce["clean"] == pytest.approx(ref.mean_loss, rel=1e-6)
    assert res.ce_recovered == pytest.approx((res.ce_zero_ablation - res.ce_transcoders)
                                             / (res.ce_zero_ablation - res.ce_clean))
    assert res.kl_to_original >= 0
    json.loads(res.model_dump_json())


def test_splice_with_exact_replacement_recovers_clean_ce(models):
    """A 'transcoder' that returns the true MLP output gives CE_tc = CE_clean and KL 0 (checks the splice)."""
    model = models["original"]
    seqs = text_sequences(model.tokenizer, TEXT, 64)
    width = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), width), model.tokenizer.pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s)
    _, cache = model.bridge.run_with_cache(toks)

    class Exact(Transcoder):
        def forward(self, x):  # the clean MLP output (the spliced inputs are the clean ones)
            return cache[f"blocks.{self.layer}.hook_mlp_out"]

    tset = TranscoderSet({l: Exact(64, 4, layer=l) for l in (0, 1)}, d_model=64)
    ce = spliced_loss(model, tset, seqs, seq_batch=len(seqs))
    assert ce["transcoders"] == pytest.approx(ce["clean"], rel=1e-6)
    assert ce["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ce["zero"] != pytest.approx(ce["clean"], rel=1e-3)


# --------------------------------------------------------------------------------------- formats
def _forward_all(tset: TranscoderSet, x: torch.Tensor) -> dict[int, torch.Tensor]:
    return {l: tset[l](x).detach() for l in tset.layers}


@pytest.mark.parametrize("activation,skip", [("relu", False), ("topk", True)])
def test_circuit_tracer_layout_round_trip(tmp_path, activation, skip):
    tset = random_transcoders(64, 48, [0, 1], seed=4, activation=activation, k=7, skip=skip)
    out = save_transcoders(tset, tmp_path / "tc", model_name="test-model", scan="test-scan")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["model_name"] == "test-model" and cfg["scan"] == "test-scan"
    assert cfg["feature_input_hook"] == "mlp.hook_in" and cfg["feature_output_hook"] == "hook_mlp_out"
    assert cfg["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]
    assert cfg["activation"] == activation and (cfg.get("k") == 7) == (activation == "topk")
    from safetensors.torch import load_file

    t = load_file(str(out / "layer_1.safetensors"))
    assert t["W_enc"].shape == (48, 64) and t["W_dec"].shape == (48, 64) and t["b_enc"].shape == (48,)
    assert t["b_dec"].shape == (64,) and ("W_skip" in t) == skip
    back = load_transcoders(out, d_model=64, n_layers=2)
    x = torch.randn(10, 64)
    for l, y in _forward_all(tset, x).items():
        torch.testing.assert_close(back[l](x), y, atol=1e-5, rtol=1e-5)
    assert [str(Path(p).parent) for p in circuit_tracer_config(out)["transcoders"]] == [str(out.resolve())] * 2


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_written_config_holds_no_absolute_path_and_loads(tmp_path):
    root = tmp_path / "models" / "mypair"
    model_dir = root / "ln_free"
    model_dir.mkdir(parents=True)
    tset = random_transcoders(64, 48, [0, 1], seed=4)
    out = save_transcoders(tset, root / "transcoders" / "ln_free", model_name=str(model_dir))
    text = (out / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert str(tmp_path) not in text and not any(Path(s).is_absolute() for s in _strings(cfg))
    assert cfg["model_name"] == "../../ln_free"
    back = load_transcoders(out, d_model=64, n_layers=2)
    assert back.model_name == str(model_dir.resolve()) and back.layers == [0, 1]
    assert circuit_tracer_config(out)["model_name"] == str(model_dir.resolve())
    # moved as a whole, the set still finds its model
    (tmp_path / "models").rename(tmp_path / "moved")
    moved = load_transcoders(tmp_path / "moved" / "mypair" / "transcoders" / "ln_free", d_model=64, n_layers=2)
    assert moved.model_name == str((tmp_path / "moved" / "mypair" / "ln_free").resolve())
    # a Hub id is written and read as given
    hub = save_transcoders(tset, tmp_path / "hub", model_name="gpt2")
    assert yaml.safe_load((hub / "config.yaml").read_text())["model_name"] == "gpt2"
    assert load_transcoders(hub).model_name == "gpt2"


def test_committed_tiny_configs_hold_no_absolute_path():
    root = Path(__file__).resolve().parents[1] / "models" / "tiny"
    configs = sorted((root / "transcoders").glob("*/config.yaml"))
    if not configs:
        pytest.skip("no committed tiny transcoders")
    for config in configs:
        cfg = yaml.safe_load(config.read_text())
        assert not any(Path(s).is_absolute() for s in _strings(cfg)), config
        role = config.parent.name
        assert load_transcoders(config.parent).model_name == str((root / role).resolve())


def test_saelens_directories(tmp_path):
    rng = torch.Generator().manual_seed(0)
    d_in, d_sae = 64, 32
    ref = {}
    for layer, skip in ((0, False), (1, True)):
        d = tmp_path / "sae" / f"blocks.{layer}.hook_mlp_in"
        d.mkdir(parents=True)
        w = {"W_enc": torch.randn(d_in, d_sae, generator=rng), "b_enc": torch.randn(d_sae, generator=rng),
             "W_dec": torch.randn(d_sae, d_in, generator=rng), "b_dec": torch.randn(d_in, generator=rng)}
        if skip:
            w["W_skip"] = torch.randn(d_in, d_in, generator=rng) * 0.1
        save_file(w, str(d / "sae_weights.safetensors"))
        (d / "cfg.json").write_text(json.dumps({
            "architecture": "skip_transcoder" if skip else "transcoder", "d_in": d_in, "d_sae": d_sae, "d_out": d_in,
            "hook_name": f"blocks.{layer}.ln2.hook_normalized", "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "activation_fn": "relu", "model_name": "gpt2"}))
        ref[layer] = w
    tset = load_transcoders(tmp_path / "sae", d_model=64, n_layers=2)
    assert tset.layers == [0, 1] and tset.feature_input_hook == "ln2.hook_normalized"
    x = torch.randn(5, 64)
    for l, w in ref.items():
        expect = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
        if "W_skip" in w:
            expect = expect + x @ w["W_skip"].T
        torch.testing.assert_close(tset[l](x), expect, atol=1e-4, rtol=1e-5)
    single = load_transcoders(tmp_path / "sae" / "blocks.1.hook_mlp_in")
    assert single.layers == [1]


def _dunefsky_state(rng, d_in=64, d_sae=32):
    return {"W_enc": torch.randn(d_in, d_sae, generator=rng), "b_enc": torch.randn(d_sae, generator=rng),
            "W_dec": torch.randn(d_sae, d_in, generator=rng), "b_dec": torch.randn(d_in, generator=rng),
            "b_dec_out": torch.randn(d_in, generator=rng)}


def _dunefsky_ref(sd, x):
    return torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]) @ sd["W_dec"] + sd["b_dec_out"]


def test_dunefsky_pt_files(tmp_path):
    rng = torch.Generator().manual_seed(1)
    sds = {}
    for layer in (0, 1):
        sd = _dunefsky_state(rng)
        cfg = {"hook_point": f"blocks.{layer}.ln2.hook_normalized", "hook_point_layer": layer, "d_in": 64, "d_sae": 32,
               "out_hook_point": f"blocks.{layer}.hook_mlp_out", "is_transcoder": True, "model_name": "gpt2-small",
               "dtype": torch.float32, "device": "cpu"}
        name = f"final_sparse_autoencoder_gpt2-small_blocks.{layer}.ln2.hook_normalized_32.pt"
        torch.save({"cfg": cfg, "state_dict": sd}, tmp_path / name)
        sds[layer] = sd
    tset = load_transcoders(tmp_path, d_model=64, n_layers=2)
    x = torch.randn(6, 64)
    for l, sd in sds.items():
        torch.testing.assert_close(tset[l](x), _dunefsky_ref(sd, x), atol=1e-4, rtol=1e-5)
    one = load_transcoders(next(tmp_path.glob("*blocks.1.*")))
    assert one.layers == [1]


def test_dunefsky_pickled_config_class_is_inert(tmp_path):
    """The real files pickle sae_training.config.LanguageModelSAERunnerConfig: rebuilt as data, not run."""
    mod, sub = types.ModuleType("sae_training"), types.ModuleType("sae_training.config")

    @dataclasses.dataclass
    class LanguageModelSAERunnerConfig:
        hook_point: str = "blocks.1.ln2.hook_normalized"
        hook_point_layer: int = 1
        d_in: int = 64
        dtype: torch.dtype = torch.float32

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    sub.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    sys.modules["sae_training"], sys.modules["sae_training.config"] = mod, sub
    try:
        sd = _dunefsky_state(torch.Generator().manual_seed(2))
        torch.save({"cfg": LanguageModelSAERunnerConfig(), "state_dict": sd}, tmp_path / "tc.pt")
    finally:
        del sys.modules["sae_training"], sys.modules["sae_training.config"]
    tset = load_transcoders(tmp_path / "tc.pt", d_model=64, n_layers=2)
    assert tset.layers == [1]
    x = torch.randn(3, 64)
    torch.testing.assert_close(tset[1](x), _dunefsky_ref(sd, x), atol=1e-4, rtol=1e-5)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = _dunefsky_state(torch.Generator().manual_seed(3))
    torch.save({"cfg": _Evil(str(marker)), "state_dict": sd}, tmp_path / "evil.pt")
    with pytest.raises(TranscoderFormatError, match="refusing to load.*(system|os)"):
        load_transcoders(tmp_path / "evil.pt")
    assert not marker.exists()
    # a plain pickle (not a torch zip) with an eval call is refused too
    import pickle

    class _Eval:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump({"cfg": _Eval(), "state_dict": {}}, f)
    with pytest.raises(TranscoderFormatError):
        load_transcoders(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_shape_and_layer_errors(tmp_path, models):
    tset = random_transcoders(32, 16, [0], seed=5)  # d_model 32, the model has 64
    save_transcoders(tset, tmp_path / "small")
    with pytest.raises(TranscoderFormatError, match="d_model=32.*64"):
        load_transcoders(tmp_path / "small", model=models["original"])
    far = random_transcoders(64, 16, [5], seed=5)  # layer 5 of a 2-layer model
    save_transcoders(far, tmp_path / "far")
    with pytest.raises(TranscoderFormatError, match="layer 5"):
        load_transcoders(tmp_path / "far", model=models["original"])
    ok = random_transcoders(64, 16, [0, 1], seed=5)
    save_transcoders(ok, tmp_path / "missing")
    (tmp_path / "missing" / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderFormatError, match="layer 1 file .* missing"):
        load_transcoders(tmp_path / "missing")
    save_file({"W_enc": torch.zeros(16, 64), "W_dec": torch.zeros(16, 32), "b_enc": torch.zeros(16),
               "b_dec": torch.zeros(64)}, str(tmp_path / "missing" / "layer_1.safetensors"))
    with pytest.raises(TranscoderFormatError, match="W_dec has shape"):
        load_transcoders(tmp_path / "missing")
    save_file({"W_enc": torch.zeros(16, 64)}, str(tmp_path / "missing" / "layer_1.safetensors"))
    with pytest.raises(TranscoderFormatError, match="missing"):
        load_transcoders(tmp_path / "missing")
    with pytest.raises(TranscoderFormatError, match="no transcoders"):
        load_transcoders(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TranscoderFormatError, match="holds no transcoders"):
        load_transcoders(tmp_path / "empty")


def test_load_for_pair_uses_models_dir(tmp_path, monkeypatch, models):
    monkeypatch.setenv("LNSCOPE_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(TranscoderFormatError, match="train-transcoders"):
        load_transcoders_for("mypair", "ln_free")
    tset = random_transcoders(64, 16, [0, 1], seed=6)
    save_transcoders(tset, tmp_path / "models" / "mypair" / "transcoders" / "ln_free")
    back = load_transcoders_for("mypair", "ln_free", model=models["ln_free"])
    assert back.layers == [0, 1] and back.d_model == 64


def test_cli_train_transcoders(tmp_path, trio_dirs, capsys):
    from lnscope.analysis.transcoders.cli import register

    (tmp_path / "lnscope.toml").write_text(
        "[pairs.trio]\n"
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n')
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(TEXT * 4))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "tc"
    args = parser.parse_args(["train-transcoders", "trio", "--role", "ln_free", "--d-transcoder", "32",
                              "--n-tokens", "2048", "--batch-size", "64", "--text", str(text), "--out", str(out),
                              "--index-top-k", "4", "--quiet", "--dtype", "float32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "CE clean" in printed
    assert (out / "config.yaml").is_file() and (out / "layer_1.safetensors").is_file()
    assert (out / "feature_index.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["role"] == "ln_free" and len(metrics["layers"]) == 2
    assert metrics["manifest"]["roles"]["ln_free"]["ln_treatment"] == "removed"
    back = load_transcoders(out, d_model=64, n_layers=2)
    assert back.d_transcoder == 32
    assert math.isfinite(metrics["ce_transcoders"])
