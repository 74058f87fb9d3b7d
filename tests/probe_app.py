"""An lnscope app with the test `probe` kind, for tests that run a real uvicorn process."""

from lnscope.analysis.kinds import KINDS
from lnscope.server.app import create_app
from tests.probe_kind import PROBE


def app_factory():
    app = create_app()
    KINDS["probe"] = PROBE
    return app
