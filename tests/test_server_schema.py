"""Property tests of `sot serve` from its own OpenAPI schema (schemathesis): no request, valid or not, gets a 500,
and every response matches what the schema documents (status codes, content types, bodies, each SSE event).

The app runs in-process on the scripted backend, with an API key so the auth checks run too. Deliberately
not checked: that every schema-valid request is accepted, since some rules cannot be written in the schema
(the conversation must end with a user message; text content only) and are answered with a clear 400.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from sot.backends.scripted import ScriptedBackend
from sot.server import ServerSettings, create_app

KEY = "schema-test-key"
app = create_app(ScriptedBackend(), ServerSettings(api_key=KEY, max_tokens_limit=1000))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_documents_every_endpoint_and_the_event_types() -> None:
    document: dict[str, Any] = app.openapi()
    assert set(document["paths"]) == {
        "/health",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/chat/completions",
        "/v1/sot/stream",
    }
    assert {"ChatCompletion", "ChatCompletionRequest", "ErrorResponse", "Event", "Done", "PointDelta"} <= set(
        document["components"]["schemas"]
    )
    for path in document["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"]  # invalid requests are 400s, as on OpenAI


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_request_breaks_the_server(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[positive_data_acceptance])
