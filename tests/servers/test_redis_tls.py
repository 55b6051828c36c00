"""The Redis server over TLS (``rediss://``) against a private redis-server that speaks
TLS only: the CA given in the URL, an untrusted certificate, ACL credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import amgi
from tests.core.test_cli import one_line_error
from tests.net import self_signed
from tests.servers.amgi_process import STARTUP_APP, AmgiProcess, processes, until
from tests.servers.private_brokers import PrivateBroker, private_redis
from tests.servers.redis_helpers import fresh, pending

__all__ = ["processes"]

PASSWORD = "tls-pw-5d1e9a"
"""Alice's ACL password: it must never be shown."""


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateBroker, Path]]:
    """A TLS-only redis-server with user ``alice``, and the CA file that trusts it."""
    folder = tmp_path_factory.mktemp("redis-tls")
    cert, key = self_signed(folder, "server")
    self_signed(folder, "stranger")
    users = [f"alice on >{PASSWORD} ~* &* +@all"]
    with private_redis(folder / "data", tls=(cert, key), users=users) as broker:
        yield broker, cert


def _url(broker: PrivateBroker, ca: Path, password: str = PASSWORD) -> str:
    return f"rediss://alice:{password}@127.0.0.1:{broker.port}/0?ssl_ca_certs={ca}"


def _run_refused(tmp_path: Path, broker: PrivateBroker, ca: Path, password: str = PASSWORD) -> str:
    """``amgi run`` of a lifespan app as ``alice`` trusting ``ca``: its one error line,
    checked to come before the lifespan startup and to show no password."""
    (tmp_path / "startup.py").write_text(STARTUP_APP)
    started = tmp_path / "started"
    result = amgi(
        "run", "startup:app", fresh("tls"), "--server", "redis",
        "--url", _url(broker, ca, password), "--connect-timeout", "5",
        cwd=tmp_path, env={"STARTED": str(started)},
    )  # fmt: skip
    line = one_line_error(result)
    assert password not in result.stdout + result.stderr, "the password was shown"
    assert not started.exists()  # before the application's lifespan startup
    return line


async def test_a_message_goes_end_to_end_over_tls_with_the_ca_in_the_url(
    tls_redis: tuple[PrivateBroker, Path], tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    broker, ca = tls_redis
    stream, url = fresh("tls"), _url(broker, ca)
    sent = await asyncio.to_thread(
        amgi, "send", stream, "over-tls", "--server", "redis", "--url", url
    )
    assert sent.returncode == 0, sent.stderr
    p = AmgiProcess(stream, ["--server", "redis", "--url", url, "--group", "g"], tmp_path)
    processes.append(p)
    await asyncio.to_thread(until, lambda: p.acked() == ["over-tls"], 30, "the message", p)
    # the app acked; the server's XACK follows with its batch's settlement
    async with asyncio.timeout(10):
        while await pending(stream, "g", url):
            await asyncio.sleep(0.05)
    assert p.stop() == 0
    assert PASSWORD not in p.output() + sent.stdout + sent.stderr


def test_an_untrusted_server_certificate_is_one_line_before_startup(
    tls_redis: tuple[PrivateBroker, Path], tmp_path: Path
) -> None:
    broker, _ = tls_redis
    line = _run_refused(tmp_path, broker, broker.folder.parent / "stranger.pem")
    assert "the server's TLS certificate is not trusted" in line
    assert "ssl_ca_certs" in line


def test_a_missing_ca_file_is_a_configuration_error(
    tls_redis: tuple[PrivateBroker, Path], tmp_path: Path
) -> None:
    broker, _ = tls_redis
    missing = tmp_path / "no-such-ca.pem"
    result = amgi("send", "s", "x", "--server", "redis", "--url", _url(broker, missing))
    line = one_line_error(result)
    assert f"ssl_ca_certs '{missing}'" in line
    assert "is not a file" in line
    assert PASSWORD not in result.stdout + result.stderr


def test_refused_credentials_over_tls_are_one_line_without_the_password(
    tls_redis: tuple[PrivateBroker, Path], tmp_path: Path
) -> None:
    broker, ca = tls_redis
    line = _run_refused(tmp_path, broker, ca, password="wrong-pw-7c4b2f")
    assert "refused the credentials" in line
