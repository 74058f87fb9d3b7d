"""Every analysis kind answers the numbers it answered before the package restructuring.

tests/fixtures/kind_results.json holds one small request per kind on the shipped tiny trio and the
result the API gave (tests/fixtures/make_kind_results.py wrote it). Manifests and wall-clock times
are left out of the comparison: they say how a result was made, not what it is. The patching results'
`kind` field was renamed in the fixture to the API's kind names (attribution_patching ->
attribution-patching, activation_patching -> activation-patching, task_set_fidelity -> patching-fidelity).
"""

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lnscope.server.app import create_app
from lnscope.server.settings import Settings

FIXTURE = Path(__file__).parent / "fixtures" / "kind_results.json"
ROWS = json.loads(FIXTURE.read_text())
REL, ABS = 1e-5, 1e-7  # float32 results: reductions may split differently across threads between runs
SKIPPED = {"manifest", "seconds"}


def assert_same(got, want, path="result"):
    """Recursive equality of JSON values, floats to REL / ABS, the SKIPPED fields left out."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {type(got).__name__} instead of an object"
        want = {k: v for k, v in want.items() if k not in SKIPPED}
        got = {k: v for k, v in got.items() if k not in SKIPPED}
        assert set(got) == set(want), f"{path}: keys {sorted(set(got) ^ set(want))} differ"
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert math.isclose(got, want, rel_tol=REL, abs_tol=ABS), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(Settings(device="cpu", dtype="float32", preload=False, data_dir=tmp_path_factory.mktemp("data")))
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{row['kind']}" for i, row in enumerate(ROWS)])
def test_kind_gives_the_stored_numbers(client, row):
    r = client.post(f"/api/v1/analyses/{row['kind']}?wait=true&timeout=600", json={"pair": "tiny", **row["request"]})
    assert r.status_code == 200, r.text
    assert_same(r.json()["result"], row["result"])


def test_the_comparison_can_fail():
    want = ROWS[0]["result"]
    got = json.loads(json.dumps(want))
    heads = got["roles"]["original"]["treatments"]["cached_scale"]["heads"]
    heads[0][0] *= 1 + 1e-4
    with pytest.raises(AssertionError, match="heads"):
        assert_same(got, want)
