"""The amgi command, run as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amgi.servers import installed
from amgi.servers.sqlite import SqliteQueue
from tests.cli import ROOT, amgi

APP = """
import os
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                if os.environ.get("FAIL_STARTUP"):
                    await send({"type": "lifespan.startup.failed", "message": "no db"})
                    return
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        m = await receive()
        with open(os.environ["OUT"], "a") as f:
            f.write(repr((scope["address"], m["payload"], m["headers"])) + "\\n")
        await send({"type": "message.ack", "id": m["id"]})
        more = m.get("more_messages")
not_callable = 3
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "myapp.py").write_text(APP)
    return tmp_path


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("amgi: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_version_and_help_list_servers_and_options(project: Path) -> None:
    version = amgi("--version", cwd=project)
    assert version.returncode == 0
    assert version.stdout.startswith("amgi ")
    help_text = amgi("run", "--help", cwd=project).stdout
    present = installed()
    assert {"sqlite", "memory"} <= set(present)
    for name, transport in present.items():
        assert f"\n  {name}" in help_text
        for f in dataclasses.fields(transport.options):
            assert "--" + f.name.replace("_", "-") in help_text
    assert "--database" in help_text
    assert "--max-attempts" in help_text
    assert "--concurrency" in help_text
    assert "--shutdown-timeout" in help_text


def test_send_then_run_on_the_default_sqlite_server(project: Path) -> None:
    out = project / "out.txt"
    sent = amgi("send", "orders", '{"id": 1}', "--header", "h=v", cwd=project)
    assert sent.returncode == 0, sent.stderr
    assert (project / "amgi.db").exists(), "the default database is ./amgi.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "myapp:app", "orders"],
        cwd=project,
        env={**os.environ, "OUT": str(out)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline, "message not consumed"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    assert out.read_text() == "('orders', b'{\"id\": 1}', [(b'h', b'v')])\n"
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("orders") == 0
    queue.close()


def test_send_from_file_and_stdin(project: Path) -> None:
    (project / "body.bin").write_bytes(b"\x00\xffraw")
    assert amgi("send", "q", "--file", "body.bin", cwd=project).returncode == 0
    piped = subprocess.run(
        [sys.executable, "-m", "amgi", "send", "q", "--file", "-"],
        cwd=project,
        input=b"from stdin",
        capture_output=True,
        timeout=30,
    )
    assert piped.returncode == 0
    queue = SqliteQueue(str(project / "amgi.db"))
    _, messages = queue.lease("q", 10, 30)
    queue.close()
    assert [m.payload for m in messages] == [b"\x00\xffraw", b"from stdin"]


@pytest.mark.parametrize("by_env", [False, True])
def test_a_bad_send_target_option_names_its_own_flag(project: Path, by_env: bool) -> None:
    """It named --connect-timeout, a flag that does not exist, and exited 1 (a usage
    error of the consuming server's own options exits 2)."""
    route = ["run", "myapp:app", "q", "--send-to", "out.*=redis"]
    if by_env:
        result = amgi(*route, cwd=project, env={"AMGI_REDIS_CONNECT_TIMEOUT": "0"})
    else:
        result = amgi(*route, "--redis-connect-timeout", "0", cwd=project)
    line = one_line_error(result)
    assert result.returncode == 2
    assert "--redis-connect-timeout must be above 0" in line
    assert ("(set by AMGI_REDIS_CONNECT_TIMEOUT)" in line) is by_env


def test_send_without_a_payload_says_so(project: Path) -> None:
    """A message without payload (a tombstone on Kafka) is sent when PAYLOAD and --file
    are left out: the line printed says so, an empty payload given does not."""
    bare = amgi("send", "q", cwd=project)
    given = amgi("send", "q", "", cwd=project)
    assert bare.stdout == "sent 1 message without payload to 'q' (sqlite)\n"
    assert given.stdout == "sent 1 message to 'q' (sqlite)\n"
    queue = SqliteQueue(str(project / "amgi.db"))
    _, messages = queue.lease("q", 10, 30)
    queue.close()
    assert [m.payload for m in messages] == [None, b""]


def test_send_takes_argument_bytes_as_given(project: Path) -> None:
    """Bytes that are not UTF-8 (the shell passes them so) were an 'unexpected
    UnicodeEncodeError'; a payload or header value is sent as given, and an address,
    which is text, is one clear error."""

    def send(*words: bytes) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable.encode(), b"-m", b"amgi", b"send", *words]
        return subprocess.run(command, cwd=project, capture_output=True, timeout=30)

    assert send(b"q", b"\xff\xfe raw", b"--header", b"h=\xfe").returncode == 0
    refused = send(b"q\xff", b"x")
    assert refused.returncode == 2
    assert b"ADDRESS must be UTF-8 text" in refused.stderr
    assert b"Traceback" not in refused.stderr
    queue = SqliteQueue(str(project / "amgi.db"))
    _, messages = queue.lease("q", 10, 30)
    queue.close()
    assert [(m.payload, m.headers) for m in messages] == [(b"\xff\xfe raw", [(b"h", b"\xfe")])]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "nosuchmodule:app", "q"], "cannot import module 'nosuchmodule'"),
        (["run", "myapp:missing", "q"], "has no attribute 'missing'"),
        (["run", "myapp:not_callable", "q"], "is not callable"),
        (["run", "myapp", "q"], "MODULE:APP"),
        (["run", "myapp:app", "q", "--server", "nosuch"], "unknown server 'nosuch'"),
        (["run", "myapp:app", "q", "--group-id", "g"], "--group-id"),
        (["run", "myapp:app", "q", "--concurrency", "0"], "concurrency must be at least 1"),
        (["run", "myapp:app", "q", "--batch-size", "many"], "invalid int value"),
        (["run", "myapp:app"], "at least one ADDRESS"),
        (["run", "myapp:app", "q", "--database", "/nonexistent/dir/x.db"], "does not exist"),
        (["send", "q", "--file", "nothere"], "cannot read --file"),
        (["send", "q", "p", "--file", "x"], "not both"),
        (["send", "q", "--header", "novalue"], "NAME=VALUE"),
        (["run", "myapp:app", "q", "--max-attemps", "3"], "; did you mean --max-attempts?"),
        # The rules of an app's message.send: a message sent with an attempt header was
        # dead-lettered unseen by a server that read it; an empty address was sent to.
        (["send", "q", "x", "--header", "amgi-attempt=9"], "'amgi-attempt' is the server's"),
        (["send", "", "x"], "needs 'address': a non-empty str"),
    ],
)
def test_bad_input_gives_one_clear_line(project: Path, args: list[str], expected: str) -> None:
    line = one_line_error(amgi(*args, cwd=project, env={"OUT": str(project / "o")}))
    assert expected in line


def test_startup_failure_exits_non_zero_and_consumes_nothing(project: Path) -> None:
    assert amgi("send", "q", "keep me", cwd=project).returncode == 0
    result = amgi("run", "myapp:app", "q", cwd=project, env={"FAIL_STARTUP": "1", "OUT": "o"})
    assert "application startup failed: no db" in one_line_error(result)
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1
    queue.close()


def test_unreachable_broker_is_one_line(project: Path) -> None:
    result = amgi(
        "send",
        "q",
        "x",
        "--server",
        "amqp",
        "--url",
        "amqp://guest:guest@127.0.0.1:1/",
        cwd=project,
        timeout=60,
    )
    assert "127.0.0.1" in one_line_error(result) or "refused" in result.stderr


SLOW_APP = """
import asyncio, os
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    m = await receive()
    open(os.environ["OUT"], "w").write("started")
    await asyncio.sleep(60)
    await send({"type": "message.ack", "id": m["id"]})
"""


def test_second_signal_exits_at_once_acking_nothing(project: Path) -> None:
    (project / "slowapp.py").write_text(SLOW_APP)
    out = project / "started"
    assert amgi("send", "q", "work", cwd=project).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "slowapp:app", "q", "--shutdown-timeout", "30"],
        cwd=project,
        env={**os.environ, "OUT": str(out)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not out.exists():
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal must wait for the batch in flight"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert time.monotonic() - started < 5
        assert code != 0
        assert "exiting now" in (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.kill()
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1, "nothing may be acked after the second signal"
    queue.close()


def test_a_server_whose_client_is_missing_is_listed_and_refused_clearly(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from amgi.cli import main
    from amgi.servers import load, missing_requirements

    memory = load("memory")
    monkeypatch.setattr(memory, "requires", ("no_such_client.sub.module", "no_such_other"))
    monkeypatch.setattr(memory, "extra", "memoryx")
    monkeypatch.chdir(project)
    assert missing_requirements(memory) == ["no_such_client.sub.module", "no_such_other"]
    with pytest.raises(SystemExit) as shown:
        main(["run", "--help"])
    assert shown.value.code == 0
    assert "memory  [not installed: pip install 'amgi[memoryx]']" in capsys.readouterr().out
    assert main(["send", "q", "x", "--server", "memory"]) == 1
    err = capsys.readouterr().err
    assert "server 'memory' needs no_such_client.sub.module, no_such_other" in err
    assert "pip install 'amgi[memoryx]'" in err


_BLOCKING = """
import importlib.abc, sys

BLOCKED = set(sys.argv[1:])

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from amgi.cli import main
main(["send", "q", "x", "--server", "http"])
main(["run", "--help"])
"""


def test_every_server_loads_without_its_client_library(project: Path) -> None:
    """The http server imported httptools at module level: without the [http] extra,
    any run or send with it was a traceback, and --help printed load errors."""
    from amgi.servers import SERVERS, load

    clients = sorted({m.split(".")[0] for name in SERVERS for m in load(name).requires})
    assert "httptools" in clients
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKING, *clients],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "cannot be loaded" not in result.stderr, result.stderr
    assert "server 'http' needs httptools: pip install 'amgi[http]'" in result.stderr
    for name in SERVERS:
        if load(name).requires:
            assert f"{name}  [not installed: pip install" in result.stdout, name


SYNC_APP = """
def app(scope, receive, send):
    open("called", "w").write("called")
"""


@pytest.mark.parametrize("tracing", ["off", "on"])  # on: the check saw the tracing wrapper
def test_a_sync_app_is_refused_before_lifespan_with_one_line(project: Path, tracing: str) -> None:
    (project / "syncapp.py").write_text(SYNC_APP)
    assert amgi("send", "q", "work", cwd=project).returncode == 0
    result = amgi("run", "syncapp:app", "q", "--tracing", tracing, cwd=project)
    assert result.returncode == 1
    line = one_line_error(result)
    assert "syncapp:app is a plain function ('def'), not an async callable" in line
    assert not (project / "called").exists(), "the app was called"
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1
    queue.close()


def test_asyncapi_into_a_pipe_closed_early_is_quiet() -> None:
    """`amgi asyncapi app | head`: '[Errno 32] Broken pipe' as an error, exit 1."""
    command = f"{sys.executable} -m amgi asyncapi examples.orders:app | true"
    command += '; echo "status=${PIPESTATUS[0]}"'
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    assert result.stdout == "status=0\n"


def test_docs_port_errors_are_one_line() -> None:
    """``--port 99999`` was 'unexpected OverflowError'; a port in use did not say which."""
    import socket

    bad = amgi("docs", "examples.orders:app", "--port", "99999")
    assert result_code_and_line(bad) == (
        2,
        "amgi: error: argument --port: a port is 0 to 65535, not 99999 (see 'amgi docs --help')",
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = amgi("docs", "examples.orders:app", "--port", str(port), "--log-level", "debug")
    code, line = result_code_and_line(busy)
    assert code == 1
    assert f"amgi docs cannot listen on 127.0.0.1:{port}: Address already in use" in line


def test_log_options_are_taken_after_every_command() -> None:
    """'run with --log-level debug' is what an unexpected error suggests: asyncapi and
    docs refused it after the command."""
    for command in ("asyncapi", "docs"):
        result = amgi(command, "nosuch:app", "--log-level", "debug", "--log-format", "text")
        assert "cannot import module 'nosuch'" in one_line_error(result)


def result_code_and_line(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    return result.returncode, one_line_error(result)
