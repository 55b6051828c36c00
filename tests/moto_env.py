"""moto's address, and the dummy AWS environment the tests that talk to it run in."""

from __future__ import annotations

import pytest

ENDPOINT = "http://127.0.0.1:5000"


def use_moto_credentials(monkeypatch: pytest.MonkeyPatch, *, sqs_endpoint: bool = False) -> None:
    """Dummy credentials for moto, inherited by server processes; nothing from the
    machine's own AWS setup. ``sqs_endpoint`` also points SQS clients that take no
    endpoint option (the Lambda adapter's default publisher) at moto."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    if sqs_endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", ENDPOINT)
