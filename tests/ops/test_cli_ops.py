"""``amgi`` options of operations, run as a user runs them: environment variables, JSON
logs, and bad operations options failing in one line before lifespan startup."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.sqlite import SqliteQueue
from tests.ops.helpers import amgi, one_line_error, take, until, write_app


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_app(tmp_path)


def count(db: Path, address: str) -> int:
    queue = SqliteQueue(str(db))
    try:
        return queue.count(address)
    finally:
        queue.close()


def test_environment_sets_options_and_the_command_line_wins(project: Path) -> None:
    from_env = amgi("send", "q", "x", cwd=project, env={"AMGI_DATABASE": "env.db"})
    assert from_env.returncode == 0, from_env.stderr
    assert count(project / "env.db", "q") == 1
    flag_wins = amgi(
        "send", "q", "y", "--database", "flag.db", cwd=project, env={"AMGI_DATABASE": "env.db"}
    )
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert count(project / "flag.db", "q") == 1
    assert count(project / "env.db", "q") == 1
    # --flag=value spelling also counts as given on the command line
    amgi("send", "q", "z", "--database=flag.db", cwd=project, env={"AMGI_DATABASE": "env.db"})
    assert count(project / "flag.db", "q") == 2


async def test_an_abbreviated_flag_on_the_command_line_wins_too(project: Path) -> None:
    """argparse takes ``--head`` for ``--header``, but the variable was added all the
    same: the message carried the environment's header as well as the command line's, and
    a bad value in the environment failed a command that gave the option."""
    from amgi.servers.sqlite import SqliteOptions, SqliteTransport

    sent = await asyncio.to_thread(
        amgi, "send", "q", "x", "--head", "cmd=2", cwd=project, env={"AMGI_HEADER": "env=1"}
    )
    assert sent.returncode == 0, sent.stderr
    options = SqliteOptions(database=str(project / "amgi.db"))
    (message,) = await take(SqliteTransport(["q"], options), 1)
    assert message.headers == [(b"cmd", b"2")]
    run = await asyncio.to_thread(
        amgi, "run", "opsapp:app", "q", "--concur", "0", cwd=project,
        env={"AMGI_CONCURRENCY": "many"},
    )  # fmt: skip
    assert "--concurrency must be at least 1" in one_line_error(run), "the flag's value"


def test_environment_reaches_runtime_and_server_options(project: Path) -> None:
    # A bad value from the environment is checked like the flag: AMGI_MAX_ATTEMPTS=0
    # fails the RuntimeConfig check, so the variable really reached `amgi run`.
    bad = amgi("run", "opsapp:app", "q", cwd=project, env={"AMGI_MAX_ATTEMPTS": "0"})
    assert "--max-attempts must be at least 1 (got max_attempts=0)" in one_line_error(bad)
    assert not (project / "started").exists()
    # The flag (3) wins over the environment (0): max_attempts passes its check, so the
    # next check (concurrency, from its flag) is the one that fails.
    wins = amgi(
        "run", "opsapp:app", "q", "--max-attempts", "3", "--concurrency", "0", cwd=project,
        env={"AMGI_MAX_ATTEMPTS": "0"},
    )  # fmt: skip
    assert "--concurrency must be at least 1" in one_line_error(wins)
    typo = amgi("run", "opsapp:app", "q", cwd=project, env={"AMGI_CONCURRENCY": "many"})
    assert "AMGI_CONCURRENCY='many': not a valid int" in one_line_error(typo)
    switch = amgi("run", "opsapp:app", "q", cwd=project, env={"AMGI_LOG_FORMAT": "xml"})
    assert "AMGI_LOG_FORMAT='xml': must be one of text, json" in one_line_error(switch)


@pytest.mark.parametrize(
    ("value", "why"), [("99999", "a port is 0 to 65535, not 99999"), ("x", "not a port number")]
)
def test_a_bad_value_of_an_option_with_its_own_check_is_one_line(
    project: Path, value: str, why: str
) -> None:
    """``amgi docs --port`` checks its value itself (argparse's ArgumentTypeError): from
    ``AMGI_PORT`` that was a bare traceback, exit 1."""
    bad = amgi("docs", "opsapp:app", cwd=project, env={"AMGI_PORT": value}, timeout=15)
    assert bad.returncode == 2
    assert f"environment variable AMGI_PORT={value!r}: {why}" in one_line_error(bad)


def test_server_from_environment_and_help_mentions_it(project: Path) -> None:
    shown = amgi("run", "--help", cwd=project, env={"AMGI_SERVER": "memory"}).stdout
    help_text = " ".join(shown.split())
    assert "options of the 'memory' server" in help_text
    assert "[env: AMGI_MAX_ATTEMPTS]" in help_text
    assert "[env: AMGI_METRICS_PORT]" in help_text
    assert "a flag on the command line wins" in help_text
    send_help = " ".join(amgi("send", "--help", cwd=project).stdout.split())
    assert "[env: AMGI_DATABASE]" in send_help


def test_json_logs_carry_message_failure_fields(project: Path) -> None:
    amgi("send", "q", "bad one", cwd=project)
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "opsapp:app", "q", "--max-attempts", "1",
         "--log-format", "json", "--lifespan", "off"],
        cwd=project, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    records = []
    deadline = time.monotonic() + 20
    for line in proc.stderr:
        records.append(json.loads(line))
        if records[-1]["level"] == "error" or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    records += [json.loads(line) for line in (rest or "").splitlines()]
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    failure = next(r for r in records if r["level"] == "error")
    assert failure["logger"] == "amgi.runtime"
    assert failure["address"] == "q"
    assert failure["id"] == "1"
    assert failure["attempt"] == 1
    assert failure["reason"] == "bad payload"
    assert "dead-lettered" in failure["message"]


def test_bad_operations_options_fail_before_lifespan_startup(project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = amgi(
            "run", "opsapp:app", "q", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
            cwd=project,
        )  # fmt: skip
        assert f"--metrics-port {port}: the port is already in use" in one_line_error(busy)
        busy_worker = amgi(
            "run", "opsapp:app", "q", "--workers", "2", "--metrics-port", str(port - 1),
            "--metrics-host", "127.0.0.1", cwd=project,
        )  # fmt: skip
        assert "already in use" in one_line_error(busy_worker)
    log_format = amgi("run", "opsapp:app", "q", "--log-format", "xml", cwd=project)
    assert "--log-format: invalid choice: 'xml'" in one_line_error(log_format)
    zero = amgi("run", "opsapp:app", "q", "--workers", "0", cwd=project)
    assert "--workers must be 1 to 1024 (got workers=0)" in one_line_error(zero)
    memory = amgi("run", "opsapp:app", "q", "--workers", "2", "--server", "memory", cwd=project)
    assert "--workers: the memory server runs in one process" in one_line_error(memory)
    for server in ("amp", "http", "mqtt"):
        refused = amgi("run", "opsapp:app", "q", "--workers", "2", "--server", server, cwd=project)
        assert f"--workers: the {server} server runs in one process" in one_line_error(refused)
    assert not (project / "started").exists()


def test_redis_options_that_cannot_share_work_refuse_workers(project: Path) -> None:
    """Pub/Sub mode (every process gets every message) and one fixed --consumer name
    (processes take back each other's entries): refused before lifespan startup."""
    from amgi.servers.redis import RedisOptions, RedisTransport

    redis = ["--server", "redis", "--url", "redis://127.0.0.1:1/0"]
    pubsub = amgi("run", "opsapp:app", "q", *redis, "--mode", "pubsub", "--workers", "2",
                  cwd=project)  # fmt: skip
    assert pubsub.returncode == 1
    assert (
        "--workers: the redis server runs in one process: --mode pubsub gives every process "
        "every message" in one_line_error(pubsub)
    )
    named = amgi("run", "opsapp:app", "q", *redis, "--consumer", "c1", "--workers", "3",
                 cwd=project)  # fmt: skip
    assert named.returncode == 1
    assert "one --consumer name ('c1') shared by processes" in one_line_error(named)
    assert not (project / "started").exists()
    # Streams with a consumer name of its own in each process share the work.
    assert RedisTransport(["q"], RedisOptions()).workers_refusal() is None
    assert RedisTransport(["q"], RedisOptions(mode="pubsub")).workers_refusal() is not None


def test_metrics_listener_binds_loopback_unless_told_otherwise() -> None:
    from amgi.ops.config import OpsConfig
    from amgi.ops.run import prepare

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    ops = prepare(OpsConfig(metrics_port=0), app, "memory")
    assert ops.sock is not None
    try:
        assert ops.sock.getsockname()[0] == "127.0.0.1"
    finally:
        ops.close()


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"metrics_port": 70000}, "--metrics-port must be 0 to 65535 (got metrics_port=70000)"),
        ({"metrics_port": -1}, "--metrics-port must be 0 to 65535"),
        ({"workers": 2000}, "--workers must be 1 to 1024 (got workers=2000)"),
        ({"tracing": "maybe"}, "--tracing must be one of auto, on, off"),
        (
            {"metrics_port": 65535, "workers": 2},
            "--metrics-port leaves no port for worker 1 (PORT+1 must be at most 65535)",
        ),
    ],
)
def test_operations_options_are_checked_in_one_line(values: dict[str, Any], error: str) -> None:
    from amgi.errors import ConfigurationError
    from amgi.ops.config import OpsConfig

    with pytest.raises(ConfigurationError) as caught:
        OpsConfig(**values)
    assert error in str(caught.value)
    assert "\n" not in str(caught.value)


def test_send_routes_and_their_options_come_from_the_environment(project: Path) -> None:
    (project / "router.py").write_text(ROUTER_APP)
    amgi("send", "in", "x", cwd=project)
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "router:app", "in", "--lifespan", "off"],
        cwd=project,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("AMGI_")},
            "AMGI_SEND_TO": "audit.*=sqlite, other.*=memory",
            "AMGI_SQLITE_DATABASE": str(project / "audit.db"),
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        until(lambda: count(project / "audit.db", "audit.in") == 1, 30, "the routed send")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert count(project / "amgi.db", "audit.in") == 0, "the route was not taken"
    assert count(project / "amgi.db", "in") == 0


ROUTER_APP = """
async def app(scope, receive, send):
    m = await receive()
    await send({"type": "message.send", "address": "audit." + scope["address"],
                "headers": [], "payload": m["payload"]})
    await send({"type": "message.ack", "id": m["id"]})
"""
