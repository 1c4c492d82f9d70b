"""Fuzz the server over its own OpenAPI schema with schemathesis: no request may get a 5xx.

60 examples per endpoint, the same ones every run (derandomized, so CI is not flaky);
`XIAOLM_FUZZ_EXAMPLES=500 pytest tests/test_serve_fuzz.py` hunts longer with fresh random examples.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the API fuzzing needs schemathesis: pip install 'xiaolm[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from serve_helpers import run_server, serving_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tokenizer):
    checkpoint = serving_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", tokenizer)
    # small limits so every generated request that passes validation finishes fast
    with run_server(checkpoint, model_name="tiny", num_slots=4, max_tokens=8, max_body_bytes=100_000) as served:
        yield served


def test_no_request_gets_a_server_error(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=int(os.environ.get("XIAOLM_FUZZ_EXAMPLES", 60)), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize="XIAOLM_FUZZ_EXAMPLES" not in os.environ)
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])
            if isinstance(case.body, dict) and "model" in case.body:
                # the same body for the served model, so it gets past the model check into generation
                case.body = {**case.body, "model": "tiny"}
                case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
    assert fuzzed.server.engine.num_running <= fuzzed.server.engine.num_slots
