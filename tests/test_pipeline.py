"""The kinds table and the request pipeline: units that pickle, a pure combine, errors naming the field.

Every kind's per-role partial result survives a pickle round trip (as it must to run on a model
worker in another process), and combining the unpickled partials gives the same result as the
in-process run.
"""

import json
import pickle

import pytest
from pydantic import BaseModel, ValidationError

from lnscope.analysis.errors import UnknownRoleError
from lnscope.analysis.kinds import KINDS, Kind, KindOptions, Limits, RequestError
from lnscope.analysis.loading import model_cache
from lnscope.analysis.pairs import PairRegistry
from lnscope.analysis.pipeline import combine_partials, execute_units, prepare_run, run_prepared
from lnscope.analysis.requests import AnalysisRequest
from tests.test_kind_results import ROWS, assert_same


@pytest.fixture(scope="module")
def tiny():
    return PairRegistry.load().get("tiny")


def test_the_table_is_written_out_with_the_api_s_kind_names():
    assert list(KINDS) == ["dla", "ln-stats", "loss", "confidence-neurons", "attribution-patching",
                           "activation-patching", "patching-fidelity", "circuit", "circuit-diff", "feature",
                           "intervene"]
    for name, kind in KINDS.items():
        assert isinstance(kind, Kind) and kind.name == name
        assert issubclass(kind.options, KindOptions) and callable(kind.unit) and callable(kind.combine)
        assert kind.options.model_config.get("extra") == "forbid"


def _request(row) -> AnalysisRequest:
    return AnalysisRequest(pair="tiny", **row["request"])


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{row['kind']}" for i, row in enumerate(ROWS)])
def test_partials_pickle_and_combine_to_the_in_process_result(tiny, row):
    run = prepare_run(row["kind"], _request(row), tiny, Limits())
    models = model_cache.load_pair(tiny, run.roles, device="cpu", dtype="float32")
    expected = run_prepared(run, models)
    kinds_seen = set()

    def run_unit_elsewhere(role, shared, progress):
        """The unit with its context and partial sent through pickle, as to and from a model worker."""
        run_again = pickle.loads(pickle.dumps((run.inputs, run.options, dict(shared))))
        inputs, options, shared_copy = run_again
        from lnscope.analysis.kinds import UnitContext

        partial = run.kind.unit(UnitContext(model=models[role], inputs=inputs, options=options, seed=run.request.seed,
                                            pair=tiny, progress=progress, shared=shared_copy))
        assert isinstance(partial, BaseModel)
        kinds_seen.add(type(partial).__name__)
        return pickle.loads(pickle.dumps(partial))

    partials, lead = execute_units(run.kind, run.roles, run_unit_elsewhere)
    combined = combine_partials(run.kind, partials, models, lead=lead, inputs=run.inputs, options=run.options,
                                pair=tiny, seed=run.request.seed)
    assert type(combined) is type(expected) and kinds_seen
    assert_same(json.loads(combined.model_dump_json()), json.loads(expected.model_dump_json()))
    assert combined.manifest.kind == row["kind"] and list(combined.manifest.roles) == list(partials)


def test_the_lead_role_runs_first_and_its_choice_reaches_the_others(tiny):
    kind = KINDS["circuit"]
    order, seen = [], {}

    def fake_unit(role, shared, progress):
        order.append(role)
        seen[role] = dict(shared)
        return kind.options()  # any BaseModel stands in for a partial

    kind_with_fake_shares = Kind(**{**kind.__dict__, "shares": lambda partial: {"from": "lead"}})
    partials, lead = execute_units(kind_with_fake_shares, ["control", "ln_free", "original"], fake_unit)
    assert lead == "original" and order[0] == "original"
    assert seen == {"original": {}, "ln_free": {"from": "lead"}, "control": {"from": "lead"}}
    assert list(partials) == ["original", "ln_free", "control"]  # the circuit kind lists roles in ROLES order


def test_prepare_run_names_the_field_of_bad_input(tiny):
    with pytest.raises(RequestError, match="unknown analysis kind"):
        prepare_run("nope", AnalysisRequest(pair="tiny", prompts=["a"]), tiny, Limits())
    with pytest.raises(ValidationError):
        prepare_run("dla", AnalysisRequest(pair="tiny", prompts=["a"], options={"top_k_neurons": -1}), tiny, Limits())
    with pytest.raises(RequestError) as err:
        prepare_run("circuit", AnalysisRequest(pair="tiny", task={"name": "ioi"}), tiny, Limits())
    assert err.value.loc == ["body", "prompts"]
    with pytest.raises(RequestError) as err:
        prepare_run("dla", AnalysisRequest(pair="tiny", prompts=["a"], options={
            "target": {"kind": "logit", "token": " Mary and John"}}), tiny, Limits())
    assert err.value.loc == ["body", "options", "target", "token"]
    with pytest.raises(RequestError) as err:
        prepare_run("circuit-diff", AnalysisRequest(pair="tiny", prompts=["a"], roles=["original"]), tiny, Limits())
    assert err.value.loc == ["body", "roles"]


def test_a_role_the_pair_lacks_is_refused_before_any_model_loads(tmp_path, trio_dirs):
    from lnscope.analysis.pairs import ModelSource, PairSpec

    pair = PairSpec(name="two", original=ModelSource(path=trio_dirs["original"]),
                    ln_free=ModelSource(path=trio_dirs["ln_free"]))
    with pytest.raises(UnknownRoleError, match="roles\\[1\\]"):
        prepare_run("dla", AnalysisRequest(pair="two", prompts=["a"], roles=["original", "control"]), pair, Limits())


def test_options_reach_the_unit_as_one_typed_object_with_their_defaults(tiny):
    run = prepare_run("loss", AnalysisRequest(pair="tiny"), tiny, Limits())
    assert run.options == KINDS["loss"].options()
    assert run.stored_inputs()["options"] == KINDS["loss"].options().model_dump(mode="json")
    assert run.roles == ["original", "ln_free", "control"]
