"""Bad option values fail before lifespan startup, with one line naming the flag.

nan and inf used to get through: a nacked message sat in the memory server's delay heap
forever with ``--retry-delay nan``, sqlite's settle failed with "NOT NULL constraint
failed", and ``--visibility-timeout inf`` hid leased rows for good.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.memory import MemoryOptions, MemoryTransport
from amgi.servers.sqlite import SqliteOptions, SqliteQueue, SqliteTransport
from amgi.types import AMGIReceiveCallable, AMGISendCallable, Scope
from tests.cli import amgi
from tests.core.test_cli import one_line_error

APP = """
import os
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        event = await receive()
        open(os.environ["STARTED"], "w").close()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    m = await receive()
    await send({"type": "message.ack", "id": m["id"]})
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "startup.py").write_text(APP)
    return tmp_path


@pytest.mark.parametrize(
    ("server", "flags", "expected"),
    [
        ("memory", ["--batch-size", "0"], "--batch-size must be at least 1 (got batch_size=0)"),
        ("memory", ["--retry-delay", "nan"], "--retry-delay must be a finite number"),
        ("memory", ["--retry-delay-max", "inf"], "--retry-delay-max must be a finite number"),
        ("memory", ["--shutdown-timeout", "-1"], "--shutdown-timeout must be at least 0"),
        ("sqlite", ["--retry-delay", "nan"], "--retry-delay must be a finite number"),
        ("sqlite", ["--visibility-timeout", "inf"], "--visibility-timeout must be a finite"),
        ("sqlite", ["--visibility-timeout", "nan"], "--visibility-timeout must be a finite"),
        ("sqlite", ["--visibility-timeout", "0"], "--visibility-timeout must be above 0"),
        ("sqlite", ["--poll-interval=-inf"], "--poll-interval must be a finite number"),
        ("sqlite", ["--busy-timeout", "nan"], "--busy-timeout must be a finite number"),
        ("sqlite", ["--batch-size", "0"], "--batch-size must be at least 1"),
        # 0 s failed every app, even one whose startup completes at once
        ("memory", ["--startup-timeout", "0"], "--startup-timeout must be above 0"),
        ("memory", ["--lifespan-shutdown-timeout", "0"], "--lifespan-shutdown-timeout must be"),
    ],
)
def test_amgi_run_refuses_bad_values_before_the_apps_startup(
    project: Path, server: str, flags: list[str], expected: str
) -> None:
    sent = amgi("send", "q", "keep me", cwd=project)
    assert sent.returncode == 0, sent.stderr
    started = project / "started"
    result = amgi(
        "run", "startup:app", "q", "--server", server, *flags,
        cwd=project, env={"STARTED": str(started)},
    )  # fmt: skip
    assert expected in one_line_error(result)
    assert result.returncode == 2  # a usage error, like a value of the wrong type
    assert not started.exists(), "the app's lifespan startup ran before the options were checked"
    queue = SqliteQueue(str(project / "amgi.db"))
    assert queue.count("q") == 1  # nothing consumed, nothing leased away
    _, leased = queue.lease("q", 10, 30)
    queue.close()
    assert [m.payload for m in leased] == [b"keep me"]


class Startup:
    """A lifespan-aware app that records whether its startup ran."""

    def __init__(self) -> None:
        self.started = False

    async def __call__(
        self, scope: Scope, receive: AMGIReceiveCallable, send: AMGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await receive()
            self.started = True
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})


@pytest.mark.parametrize(
    "transport",
    [
        lambda tmp: MemoryTransport(["q"], MemoryOptions(batch_size=0)),
        lambda tmp: SqliteTransport(
            ["q"], SqliteOptions(database=str(tmp / "x.db"), visibility_timeout=math.inf)
        ),
        lambda tmp: SqliteTransport(
            ["q"], SqliteOptions(database=str(tmp / "x.db"), poll_interval=math.nan)
        ),
    ],
)
async def test_the_python_api_refuses_bad_options_before_startup(
    tmp_path: Path, transport: Any
) -> None:
    app = Startup()
    runtime = Runtime(app, transport(tmp_path))
    with pytest.raises(ConfigurationError, match="must be"):
        await runtime.serve()
    assert not app.started
    assert not (tmp_path / "x.db").exists()


def test_a_runtime_config_with_nan_cannot_be_built() -> None:
    with pytest.raises(ConfigurationError, match="--retry-delay must be a finite number"):
        RuntimeConfig(retry_delay=math.nan)


def test_a_bad_value_from_the_environment_names_its_variable(project: Path) -> None:
    result = amgi(
        "run", "startup:app", "q", cwd=project,
        env={"STARTED": str(project / "started"), "AMGI_WORKERS": "0"},
    )  # fmt: skip
    line = one_line_error(result)
    assert "--workers must be 1 to 1024" in line
    assert line.endswith("(set by AMGI_WORKERS)")
    assert result.returncode == 2


def test_a_variable_no_option_reads_is_named_in_one_warning(project: Path) -> None:
    """A misspelt ``AMGI_*`` name, or an option of another server, was ignored without a
    word: the run went on with the default the user meant to change."""
    result = amgi(
        "run", "startup:app", "q", "--server", "sqlite", "--database", "q.db",
        cwd=project,
        env={
            "STARTED": str(project / "started"), "AMGI_MAX_ATEMPTS": "3",
            "AMGI_GROUP_ID": "billing", "AMGI_WORKER_INDEX": "", "AMGI_WORKERS": "0",
        },
    )  # fmt: skip
    assert result.returncode == 2  # AMGI_WORKERS is read: its bad value still fails the run
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].endswith(
        "environment: AMGI_GROUP_ID, AMGI_MAX_ATEMPTS (did you mean AMGI_MAX_ATTEMPTS?) "
        "set(s) no option of amgi --server sqlite: ignored"
    )


def test_variables_every_option_reads_give_no_warning(project: Path) -> None:
    result = amgi(
        "send", "q", "x", "--server", "sqlite", cwd=project,
        env={"AMGI_DATABASE": "q.db", "AMGI_LOG_LEVEL": "info", "AMGI_PORT": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr


def test_the_error_line_is_json_under_log_format_json(project: Path) -> None:
    """With ``--log-format json`` the one line a failed start prints is a JSON record too
    (a log pipeline got a plain-text line it could not parse)."""
    result = amgi("run", "nosuch:app", "q", "--log-format", "json", cwd=project)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "error"
    assert record["message"].startswith("amgi: error: cannot import module 'nosuch'")
