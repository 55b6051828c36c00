"""scripts/lib/minimums.py and scripts/test-minimums' argument check, run for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def minimums(cwd: Path, *extras: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "scripts" / "lib" / "minimums.py"
    return subprocess.run(
        [sys.executable, str(script), *extras], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_each_requirement_of_the_extras_pinned_at_its_declared_minimum() -> None:
    run = minimums(ROOT, "redis", "http", "tracing")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split("==")[0] for line in lines] == [
        "redis[hiredis]",
        "httptools",
        "opentelemetry-api",
        "opentelemetry-sdk",
    ]
    api, sdk = lines[2].split("==")[1], lines[3].split("==")[1]
    assert api == sdk


def test_a_requirement_without_a_minimum_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project.optional-dependencies]\nbroker = ["somelib>=1.2", "otherlib<3"]\n'
    )
    run = minimums(tmp_path, "broker")
    assert run.returncode == 1
    assert run.stderr == (
        "scripts/test-minimums: 'otherlib<3' (extra broker) declares no minimum\n"
    )
    assert run.stdout == ""


def test_an_unknown_extra_is_refused_before_anything_is_installed() -> None:
    run = subprocess.run(
        ["bash", "scripts/test-minimums", "redis", "nosuch"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("scripts/test-minimums: no extra nosuch (one of: ")
    assert len(run.stderr.splitlines()) == 1


def test_of_several_requirements_on_one_name_the_highest_that_applies_here_counts(
    tmp_path: Path,
) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[project.optional-dependencies]\n"
        'broker = ["lib[fast]>=1.2", "lib>=1.10; python_version >= \'3.0\'",'
        " \"lib>=9; python_version < '3.0'\"]\n"
    )
    run = minimums(tmp_path, "broker")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "lib[fast]==1.10\n"
