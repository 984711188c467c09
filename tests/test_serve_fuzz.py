"""Schema fuzzing: whatever the OpenAPI schema admits (and much it does not), the
service answers without a server error, and its answers match the schema."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from rosetta.config import ServeConfig  # noqa: E402
from rosetta.serve.app import create_app  # noqa: E402
from rosetta.serve.service import TranslationService  # noqa: E402

EXAMPLES = 50  # per operation: bounded, so the suite stays quick


@pytest.fixture(scope="module")
def schema(untrained_model_dir):
    """The app on a tiny untrained model (max_positions 24, so long texts are split),
    with small limits the fuzzer reaches (each call runs the app's lifespan)."""
    config = ServeConfig(max_texts=4, max_chars=200, max_beam=4, max_wait_ms=0, timeout_s=20)
    service = TranslationService.load(untrained_model_dir, config=config)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(service))


def operations(schema) -> dict[str, object]:
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def test_every_operation_is_fuzzed(schema):
    assert set(operations(schema)) == {
        "POST /v1/translate", "GET /v1/model", "GET /v1/heads", "GET /health", "GET /ready",
        "GET /languages", "POST /translate",
    }  # fmt: skip


@pytest.mark.parametrize(
    "label", ["POST /v1/translate", "POST /translate", "GET /v1/model", "GET /v1/heads"]
)
def test_no_server_error_on_any_input(schema, label):
    operation = operations(schema)[label]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case) -> None:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    call()
