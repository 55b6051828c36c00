"""A private Mosquitto instance for the MQTT tests, configured from the project's template."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port, port_open, self_signed

__all__ = ["Mosquitto", "free_port", "port_open", "self_signed"]

TEMPLATE = Path(__file__).resolve().parents[3] / "scripts/brokers/mosquitto/mosquitto.conf.in"


class Mosquitto:
    """One Mosquitto process on 127.0.0.1:``port`` with its files in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        persistence: bool = True,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        acl: str | None = None,
        extra: str = "",
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persistence = persistence
        self.users = users
        self.tls = tls
        """(certificate file, key file) to serve TLS instead of plain MQTT."""
        self.client_ca = client_ca
        """With TLS: clients must show a certificate this CA file trusts."""
        self.acl = acl
        """The text of an ACL file (``user NAME`` / ``topic read|write FILTER`` lines)."""
        self.extra = extra
        """More configuration lines."""
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        if self.users is not None:
            password_file = self.directory / "passwords"
            password_file.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password], check=True
                )
            password_file.chmod(0o600)
            lines.append(f"password_file {password_file}")
        if self.acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(self.acl)
            acl_file.chmod(0o600)
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            cert, key = self.tls
            lines += [f"certfile {cert}", f"keyfile {key}"]
            if self.client_ca is not None:
                lines += [f"cafile {self.client_ca}", "require_certificate true"]
        if self.extra:
            lines.append(self.extra)
        text = (
            TEMPLATE.read_text()
            .replace("@PORT@", str(self.port))
            .replace("@DATA_DIR@", str(self.directory))
            .replace("@PERSISTENCE@", "true" if self.persistence else "false")
            .replace("@ANONYMOUS@", "false" if self.users is not None else "true")
            .replace("@LISTENER_OPTIONS@", "\n".join(lines))
        )
        path = self.directory / "mosquitto.conf"
        path.write_text(text)
        return path

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [binary, "-c", str(self._config())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "mosquitto.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop gracefully (the broker saves its persistence file)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto for one test module, stopped at its end (import it where used)."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()
