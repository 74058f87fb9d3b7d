import json

import pytest

from lnscope.analysis.cli import main


@pytest.fixture
def local_pair(trio_dirs, tmp_path):
    (tmp_path / "lnscope.toml").write_text(
        "[pairs.local]\n" + "".join(f'{role} = {{ path = "{path}" }}\n' for role, path in trio_dirs.items()))
    return "local"


def test_analyze_dla_json_and_summary(local_pair, capsys, tmp_path):
    options = json.dumps({"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 20})
    prompts = ["--prompt", "When Mary and John went to the store, John gave a drink to", "--prompt", "The dog"]
    out_file = tmp_path / "dla.json"
    assert main(["analyze", "dla", local_pair, *prompts, "--options", options, "--json", "--out", str(out_file),
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == result
    assert result["manifest"]["kind"] == "dla" and set(result["roles"]) == {"original", "ln_free", "control"}
    assert result["roles"]["ln_free"]["errors"]["cached_scale"]["nmae"]["value"] < 1e-3

    assert main(["analyze", "dla", local_pair, *prompts, "--options", options, "--roles", "original", "ln_free"]) == 0
    summary = capsys.readouterr().out
    assert "NMAE" in summary and "ln_free" in summary and "control" not in summary


@pytest.mark.parametrize("kind, extra, expect", [
    ("loss", [], "CE (nats)"),
    ("ln-stats", ["--prompt", "The dog found a ball"], "final residual norm"),
    ("confidence-neurons", ["--options", '{"max_tokens": 128, "top_n": 3}'], "LN-mediated"),
])
def test_analyze_other_kinds(local_pair, capsys, kind, extra, expect):
    assert main(["analyze", kind, local_pair, *extra]) == 0
    assert expect in capsys.readouterr().out


def test_analyze_text_file(local_pair, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The dog found a red ball.\n\nThe capital of France is Paris.\n")
    assert main(["analyze", "loss", local_pair, "--text-file", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["roles"]["original"]["n_sequences"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--options", "{not json"], "invalid options"),
    (["--options", '{"target": {"kind": "logit", "token": " Paris"}}', "--prompt", "x"], "options.target.token"),
    (["--prompt", "x"], "options.target"),
])
def test_analyze_errors_are_messages(local_pair, capsys, argv, message):
    assert main(["analyze", "dla", local_pair, *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
