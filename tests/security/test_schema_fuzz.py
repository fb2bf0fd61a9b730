"""schemathesis against the live OpenAPI schema, in ASGI mode on ``create_app()``, authenticated.

Every documented operation gets generated requests, valid (positive) and invalid (negative),
with random ids and with the ids of real objects (so ownership, state and streaming code runs, not
only the 404 path). Checks: no 5xx, and every documented response matches its schema. Runs on
SQLite and PostgreSQL (PostgreSQL refuses NUL characters that SQLite stores).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.security.conftest import Tenants

EXAMPLES = 8  # per operation and mode: ~25 operations x 3 modes x 8 = a few hundred cases
CHECKS = [not_a_server_error, response_schema_conformance]


# PostgreSQL only: it is the stricter database (NUL bytes, types), and one run keeps CI short.
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.timeout(900)
def test_schema_fuzz(client: TestClient, tenants: Tenants) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    auth = {"Authorization": tenants.admin["Authorization"]}
    real_ids = {"job_id": tenants.finished_job_id, "file_id": tenants.file_id, "step": 1}
    cases = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        pinned = {k: v for k, v in real_ids.items() if k in names}
        modes: list[tuple[GenerationMode, dict[str, Any] | None]] = [
            (GenerationMode.POSITIVE, None)
        ]
        if list(operation.iter_parameters()) or operation.get_request_payload_content_types():
            modes.append((GenerationMode.NEGATIVE, None))  # something there to make invalid
        if pinned:
            modes.append((GenerationMode.POSITIVE, pinned))
        for mode, path_parameters in modes:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @hypothesis_settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                nonlocal cases
                cases += 1
                headers = {**(case.headers or {}), **auth}
                # A generous read timeout: on a loaded 2-core runner a request can wait on the CPU.
                response = case.call(headers=headers, timeout=60)
                assert "Traceback" not in response.text, response.text[:500]
                case.validate_response(response, checks=CHECKS, headers=headers)

            try:
                run()
            except Unsatisfiable:
                # No parameter or body to make invalid (e.g. GET /healthz): nothing negative to try.
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(f"schemathesis: {cases} cases over {len(operations)} operations")
    assert cases >= 200
