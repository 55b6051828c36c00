"""Private Redis, NATS and RabbitMQ brokers on spare ports, for tests that restart or
configure them.

The shared brokers (scripts/brokers/) are never restarted; these are started by the test
that needs them, from the binaries the broker scripts installed, and stopped at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.net import free_port, port_open


class PrivateBroker:
    """One broker process on 127.0.0.1:``port``; :meth:`restart` keeps its data folder."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        folder: Path,
        *,
        env: Mapping[str, str] | None = None,
        boot_timeout: float = 20.0,
    ) -> None:
        self.argv = argv
        self.port = port
        self.folder = folder
        self.env = dict(env) if env is not None else None
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.folder / "broker.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.folder,
            stdout=log,
            stderr=log,
            env=self.env,
            start_new_session=True,  # a broker started by a script dies with its group
        )
        log.close()
        deadline = time.monotonic() + self.boot_timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.folder / "broker.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"private broker did not start on {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: Redis and NATS write their data out first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_redis(
    folder: Path,
    *,
    password: str = "",
    tls: tuple[Path, Path] | None = None,
    users: Sequence[str] = (),
) -> Iterator[PrivateBroker]:
    """A redis-server with an append-only file (nothing lost over a restart).

    With ``tls`` (certificate, key) it speaks TLS only, on :attr:`PrivateBroker.port`, and
    asks clients for no certificate; ``users`` are ACL rules, ``"alice on >pw ~* +@all"``.
    """
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
    ]  # fmt: skip
    if password:
        argv += ["--requirepass", password]
    if tls is not None:
        cert, key = tls
        argv[4] = "0"  # no plaintext port
        argv += [
            "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        ]  # fmt: skip
    for rule in users:
        argv += ["--user", *rule.split()]
    broker = PrivateBroker(argv, port, folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def private_nats(
    folder: Path, *, user: str = "", password: str = "", config: str = ""
) -> Iterator[PrivateBroker]:
    """A nats-server with JetStream, its store in ``folder``; ``config`` (the text of a
    configuration file, e.g. ``tls {...}`` or ``authorization {...}``) on top."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        "nats-server", "--addr", "127.0.0.1", "--port", str(port),
        "--jetstream", "--store_dir", str(folder / "store"),
    ]  # fmt: skip
    if user:
        argv += ["--user", user, "--pass", password]
    if config:
        (folder / "nats.conf").write_text(config)
        argv += ["--config", str(folder / "nats.conf")]
    broker = PrivateBroker(argv, port, folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


_RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
"""The broker's own scripts (the ones on PATH switch to the system node's user and cookie)."""


class PrivateRabbitMQ(PrivateBroker):
    """A RabbitMQ node of its own (name, ports, data, cookie), controlled by :meth:`ctl`."""

    def __init__(self, folder: Path) -> None:
        port = free_port()
        self.node = f"amgi-test-{uuid.uuid4().hex[:8]}@localhost"
        (folder / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(folder),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),  # none: the defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        super().__init__(
            [str(_RABBITMQ_BIN / "rabbitmq-server")], port, folder, env=env, boot_timeout=120
        )
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"

    async def consumer_timeout_of_a_second(self) -> None:
        """Make the node close a channel whose delivery stays unacked for a second
        (``consumer_timeout``), looked at every half second. Channels take the timeout
        as they open."""
        for key, value in (("consumer_timeout", 1000), ("channel_tick_interval", 500)):
            await asyncio.to_thread(
                self.ctl, "eval", f"application:set_env(rabbit, {key}, {value})."
            )

    def ctl(self, *args: str, timeout: float = 60) -> None:
        """``rabbitmqctl -n NODE ARGS`` against this node only."""
        done = subprocess.run(
            [str(_RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")


@contextlib.contextmanager
def private_rabbitmq(folder: Path) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node on spare ports, its data in ``folder``; stopped at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    broker = PrivateRabbitMQ(folder)
    broker.start()
    try:
        broker.ctl("await_startup", "--timeout", "120", timeout=150)
        yield broker
    finally:
        broker.stop()
