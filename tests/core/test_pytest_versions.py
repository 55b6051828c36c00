"""scripts/pytest-versions and scripts/lib/pythons.sh, driven for real: subprocesses of
bash and pytest on small test files in a temporary directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the small test files below need no plugin: pytest starts in a fraction of the time
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    "AMGI_TEST_WORKERS": "0",  # no xdist: it is a plugin
}


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


MEET = """
import os
import sys
import time
from pathlib import Path


def test_the_versions_run_at_the_same_time():
    folder = Path(os.environ["MEET_DIR"])
    (folder / ("%d.%d" % sys.version_info[:2])).touch()
    want = set(os.environ["MEET_VERSIONS"].split())
    deadline = time.monotonic() + 60
    while {p.name for p in folder.iterdir()} < want:
        assert time.monotonic() < deadline, "the other versions did not run meanwhile"
        time.sleep(0.05)
"""


def test_newer_versions_run_beside_the_first_and_print_in_order(tmp_path: Path) -> None:
    """The versions whose venv is ready here (scripts/test makes them before pytest runs)
    meet while running; each one's output follows the first one's, in order."""
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    base = subprocess.check_output([ROOT / ".venv/bin/python", "-c", version], text=True).strip()
    ready = [v for v in ("3.12", "3.13") if (ROOT / f".venv-{v}" / ".amgi-installed").exists()]
    meet = tmp_path / "meet"
    meet.mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_meet.py").write_text(MEET)
    env = {**ENV, "AMGI_TEST_PYTHONS": " ".join(ready), "MEET_DIR": str(meet)}
    env["MEET_VERSIONS"] = " ".join([base, *ready])
    cache = f"cache_dir={tmp_path / 'cache'}"
    cmd = ["bash", "scripts/pytest-versions", str(tmp_path / "tests"), "-q", "-o", cache]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    headers = [line for line in run.stdout.splitlines() if line.startswith("scripts/test: pytest")]
    assert [h.split()[4] for h in headers] == [base, *ready]
    closing = [line for line in run.stdout.splitlines() if line.startswith("1 passed in ")]
    assert len(closing) == 1 + len(ready)
    assert run.stdout.strip().splitlines()[-1] == closing[-1]
