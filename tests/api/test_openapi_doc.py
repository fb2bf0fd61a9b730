"""The OpenAPI document teaches: bearer auth, real error bodies with examples, request examples,
a multipart upload body; and the documented error shape is what the server really sends."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def doc(client: Any) -> dict[str, Any]:
    return dict(client.get("/openapi.json").json())


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_bearer_scheme_and_401_on_every_secured_operation(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    secured = [(p, m, op) for p, m, op in _operations(doc) if op.get("security")]
    assert len(secured) > 20
    for path, method, op in secured:
        assert op["security"] == [{"bearerAuth": []}], (path, method)
        example = op["responses"]["401"]["content"]["application/json"]["example"]
        assert "error" in example, (path, method)
        params = [p["name"].lower() for p in op.get("parameters", [])]
        assert "authorization" not in params, f"{method} {path}: auth is the scheme, not a header"
    public = {(p, m) for p, m, op in _operations(doc) if not op.get("security")}
    assert ("/healthz", "get") in public and ("/readyz", "get") in public


def test_every_error_response_has_the_real_shape_and_an_example(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, method, op in _operations(doc):
        for status, response in op["responses"].items():
            if not status.isdigit() or int(status) < 400 or path == "/readyz":
                continue
            content = response["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, status)
            example = content["example"]
            assert example["error"]["message"], (path, method, status)
            if path.startswith("/v1/"):
                assert "detail" not in example and example["error"]["type"]
                assert status != "422", f"{method} {path}: /v1 answers invalid input with 400"
            else:
                assert example["detail"] == example["error"]["message"], (path, status)
        if "{" in path:
            assert "404" in op["responses"], (path, method)


def test_request_bodies_have_examples_and_upload_is_multipart(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for path, method, op in _operations(doc):
        body = op.get("requestBody")
        if body is None:
            continue
        for media, content in body["content"].items():
            if media == "multipart/form-data":
                file_field = content["schema"]["properties"]["file"]
                assert file_field["format"] == "binary", path
                continue
            schema = content["schema"]
            ref = schema.get("$ref", "").rsplit("/", 1)[-1]
            examples = schemas[ref].get("examples") if ref else schema.get("examples")
            assert examples or content.get("example") or content.get("examples"), (path, method)
    assert "multipart/form-data" in doc["paths"]["/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]


def test_documented_bodies_match_real_answers(client: Any, doc: dict[str, Any]) -> None:
    unauthenticated = client.get("/jobs", headers={"Authorization": ""}).json()
    documented = doc["paths"]["/jobs"]["get"]["responses"]["401"]["content"]["application/json"]
    assert set(unauthenticated) == set(documented["example"])
    assert set(unauthenticated["error"]) == set(documented["example"]["error"])
    invalid = client.post("/jobs", json={"base_model": "tiny"}).json()
    example = doc["paths"]["/jobs"]["post"]["responses"]["422"]["content"]["application/json"]
    assert set(invalid) == set(example["example"]) | {"errors"}
    v1 = client.post("/v1/fine_tuning/jobs", json={}).json()
    v1_doc = doc["paths"]["/v1/fine_tuning/jobs"]["post"]["responses"]["400"]["content"]
    assert set(v1) == set(v1_doc["application/json"]["example"]) == {"error"}
