from pathlib import Path

import pytest

from lnscope.analysis.errors import ConfigError, UnknownPairError, UnknownRoleError
from lnscope.analysis.pairs import ROLES, ModelSource, PairRegistry, builtin_pairs, models_dir


def test_builtin_pairs_carry_the_papers_ids_and_revisions():
    pairs = builtin_pairs()
    assert {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-small-2024", "tiny"} <= set(pairs)
    small = pairs["gpt2-small"]
    assert (small.original.hub_id, small.ln_free.hub_id, small.control.hub_id) == (
        "gpt2", "schaeff/gpt2-small_LNFree300", "schaeff/gpt2-small_vanilla300")
    assert pairs["gpt2-xl"].ln_free.hub_id == "schaeff/gpt2-xl_LNFree800"
    assert pairs["gpt2-large"].control.hub_id == "schaeff/gpt2-large_vanilla600"
    assert pairs["gpt2-medium"].original.hub_id == "gpt2-medium"
    y2024 = pairs["gpt2-small-2024"]
    assert (y2024.ln_free.hub_id, y2024.ln_free.revision) == ("apollo-research/gpt2_noLN", "v4")
    assert (y2024.control.hub_id, y2024.control.revision) == ("apollo-research/gpt2_noLN", "vanilla_1200")
    tiny = pairs["tiny"]
    assert tiny.ln_free.path == models_dir() / "tiny" / "ln_free"
    assert list(tiny.roles()) == list(ROLES)


def test_default_registry_without_a_config_file():
    registry = PairRegistry.load()
    assert registry.default_pair == "tiny"
    assert "gpt2-small" in registry


def test_user_pairs_from_toml(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "my.toml"
    cfg.write_text(
        'default_pair = "mine"\n'
        "[pairs.mine]\n"
        'description = "my run"\n'
        'original = "gpt2"\n'
        'ln_free = { path = "./sub/noln" }\n'
        'control = { id = "me/vanilla", revision = "v2" }\n'
        "[pairs.gpt2-small]\n"
        'original = "/abs/orig"\n'
        'ln_free = "/abs/noln"\n'
    )
    monkeypatch.setenv("LNSCOPE_CONFIG", str(cfg))
    registry = PairRegistry.load()
    assert registry.default_pair == "mine"
    mine = registry.get("mine")
    assert mine.original == ModelSource(hub_id="gpt2")
    assert mine.ln_free.path == (tmp_path / "sub" / "noln").resolve()  # relative to the config file
    assert (mine.control.hub_id, mine.control.revision) == ("me/vanilla", "v2")
    assert not mine.builtin and mine.description == "my run"
    overridden = registry.get("gpt2-small")  # a user pair may replace a built-in
    assert overridden.original.path == Path("/abs/orig") and overridden.control is None
    with pytest.raises(UnknownRoleError, match="control"):
        overridden.source("control")


def test_default_config_is_read_from_the_working_directory(tmp_path):
    (tmp_path / "lnscope.toml").write_text('[pairs.here]\noriginal = "a/b"\nln_free = "c/d"\n')
    assert "here" in PairRegistry.load()


@pytest.mark.parametrize(
    "text, message",
    [
        ('[pairs.x]\noriginal = "gpt2"\n', "missing role `ln_free`"),
        ('[pairs.x]\noriginal = "gpt2"\nln_free = "a/b"\nsurprise = 1\n', "unknown keys"),
        ('[pairs.x]\noriginal = "gpt2"\nln_free = { id = "a/b", path = "/c" }\n', "not both"),
        ('[pairs.x]\noriginal = "gpt2"\nln_free = { revision = "v1" }\n', "needs `id`"),
        ('[pairs.x]\noriginal = 3\nln_free = "a/b"\n', "pairs.x.original"),
        ('default_pair = "nope"\n', "default_pair 'nope'"),
        ("this is = = not toml", "not valid TOML"),
        ('colour = "blue"\n', "unknown top-level keys"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        PairRegistry.load(cfg)


def test_missing_explicit_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LNSCOPE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        PairRegistry.load()


def test_unknown_pair_lists_the_known_ones():
    with pytest.raises(UnknownPairError, match="known pairs: .*gpt2-small"):
        PairRegistry.load().get("gpt5")
