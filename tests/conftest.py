import os

import pytest

# Tests never touch the network: any Hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def trio_dirs(tmp_path_factory):
    """A random 2-layer trio saved with save_pretrained (ln_free in the released format)."""
    from tests.checkpoints import build_trio

    return build_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch, tmp_path):
    """No test reads the developer's ./lnscope.toml or environment."""
    monkeypatch.delenv("LNSCOPE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LNSCOPE_DEVICE", raising=False)
    monkeypatch.delenv("LNSCOPE_DTYPE", raising=False)
