"""Loading a trio exactly: the foundation bars, on checkpoints the tests build themselves."""

import threading

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from lnscope.analysis.checks import CHECK_PROMPTS, check_model, dla_sum_rel_error, log_prob_rel_error, tokenize_prompts
from lnscope.analysis.errors import ModelLoadError, NotLnFreeError
from lnscope.analysis.loading import ModelCache, httpx, load_model  # httpx: the client huggingface_hub is built on
from lnscope.analysis.pairs import ModelSource


def src(path):
    return ModelSource(path=path)


class ExactLinearLN(nn.Module):
    """The map a released-format LN stands for: (x - mean) * weight / sqrt(eps) + bias, exactly."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight / self.eps**0.5 + self.bias


def exact_linear_reference(path) -> GPT2LMHeadModel:
    """Independent float64 recomputation: the raw checkpoint with every LN made exactly linear."""
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, child_name, ExactLinearLN(child))
    return model


@pytest.fixture(scope="module")
def ln_free64(trio_dirs):
    return load_model(src(trio_dirs["ln_free"]), "ln_free", device="cpu", dtype="float64")


def test_ln_free_has_no_normalization_left(ln_free64):
    bridge = ln_free64.bridge
    assert not [n for n in bridge.hook_dict if n.endswith("hook_scale")]
    assert not [n for n, m in bridge.named_modules() if isinstance(m, nn.LayerNorm)]
    assert not [n for n, m in bridge.original_model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert "blocks.0.hook_resid_mid" in bridge.hook_dict  # the residual hooks survive
    assert ln_free64.ln_treatment == "removed" and ln_free64.manifest()["ln_treatment"] == "removed"


@torch.no_grad()
def test_ln_free_equals_the_exact_linear_map_in_float64(trio_dirs, ln_free64):
    tokens, lengths = tokenize_prompts(ln_free64.tokenizer, CHECK_PROMPTS, 64)
    reference = exact_linear_reference(trio_dirs["ln_free"])(tokens).logits.log_softmax(-1)
    ours = ln_free64.bridge(tokens).log_softmax(-1)
    assert log_prob_rel_error(ours, reference, lengths) < 1e-12


@pytest.mark.parametrize("role", ["original", "ln_free", "control"])
@pytest.mark.parametrize("dtype, logit_tol, dla_tol", [("float64", 1e-6, 1e-6), ("float32", 1e-4, 1e-4)])
def test_log_probs_match_hugging_face_and_dla_sums_to_the_logits(trio_dirs, role, dtype, logit_tol, dla_tol):
    result = check_model(src(trio_dirs[role]), role, device="cpu", dtype=dtype)
    assert result.max_rel_logit_error < logit_tol
    # ln_free: exact; original/control: with the final LN scale frozen at its cached value
    assert result.dla_sum_rel_error < dla_tol
    assert result.dla_final_scale == ("none" if role == "ln_free" else "frozen")
    assert (result.hook_scale_hooks == 0) == (role == "ln_free")


def test_dla_check_is_not_vacuous(trio_dirs):
    """Without freezing the final LN scale, a model with LN does not decompose linearly."""
    loaded = load_model(src(trio_dirs["original"]), "original", device="cpu", dtype="float64")
    tokens, lengths = tokenize_prompts(loaded.tokenizer, CHECK_PROMPTS, 64)
    assert dla_sum_rel_error(loaded, tokens, lengths) < 1e-10
    logits, cache = loaded.bridge.run_with_cache(tokens)
    resid = cache["blocks.1.hook_resid_post"]
    unscaled = resid @ loaded.bridge.W_U + loaded.bridge.b_U
    assert (unscaled - logits).abs().max() / logits.abs().max() > 1e-2


def test_a_normal_checkpoint_registered_as_ln_free_is_refused(trio_dirs):
    with pytest.raises(NotLnFreeError, match=r"registered as `ln_free`.*eps=1e-05.*1e12"):
        load_model(src(trio_dirs["original"]), "ln_free", device="cpu")


def test_a_missing_local_directory_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(src(tmp_path / "nowhere"), "original", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(src(tmp_path / "empty"), "original", device="cpu")


def _transport(monkeypatch, handler):
    """Replace only the HTTP transport of huggingface_hub; the loader runs unchanged."""
    import huggingface_hub
    from huggingface_hub import set_client_factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    monkeypatch.setattr("huggingface_hub.utils._http._GLOBAL_CLIENT", None, raising=False)


@pytest.fixture
def restore_transport():
    yield
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    set_client_factory(default_client_factory)


def _no_network(request):
    raise httpx.ConnectError("network unreachable", request=request)


def _status(code, error_code, message):
    def handler(request):
        return httpx.Response(code, headers={"X-Error-Code": error_code, "X-Error-Message": message}, request=request)

    return handler


@pytest.mark.parametrize(
    "handler, reason",
    [
        (_no_network, "cannot be reached"),
        (_status(404, "RepoNotFound", "Repository not found"), "no such model"),
        (_status(401, "GatedRepo", "Access to this model is restricted"), "gated"),
        (_status(404, "RevisionNotFound", "Invalid rev id: nope"), "revision 'nope' does not exist"),
    ],
)
def test_unreachable_hub_ids_are_explained(monkeypatch, restore_transport, tmp_path, handler, reason):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    _transport(monkeypatch, handler)
    source = ModelSource(hub_id="lnscope-tests/not-a-model", revision="nope")
    with pytest.raises(ModelLoadError) as info:
        load_model(source, "ln_free", device="cpu")
    message = str(info.value)
    assert "lnscope-tests/not-a-model" in message and reason in message
    assert 'ln_free = { path = "DIR" }' in message and "--ln-free DIR" in message


def test_each_model_loads_once_even_when_asked_for_concurrently(trio_dirs):
    cache = ModelCache()
    results, errors = [], []

    def ask():
        try:
            results.append(cache.get(src(trio_dirs["ln_free"]), "ln_free", device="cpu", dtype="float32"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.loads == 1 and all(r is results[0] for r in results)
    assert cache.is_loaded(src(trio_dirs["ln_free"]), "ln_free", device="cpu", dtype="float32")
    other = cache.get(src(trio_dirs["ln_free"]), "ln_free", device="cpu", dtype="float64")
    assert other is not results[0] and cache.loads == 2  # a dtype is a different model
