"""The NATS server over TLS (with and without client certificates) and with an nkey user,
each against a private nats-server (JetStream on) configured for it."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.nats import NatsOptions, NatsTransport
from tests.net import self_signed
from tests.servers.amgi_process import AmgiProcess, processes, until
from tests.servers.nats_helpers import consumer_state, ensure_stream, fresh
from tests.servers.nats_jwt import operator_setup
from tests.servers.private_brokers import private_nats
from tests.servers.test_nats import flags, run_startup_app

__all__ = ["processes"]

pytestmark = pytest.mark.timeout(90)


@dataclass
class Certs:
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    stranger: Path
    stranger_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("nats-certs")
    return Certs(
        *self_signed(folder, "server"),
        *self_signed(folder, "client"),
        *self_signed(folder, "stranger"),
    )


def tls_block(certs: Certs, *, verify: bool) -> str:
    lines = [f'cert_file: "{certs.server}"', f'key_file: "{certs.server_key}"']
    if verify:  # clients must show a certificate the client CA signed
        lines += [f'ca_file: "{certs.client}"', "verify: true"]
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"


def context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def send_and_consume(
    tmp_path: Path,
    processes: list[AmgiProcess],
    url: str,
    connect: dict[str, Any],
    options: NatsOptions,
    auth_flags: list[str],
) -> None:
    """One message published by the transport and consumed by ``amgi run``, both with
    ``auth_flags``/``options``; the broker shows it acked."""
    stream, subject, durable = fresh("S"), f"auth.{fresh('s')}", fresh("d")
    await ensure_stream(url, stream, [subject], **connect)
    sender = NatsTransport([], options)
    await sender.connect()
    try:
        await sender.publish(subject, [(b"h", b"1")], b"over-auth", {})
    finally:
        await sender.close()
    server = AmgiProcess(subject, flags(url, durable, *auth_flags), tmp_path)
    processes.append(server)
    await asyncio.to_thread(until, lambda: server.acked() == ["over-auth"], 30, "the ack", server)
    assert server.stop() == 0, server.output()
    state = await consumer_state(stream, durable, url, **connect)
    assert state.num_ack_pending == 0
    assert state.delivered.stream_seq == 1


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("nats-tls")
    with private_nats(folder, config=tls_block(certs, verify=False)) as broker:
        yield f"nats://127.0.0.1:{broker.port}"


@pytest.fixture(scope="module")
def verifying_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("nats-mtls")
    with private_nats(folder, config=tls_block(certs, verify=True)) as broker:
        yield f"nats://127.0.0.1:{broker.port}"


async def test_tls_with_the_servers_ca_end_to_end(
    tmp_path: Path, processes: list[AmgiProcess], tls_server: str, certs: Certs
) -> None:
    await send_and_consume(
        tmp_path,
        processes,
        tls_server,
        {"tls": context(certs.server)},
        NatsOptions(servers=tls_server, tls_ca=str(certs.server)),
        ["--tls-ca", str(certs.server)],
    )


async def test_tls_files_that_do_not_load_name_the_option_and_the_file(tmp_path: Path) -> None:
    """ssl's own words reached the user (``nats: cannot load the TLS files: [Errno 2] No
    such file or directory``, ``[SSL] PEM lib``), naming no option and no file."""
    from amgi.errors import ConfigurationError

    _, key = self_signed(tmp_path)
    missing = str(tmp_path / "missing.pem")
    for options, error in [
        ({"tls_ca": missing}, f"nats: cannot load --tls-ca {missing!r}: No such file"),
        ({"tls_cert": str(key), "tls_key": str(key)}, f"nats: cannot load --tls-cert {str(key)!r}"),
    ]:
        transport = NatsTransport(["a"], NatsOptions(servers="nats://127.0.0.1:1", **options))
        with pytest.raises(ConfigurationError) as info:
            await transport.connect()
        assert str(info.value).startswith(error), info.value


async def test_mutual_tls_with_a_client_certificate_end_to_end(
    tmp_path: Path, processes: list[AmgiProcess], verifying_server: str, certs: Certs
) -> None:
    client = [str(certs.server), str(certs.client), str(certs.client_key)]
    await send_and_consume(
        tmp_path,
        processes,
        verifying_server,
        {"tls": context(certs.server, certs.client, certs.client_key)},
        NatsOptions(
            servers=verifying_server, tls_ca=client[0], tls_cert=client[1], tls_key=client[2]
        ),
        ["--tls-ca", client[0], "--tls-cert", client[1], "--tls-key", client[2]],
    )


def test_an_untrusted_server_certificate_is_one_line_before_startup(
    tmp_path: Path, tls_server: str, certs: Certs
) -> None:
    line, started = run_startup_app(
        tmp_path, "auth.x", "--servers", tls_server, "--tls-ca", str(certs.stranger)
    )
    assert "the server's certificate is not trusted (self-signed certificate)" in line
    assert "give its CA with --tls-ca" in line
    assert not started
    line, started = run_startup_app(tmp_path, "auth.x", "--servers", tls_server)  # system CAs
    assert "the server's certificate is not trusted" in line
    assert not started


def test_a_missing_or_untrusted_client_certificate_is_one_line_before_startup(
    tmp_path: Path, verifying_server: str, certs: Certs
) -> None:
    ca = ["--servers", verifying_server, "--tls-ca", str(certs.server)]
    line, started = run_startup_app(tmp_path, "auth.x", *ca)
    assert "nats: cannot connect to" in line
    assert not started
    stranger = ["--tls-cert", str(certs.stranger), "--tls-key", str(certs.stranger_key)]
    line, started = run_startup_app(tmp_path, "auth.x", *ca, *stranger)
    assert "nats: cannot connect to" in line
    assert not started


# -- nkey ---------------------------------------------------------------------------------


def nkey_seed(folder: Path, name: str) -> tuple[Path, str]:
    """A new user nkey: its seed file (as ``nsc`` writes it) and its public key."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = folder / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


async def accepted_and_refused(
    tmp_path: Path,
    processes: list[AmgiProcess],
    config: str,
    option: str,
    connect: str,
    good: Path,
    bad: Path,
) -> None:
    """With ``--{option} good`` a message goes end to end (the admin client connects with
    ``nats.connect({connect}=good)``); with ``--{option} bad`` one line, before startup."""
    flag = "--" + option.replace("_", "-")
    with private_nats(tmp_path / "nats", config=config) as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        await send_and_consume(
            tmp_path,
            processes,
            url,
            {connect: str(good)},
            NatsOptions(servers=url, **{option: str(good)}),
            [flag, str(good)],
        )
        line, started = await asyncio.to_thread(
            run_startup_app, tmp_path, "auth.x", "--servers", url, flag, str(bad)
        )
        assert f"nats: nats://127.0.0.1:{broker.port} refused the credentials" in line
        assert not started


async def test_an_nkey_user_end_to_end_and_a_wrong_seed_refused(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    seed, public = nkey_seed(tmp_path, "user")
    wrong, _ = nkey_seed(tmp_path, "wrong")
    config = f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
    await accepted_and_refused(tmp_path, processes, config, "nkey_seed", "nkeys_seed", seed, wrong)


def test_unreadable_or_malformed_seed_and_creds_files_are_one_line(tmp_path: Path) -> None:
    """Refused before connecting, even by a server that asks for no credentials."""
    bad = tmp_path / "bad.nk"
    bad.write_text("not a seed\n")
    missing = tmp_path / "missing.nk"
    cases = [
        (["--nkey-seed", str(bad)], f"nats: --nkey-seed {bad} is not an nkey seed"),
        (["--nkey-seed", str(missing)], f"nats: cannot read --nkey-seed {missing}: No such file"),
        (["--creds", str(bad)], f"nats: --creds {bad} is not a .creds file"),
        (["--creds", str(missing)], f"nats: cannot read --creds {missing}: No such file"),
    ]
    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        for flags, expected in cases:
            line, started = run_startup_app(tmp_path, "auth.x", "--servers", url, *flags)
            assert expected in line
            assert not started


# -- creds --------------------------------------------------------------------------------


async def test_a_creds_user_end_to_end_and_an_unknown_account_refused(
    tmp_path: Path, processes: list[AmgiProcess]
) -> None:
    config, creds, stranger = operator_setup(tmp_path)
    await accepted_and_refused(
        tmp_path, processes, config, "creds", "user_credentials", creds, stranger
    )
