"""Property-based: schemathesis generates requests from the OpenAPI spec; none may get a 5xx."""

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.server.app import create_app
from lnscope.server.settings import Settings
from tests.checkpoints import build_trio

_ROOT = Path(tempfile.mkdtemp(prefix="lnscope-fuzz-"))
_CONFIG = _ROOT / "lnscope.toml"
_CONFIG.write_text('default_pair = "local"\n[pairs.local]\n'
                   + "".join(f'{role} = {{ path = "{path}" }}\n' for role, path in build_trio(_ROOT / "trio").items()))
# Jobs are bounded so generated requests cannot pile up work: a generous queue (no "queue full"
# answers), a short job time limit and a short inline wait.
APP = create_app(
    Settings(device="cpu", preload=False, data_dir=_ROOT / "data", workers=1, max_queue=100_000,
             job_timeout_s=5, inline_wait_s=1, max_prompts=4, max_prompt_tokens=32),
    registry=PairRegistry.load(_CONFIG), cache=ModelCache(),
)
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    )
