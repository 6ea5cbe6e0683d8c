"""Schema fuzzing of the live server with schemathesis: about 1,000 requests generated from our own OpenAPI
document (valid and invalid bodies alike) against a real socket. None may get a 5xx; every status code, content
type and body must be one the document declares."""
from __future__ import annotations

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

EXAMPLES = 600  # per operation: the two POST endpoints take all; the GETs have little to vary


@pytest.fixture(scope="module")
def fuzz_schema(start_server, tiny_llama_dir):
    # A short context keeps every generated request to a few dozen decode steps.
    server = start_server(model=str(tiny_llama_dir), served_model_name="tiny", max_model_len=96, max_queue=4096)
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def _cases(operation):
    """Valid cases, and invalid ones where the operation takes any input to break."""
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if operation.method.upper() != "POST":
        return positive
    return st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))


def test_no_server_error_and_responses_as_documented(fuzz_schema):
    """Every operation of the document, EXAMPLES generated cases each (schemathesis strategies under hypothesis,
    valid and invalid bodies alike): no 5xx, and status, content type and body as documented. Half of the
    bodies name the served model, so that generation itself is fuzzed, not only the 404."""
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: dict[tuple[str, int], int] = {}
    for result in fuzz_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=_cases(operation), served_model=st.booleans())
        def fuzz(case, served_model):
            if served_model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "tiny"
            response = case.call(timeout=60)
            key = (operation.label, response.status_code)
            statuses[key] = statuses.get(key, 0) + 1
            case.validate_response(response, checks=checks)

        fuzz()
    print(sorted(statuses.items()))
    assert sum(statuses.values()) >= 1000, statuses
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert statuses.get((label, 200), 0) >= 20, statuses  # real generations among them
        assert statuses.get((label, 400), 0) >= 20, statuses
