import json

import pytest

from lnscope.analysis.cli import main


def test_check_pair_on_local_directories_as_json(trio_dirs, capsys):
    code = main([
        "check-pair", "--original", str(trio_dirs["original"]), "--ln-free", str(trio_dirs["ln_free"]),
        "--control", str(trio_dirs["control"]), "--device", "cpu", "--dtype", "float64", "--json",
    ])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    roles = {r["role"]: r for r in result["roles"]}
    assert set(roles) == {"original", "ln_free", "control"}
    for r in roles.values():
        assert r["device"] == "cpu" and r["dtype"] == "float64" and r["load_seconds"] > 0
        assert r["max_rel_logit_error"] < 1e-6
        assert r["dla_sum_rel_error"] < 1e-6
    assert roles["ln_free"]["hook_scale_hooks"] == 0


def test_check_pair_table_from_a_configured_pair(trio_dirs, tmp_path, capsys):
    (tmp_path / "lnscope.toml").write_text(
        f'[pairs.mine]\noriginal = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
    )
    assert main(["check-pair", "mine", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pair mine" in out and "max_rel_logit_error" in out and "ln_free" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check-pair", "no-such-pair"], "unknown pair 'no-such-pair'"),
        (["check-pair"], "give a pair NAME"),
        (["check-pair", "tiny", "--original", "/x"], "not both"),
        (["check-pair", "--original", "/nonexistent/a", "--ln-free", "/nonexistent/b"], "does not exist"),
        (["check-pair", "--original", "/x", "--ln-free", "/y", "--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_cli_errors_are_one_line_messages_not_tracebacks(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_normal_checkpoint_as_ln_free_is_refused_on_the_cli(trio_dirs, capsys):
    code = main(["check-pair", "--original", str(trio_dirs["original"]), "--ln-free", str(trio_dirs["original"])])
    assert code == 1
    assert "registered as `ln_free`" in capsys.readouterr().err


def test_pairs_listing(capsys):
    assert main(["pairs", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default_pair"] == "tiny"
    names = {p["name"] for p in listing["pairs"]}
    assert {"gpt2-small", "gpt2-xl", "gpt2-small-2024", "tiny"} <= names
