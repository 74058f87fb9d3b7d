import pytest
import torch

from lnscope.analysis.device import resolve_device, resolve_dtype
from lnscope.analysis.errors import ConfigError


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device().type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device().type == "cuda"
    assert resolve_device("cpu").type == "cpu"  # explicit wins


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("LNSCOPE_DEVICE", "cpu")
    monkeypatch.setenv("LNSCOPE_DTYPE", "float64")
    assert resolve_device().type == "cpu"
    assert resolve_dtype() == torch.float64
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_bad_device_and_dtype_are_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("quantum")
    with pytest.raises(ConfigError, match="float128"):
        resolve_dtype("float128")
    with pytest.raises(ConfigError, match="MPS"):
        resolve_dtype("float64", torch.device("mps"))
