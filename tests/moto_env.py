"""moto's address, the dummy AWS environment the tests that talk to it run in, and
private moto servers (one that checks credentials, one that enforces IAM policies, one a
test may stop)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port

ENDPOINT = "http://127.0.0.1:5000"
MOTO_SERVER = Path(__file__).parents[1] / "scripts" / "brokers" / "moto_server.py"
"""moto's server with its SQS backend made thread-safe (as scripts/brokers/moto.sh starts it)."""


def use_moto_credentials(
    monkeypatch: pytest.MonkeyPatch, *, sqs_endpoint: str | bool = False, secret: str = ""
) -> None:
    """Dummy credentials for moto, inherited by server processes; nothing from the
    machine's own AWS setup. ``sqs_endpoint`` also points SQS clients that take no
    endpoint option (the Lambda adapter's default publisher) at moto (True) or at the
    URL given. ``secret``: the secret key and a session token hold this text."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"sk-{secret}" if secret else "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    if secret:
        monkeypatch.setenv("AWS_SESSION_TOKEN", f"st-{secret}")
    if sqs_endpoint:
        url = ENDPOINT if sqs_endpoint is True else str(sqs_endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", url)


@contextlib.contextmanager
def private_moto(*, check_credentials: bool = False) -> Iterator[str]:
    """A moto server of the caller's own on a free port (its URL), stopped at the end.

    ``check_credentials``: every request's credentials are checked, so unknown keys are
    refused (InvalidClientTokenId) as AWS refuses them.
    """
    port = free_port()
    env = dict(os.environ)
    if check_credentials:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    server = subprocess.Popen(
        [sys.executable, str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the private moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def iam_user(url: str, name: str, deny: list[str]) -> tuple[str, str]:
    """Make IAM user ``name`` of the moto at ``url``, allowed every SQS action but those
    in ``deny``; its access key id and secret (for a moto that enforces IAM:
    :func:`enforce_iam`). Made with the dummy credentials, before enforcing."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    statements = [{"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}]
    if deny:
        statements.append({"Effect": "Deny", "Action": deny, "Resource": "*"})
    policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="sqs", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def enforce_iam(url: str) -> None:
    """From now on the moto at ``url`` (a private one) checks every request against IAM:
    only the keys of its IAM users pass, and only for what their policies allow."""
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=b"0",  # requests let through unchecked from now on
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form body would be parsed away
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
