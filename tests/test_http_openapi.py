"""The OpenAPI description at /v1/openapi.json, exercised by schemathesis (a property-based
client: generated valid and invalid requests) against the real server on 127.0.0.1: no 5xx,
and every answer's status, content type and body conform to the description."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving import Searcher
from serving.http import create_app
from serving.limits import ServerLimits
from serving.openapi import openapi_document
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, running

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """A run of one 16-d embedder whose recorded image model does not exist here (image
    queries that decode answer 503 embedder_unavailable, a documented answer)."""
    root = tmp_path_factory.mktemp("openapi_root")
    rf.write_run(root, {"vec": VEC}, run_id="20260101T000000Z-oapi01")
    limits = ServerLimits(keep_alive_timeout=2, body_timeout=5, max_body_bytes=1 << 20)
    with running(create_app(Searcher.open(root), limits=limits), limits=limits) as url:
        yield url


# The description as the app serves it (test_openapi_is_served_as_written checks that the
# server answers this one); loaded at import, as schemathesis' lazy fixture loader does not
# work with pytest 9.
VEC = rf.vector_embedder("vec", 200, 16, seed=2)
EXAMPLES = {
    "vector-vec": {"vector": VEC.vectors[3].tolist(), "k": 5, "embedder": "vec"},
    "id-vec": {"id": VEC.ids[0], "k": 3, "embedder": "vec", "exclude_self": True},
}
schema = schemathesis.openapi.from_dict(openapi_document(EXAMPLES))


def test_openapi_is_served_as_written(api_url):
    status, served = call(api_url, "/v1/openapi.json")
    assert status == 200
    examples = served["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"vector-vec", "id-vec"} and len(examples["vector-vec"]["value"]["vector"]) == 16
    assert examples["id-vec"]["value"]["id"] == VEC.ids[0]
    for example in examples.values():  # the served examples are answered
        assert call(api_url, "/v1/search", example["value"])[0] == 200
    assert served == openapi_document({name: e["value"] for name, e in examples.items()})


def _exercise(case, api_url):
    response = case.call_and_validate(base_url=api_url, checks=CHECKS, timeout=30)
    if response.status_code == 503:  # only the missing image model may be unavailable
        assert response.json()["error"]["code"] == "embedder_unavailable"


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_description(case, api_url):
    _exercise(case, api_url)


@pytest.mark.stress
@schema.parametrize()
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
def test_stress_api_conforms_to_its_openapi_description(case, api_url):
    _exercise(case, api_url)
