"""The OpenAPI document served at /openapi.json is a valid OpenAPI 3.1 document.

An independent validator (openapi-spec-validator) checks the file the services embed
(contract/openapi/openapi.json); the Rust test query/tests/it/openapi.rs checks that
it matches the routes.
"""

import json
import pathlib

from openapi_spec_validator import validate

DOCUMENT = pathlib.Path(__file__).resolve().parents[2] / "contract" / "openapi" / "openapi.json"


def test_openapi_document_is_valid_openapi_3_1():
    document = json.loads(DOCUMENT.read_text())
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_error_response_is_a_problem_document():
    document = json.loads(DOCUMENT.read_text())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response == {"$ref": "#/components/responses/Problem"}, (method, path, status)
