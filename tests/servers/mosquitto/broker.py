"""A private Mosquitto instance for the MQTT tests, configured from the project's template."""

from __future__ import annotations

import ipaddress
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[3] / "scripts/brokers/mosquitto/mosquitto.conf.in"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Taken below the kernel's ephemeral range (32768 and up), so that the client sockets
    of tests running meanwhile cannot take it before the broker binds it.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found between 20000 and 32000")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, written to ``directory``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


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
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persistence = persistence
        self.users = users
        self.tls = tls
        """(certificate file, key file) to serve TLS instead of plain MQTT."""
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
        if self.tls is not None:
            cert, key = self.tls
            lines += [f"certfile {cert}", f"keyfile {key}"]
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
