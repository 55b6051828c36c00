"""scripts/pytest-versions, scripts/lib/pythons.sh and the tests.durations plugin, driven
for real: subprocesses of bash and pytest on small test files in a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the small test files below need no plugin: pytest starts in a fraction of the time
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

TWO_TESTS = """
import time


def test_quick():
    pass


def test_slow():
    time.sleep(0.3)
"""


def pytest_in(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest with the durations plugin on ``directory``, its cache kept there."""
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.durations", "-o"]
    cmd += [f"cache_dir={directory / '.cache'}", "-q", "-rA", str(directory)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, cwd=directory, env=ENV
    )


def test_recorded_slow_tests_are_left_out_and_unrecorded_ones_run(tmp_path: Path) -> None:
    (tmp_path / "test_two.py").write_text(TWO_TESTS)
    recorded = pytest_in(tmp_path, "--record-durations")
    assert recorded.returncode == 0, recorded.stdout
    assert "2 passed" in recorded.stdout

    (tmp_path / "test_new.py").write_text("def test_not_recorded():\n    pass\n")
    left_out = pytest_in(tmp_path, "--leave-out-slower-than", "0.2")
    assert left_out.returncode == 0, left_out.stdout
    assert "PASSED test_two.py::test_quick" in left_out.stdout
    assert "PASSED test_new.py::test_not_recorded" in left_out.stdout
    assert "test_slow" not in left_out.stdout
    assert left_out.stdout.strip().splitlines()[-1].startswith("2 passed, 1 deselected")

    without_cache = pytest_in(tmp_path, "-p", "no:cacheprovider", "--leave-out-slower-than", "0.2")
    assert without_cache.returncode == 0, without_cache.stdout
    assert "3 passed" in without_cache.stdout
    assert "deselected" not in without_cache.stdout


def find_python(version: str, pyenv_root: Path) -> subprocess.CompletedProcess[str]:
    script = f"source scripts/lib/pythons.sh && find_python {version}"
    env = {"HOME": str(pyenv_root.parent), "PYENV_ROOT": str(pyenv_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env
    )


def fake_python(root: Path, directory: str, name: str, reports: str) -> None:
    binary = root / "versions" / directory / "bin" / name
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!/bin/sh\necho {reports}\n")
    binary.chmod(0o755)


def test_find_python_takes_the_newest_pyenv_patch_that_really_is_that_version(
    tmp_path: Path,
) -> None:
    root = tmp_path / "pyenv"
    fake_python(root, "3.12.2", "python3.12", "3.12")
    fake_python(root, "3.12.10", "python3.12", "3.12")
    fake_python(root, "3.12.11", "python3.12", "3.11")  # broken: not what it claims
    fake_python(root, "3.12-dev", "python3.12", "3.12")  # not a release
    found = find_python("3.12", root)
    assert found.returncode == 0, found.stderr
    assert found.stdout == f"{root}/versions/3.12.10/bin/python3.12\n"

    missing = find_python("3.13", root)
    assert missing.returncode == 1
    assert missing.stdout == ""


def versions_run(tmp_path: Path, test: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_one.py").write_text(test)
    env = {**ENV, "AMGI_TEST_PYTHONS": "3.99"}
    cmd = ["bash", "scripts/pytest-versions", str(tmp_path), "-q", "-p", "no:cacheprovider"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_a_missing_version_is_one_skipped_line_and_the_closing_line_comes_last(
    tmp_path: Path,
) -> None:
    run = versions_run(tmp_path, "def test_ok():\n    pass\n")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line for line in lines if "3.99" in line] == [
        "scripts/test: Python 3.99 skipped: no interpreter (looked under pyenv's root and on PATH)"
    ]
    assert lines[-1].startswith("1 passed in ")


def test_a_failing_run_makes_the_exit_status_non_zero(tmp_path: Path) -> None:
    run = versions_run(tmp_path, "def test_broken():\n    assert False\n")
    assert run.returncode == 1
    assert "1 failed in " in run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("scripts/test: FAILED on Python 3.")
