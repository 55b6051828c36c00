"""Secret option values are masked wherever options are shown: repr, errors, --help."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

import pytest

from amgi.cli import main
from amgi.options import invalid
from amgi.secrets import (
    MASK,
    hide_flag_values,
    mask_url,
    masked,
    redact,
    redact_client_logs,
    unrecognized_flags,
)
from amgi.servers import SERVERS, load
from amgi.servers.amqp import AmqpOptions
from amgi.servers.kafka import KafkaOptions
from tests.secrets import assert_hidden, new_marker


def _secret_fields(server: str) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(load(server).options) if f.metadata.get("secret")]


WITH_SECRETS = [name for name in sorted(SERVERS) if _secret_fields(name)]


def _value(f: dataclasses.Field[Any], marker: str) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # a list of NAME=VALUE settings
        return [f"sasl.password={marker}"]
    if "url" in f.name:
        return f"http://user:{marker}@127.0.0.1:1/"
    return marker


def test_the_servers_with_secret_options() -> None:
    assert {"amqp", "http", "kafka", "mqtt"} <= set(WITH_SECRETS)


@pytest.mark.parametrize("server", WITH_SECRETS)
def test_secret_values_are_masked_in_repr_and_option_errors(server: str) -> None:
    marker = new_marker()
    cls = load(server).options
    secrets = {f.name: _value(f, marker) for f in _secret_fields(server)}
    if server == "mqtt":
        secrets["username"] = "user"  # a password needs one
    options = cls(**secrets)
    texts = [repr(options), str(options)]
    texts += [str(invalid(options, name, "is refused")) for name in secrets]
    assert all("(got " in text for text in texts[2:])
    assert_hidden(marker, texts)


@pytest.mark.parametrize("server", WITH_SECRETS)
def test_secret_values_are_masked_in_help_and_usage_errors(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = new_marker()
    fields = _secret_fields(server)
    flags = [
        "--" + f.name.replace("_", "-") if f.default_factory is dataclasses.MISSING else ""
        for f in fields
    ]
    flags = [flag for flag in flags if flag]
    texts: list[str] = []
    for argv in (
        ["run", "app:app", "q", "--server", server, flags[0], marker, "--help"],
        ["run", "app:app", "q", "--send-to", f"x={server}", f"--{server}{flags[0][1:]}", marker,
         "--help"],
        ["run", "app:app", "q", "--server", server, f"{flags[0][:-2]}={marker}"],  # abbreviated
        ["run", "app:app", "q", "--server", server, f"{flags[0]}x", marker],  # a typo
        ["send", "q", "--server", server, f"--{server}{flags[0][1:]}", marker],  # no --send-to
    ):  # fmt: skip
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        assert code in (0, 1, 2)
        out = capsys.readouterr()
        texts += [out.out, out.err]
    assert_hidden(marker, texts)
    assert (
        "unrecognized arguments: "
        + f"{flags[0]}x (and 1 more word(s) not shown: they may be secret values)"
        in "".join(texts)
    )


def test_a_secret_default_is_shown_masked_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "app:app", "q", "--server", "amqp", "--help"])
    assert f"(default: amqp://guest:{MASK}@127.0.0.1:5672/)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:pw@127.0.0.1:5672/vh?heartbeat=5", f"amqp://guest:{MASK}@127.0.0.1:5672/vh?heartbeat=5"),
        ("https://token@example.test/hook", f"https://{MASK}@example.test/hook"),
        ("http://u:p:q@[::1]:80/", f"http://u:{MASK}@[::1]:80/"),
        # A password with an unencoded / ? or # left the URL unmasked (the user
        # information ended at it); now it ends at the last @, so an @ in a path or
        # query masks more than needed, never less.
        ("amqp://guest:se/cret@127.0.0.1:5672/", f"amqp://guest:{MASK}@127.0.0.1:5672/"),
        ("redis://u:pa?ss#w@h:6379/0", f"redis://u:{MASK}@h:6379/0"),
        ("http://127.0.0.1:80/a@b", f"http://127.0.0.1:{MASK}@b"),
        # Query values whose name looks secret (redis-py takes ?password=).
        ("redis://h:6379/0?password=pw&db=1", f"redis://h:6379/0?password={MASK}&db=1"),
        ("http://h/p?x=1&token=t#f", f"http://h/p?x=1&token={MASK}#f"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_masked_keeps_only_what_is_not_secret() -> None:
    assert masked("s3cret") == MASK
    assert masked(["a=b"]) == MASK
    assert masked("amqp://u:p@h/") == f"amqp://u:{MASK}@h/"


def test_usage_errors_show_flags_not_values() -> None:
    assert hide_flag_values("ambiguous option: --sasl=pw could match --sasl-x, --sasl-y") == (
        f"ambiguous option: --sasl={MASK} could match --sasl-x, --sasl-y"
    )
    assert unrecognized_flags(["a", "b"]) == "a b"
    assert unrecognized_flags(["--pasword", "pw", "--x=pw"]) == (
        "--pasword --x (and 1 more word(s) not shown: they may be secret values)"
    )


def test_client_log_filter_masks_credential_headers(caplog: pytest.LogCaptureFixture) -> None:
    marker = new_marker()
    name = f"test.wire.{uuid.uuid4().hex}"
    redact_client_logs(name, name)
    assert len(logging.getLogger(name).filters) == 1  # idempotent
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger(name)
    log.debug("CanonicalRequest:\n%s", f"host:h\nx-amz-security-token:{marker}\nx-amz-target:T")
    log.debug("Sending: %s", {"X-Amz-Security-Token": marker.encode(), "Other": b"kept"})
    text = caplog.text
    assert_hidden(marker, [text])
    assert f"x-amz-security-token:{MASK}" in text
    assert f"'X-Amz-Security-Token': b'{MASK}'" in text
    assert "b'kept'" in text


def test_redact_masks_every_form_of_a_secret_option_value() -> None:
    options = KafkaOptions(
        sasl_password="pw1",
        config=["sasl.oauthbearer.config=tok2,part3", "linger.ms=5", "debug=broker"],
    )
    text = 'bad "pw1", "tok2", "part3", "sasl.oauthbearer.config=tok2,part3"; a part: part3'
    assert redact(text, options) == (f'bad "{MASK}", "{MASK}", "{MASK}", "{MASK}"; a part: {MASK}')
    # A short value of an item whose name is not a secret's is left alone: it masked
    # every 5 of a message, and turned librdkafka's error code -186 into -*****86. A long
    # one may be a secret under a name we do not know.
    text = "linger.ms=5 failed: val=-186, 5 brokers; debug=broker"
    assert redact(text, options) == f"{MASK} failed: val=-186, 5 brokers; {MASK}"
    unknown = KafkaOptions(config=["some.new.property=0123456789abcdef,short"])
    assert redact('bad "0123456789abcdef" and short', unknown) == f'bad "{MASK}" and short'
    url = AmqpOptions(url="amqp://u:pw4@h/")
    assert redact("at amqp://u:pw4@h/ and pw4", url) == f"at {MASK} and {MASK}"
    split = AmqpOptions(url="amqp://u:pw/5@h/")  # the password a client split at its /
    assert redact("at amqp://u:pw/5@h/: pw/5", split) == f"at {MASK}: {MASK}"


@pytest.mark.parametrize(
    ("server", "flag", "url"),
    [
        ("amqp", "--url", "amqp://guest:{}/x@127.0.0.1:5672/"),
        ("redis", "--url", "redis://u:{}?x@127.0.0.1:6379/0"),
        ("nats", "--servers", "nats://u:{}#x@127.0.0.1:4222"),
    ],
)
def test_a_broker_url_whose_password_its_client_would_split_is_refused(
    server: str, flag: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password with an unencoded / ? # or @: the client split the URL there, quoting
    a piece of the password in its error (and the URL went unmasked). Now it is one
    error naming the fix, before connecting, with the password masked."""
    marker = new_marker()
    address = "q" if server != "nats" else "s"
    argv = ["run", "tests.servers.http_app:app", address, "--server", server]
    code = main([*argv, flag, url.format(marker)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{flag} its user name or password holds" in err
    assert "percent-encode" in err
    assert_hidden(marker, [err])
