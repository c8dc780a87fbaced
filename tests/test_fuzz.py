"""The OpenAPI schema fuzzed with schemathesis against the in-process app on the tiny random Llama: whatever
hypothesis makes of every operation (valid and invalid bodies, odd unicode, huge numbers, wrong types), the
answer is never a 5xx and always matches what the schema documents (status code, content type, body).

Bounded and reproducible: 30 derandomized examples per operation, no deadline; the file takes about 20 s."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.gateway import Gateway
from experts.backbone import load_backbone
from tests.conftest import tiny_settings
from tests.test_api import running_service

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ADMIN = {"Authorization": "Bearer admin-secret"}
# These start background jobs (training a LoRA, training a router): fuzzed without the token only.
JOB_OPERATIONS = {("POST", "/admin/experts"), ("POST", "/admin/routers/train")}
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


# The app is built at import (its routes and OpenAPI document need no gateway); the module fixture plugs in
# the in-process service it answers with. (schemathesis' lazy `from_fixture` breaks on pytest 9.)
_gateway: list[Gateway] = []
app = create_app(lambda: _gateway[-1])
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app  # what from_asgi sets: cases are sent to the app in-process


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory, tiny_backbone_dir):
    config = tiny_settings(tmp_path_factory.mktemp("fuzz") / "home", tiny_backbone_dir)
    with running_service(config, load_backbone(config)) as (client, gateway, sessions):
        _gateway.append(gateway)
        yield client, gateway, sessions
        _gateway.remove(gateway)


@schema.parametrize()
@FUZZ
def test_operations_never_5xx_and_match_the_schema(case, fuzz_service):
    authorised = (case.method.upper(), case.path) not in JOB_OPERATIONS
    case.call_and_validate(headers=ADMIN if authorised else None, checks=CHECKS)


@schema.include(path_regex="^/admin/").parametrize()
@FUZZ
def test_admin_operations_refuse_without_the_token(case, fuzz_service):
    response = case.call_and_validate(checks=CHECKS)
    # 401 (no token), or a refusal before auth is even looked at: unparsable body, wrong method, too big.
    assert response.status_code in (400, 401, 405, 413, 422), (case.method, case.path, response.status_code)
