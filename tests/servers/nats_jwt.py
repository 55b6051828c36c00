"""An operator, an account and a user made with nkeys (what ``nsc`` would make): the
nats-server configuration that trusts them and the user's ``.creds`` file.

NATS JWTs: a ``{"typ": "JWT", "alg": "ed25519-nkey"}`` header, the claims, and the
issuer's ed25519 signature over both, each base64url without padding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["operator_setup"]

_UNLIMITED = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
    "wildcards": True, "conn": -1, "leaf": -1,
}  # fmt: skip
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _key(prefix: int) -> tuple[bytes, Any]:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _public(pair: Any) -> str:
    return str(pair.public_key.decode())


def _jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()), "iss": _public(issuer), "name": name, "sub": subject,
        "nats": {**nats, "version": 2},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + "." + _b64(json.dumps(claims).encode())
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def _creds(user_jwt: str, seed: bytes) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


def operator_setup(folder: Path) -> tuple[str, Path, Path]:
    """The server configuration (operator mode, accounts preloaded in memory, JetStream
    enabled for the account), a ``.creds`` file it accepts, and one it refuses (a user of
    an account the operator did not sign)."""
    import nkeys

    _, operator = _key(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = _key(nkeys.PREFIX_BYTE_ACCOUNT)
    _, system = _key(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger = _key(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = _jwt(
        operator, _public(operator), "op", {"type": "operator", "system_account": _public(system)}
    )
    accounts = {
        _public(account): _jwt(
            operator, _public(account), "app",
            {"type": "account", "limits": {**_UNLIMITED, **_JETSTREAM}},
        ),
        _public(system): _jwt(
            operator, _public(system), "SYS", {"type": "account", "limits": _UNLIMITED}
        ),
    }  # fmt: skip
    preload = "\n".join(f'  {key}: "{token}"' for key, token in accounts.items())
    config = (
        f'operator: "{operator_jwt}"\nsystem_account: {_public(system)}\n'
        f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n"
    )
    files = []
    for name, issuer in (("user", account), ("stranger", stranger)):
        seed, user = _key(nkeys.PREFIX_BYTE_USER)
        user_jwt = _jwt(
            issuer, _public(user), name,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )  # fmt: skip
        path = folder / f"{name}.creds"
        path.write_text(_creds(user_jwt, seed))
        files.append(path)
    return config, files[0], files[1]
