"""An lnscope app with the test `probe` kind, for tests that run a real uvicorn process."""

from lnscope.server.app import create_app
from lnscope.analysis.kinds import KINDS, Kind
from tests.probe_kind import ProbeOptions, run_probe


def app_factory():
    app = create_app()
    KINDS["probe"] = Kind("probe", "test kind", "prompts_or_task", ProbeOptions, run_probe)
    return app
