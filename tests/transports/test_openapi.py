"""The REST API against its own OpenAPI document (served at /api/openapi.yaml):
schemathesis generates requests, positive and negative; no answer may be a 5xx
and every answer must match the document."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.daemon import API_PASSWORD, API_USER, free_port, write_config

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Basic "
        + base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openapi")
    port = free_port()
    # An SMTP account makes the daemon ready (/readyz 200); nothing listens there.
    config = write_config(tmp, rest_port=port, wait=0, smtp_port=free_port())
    with (tmp / "otpd.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "otpd", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(url + "/healthz", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert "Traceback" not in (tmp / "otpd.log").read_text()


@pytest.fixture(scope="module")
def api_schema(daemon_url: str) -> schemathesis.schemas.BaseSchema:
    served = requests.get(daemon_url + "/api/openapi.yaml", timeout=5)
    assert served.status_code == 200
    assert served.text == (ROOT / "otpd" / "transports" / "openapi.yaml").read_text()
    return schemathesis.openapi.from_path(ROOT / "otpd" / "transports" / "openapi.yaml")


def test_api_conforms(api_schema: schemathesis.schemas.BaseSchema, daemon_url: str) -> None:
    results = api_schema.get_all_operations()
    operations = [result.ok() for result in results]  # type: ignore[union-attr]
    assert len(operations) == 15  # 6 paths x POST/PUT, healthz, readyz, the document
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def check(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            response = case.call(base_url=daemon_url, headers=AUTH, timeout=10)
            assert response.status_code < 500, (case.method, case.path, response.text)
            case.validate_response(response)

        check()
