"""Every Lambda adapter test runs against moto's SQS: a record the adapter sends back to
its source queue (a failed startup, a deadline) must never reach AWS."""

from __future__ import annotations

import pytest

from tests.moto_env import use_moto_credentials


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_moto_credentials(monkeypatch, sqs_endpoint=True)
