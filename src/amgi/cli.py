"""The ``amgi`` command: ``amgi run`` serves an app, ``amgi send`` publishes one message,
``amgi dead-letters`` lists or replays dead letters, ``amgi asyncapi``/``docs`` describe an app.

Server options are flags named after the server's own settings; which flags exist depends
on ``--server`` (default: the embedded SQLite server). Every failure a user can cause
prints one ``amgi: error: ...`` line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from amgi import __version__
from amgi.errors import AMGIError, ConfigurationError, InvalidEvent, StartupFailed
from amgi.ops.config import OpsConfig
from amgi.ops.dead_letters import add_dead_letter_commands, run_dead_letters
from amgi.ops.env import annotate_help, apply_environment, env_name, unread_variables
from amgi.ops.logs import LOG_FORMATS, JsonFormatter, configure_logging
from amgi.ops.run import check_workers, prepare, serve
from amgi.ops.workers import Supervisor, follow_supervisor, worker_index
from amgi.options import add_flags, build, flag_name
from amgi.runtime import Runtime, RuntimeConfig
from amgi.runtime.batch import validate_send
from amgi.runtime.gc import tune_for_server
from amgi.runtime.routing import Router, parse_route
from amgi.secrets import hide_flag_values, unrecognized_flags
from amgi.servers import DEFAULT_SERVER, SERVERS, installed, load, missing_requirements
from amgi.servers.kit.bindings import BadBinding, UnknownBinding
from amgi.servers.kit.bindings import parse as parse_binding
from amgi.transport import Transport
from amgi.types import AMGIApplication

__all__ = ["import_app", "main"]

logger = logging.getLogger("amgi.cli")

_SERVER_PREFIX = "server__"
_RUNTIME_PREFIX = "runtime__"
_OPS_PREFIX = "ops__"
_ENV_NOTE = "\n\n" + textwrap.fill(
    "Every option can also be set by an environment variable: AMGI_ and the flag's name "
    "in upper case with - as _ (e.g. AMGI_MAX_ATTEMPTS=3); a flag on the command line wins.",
    width=78,
)


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


def import_app(reference: str) -> AMGIApplication:
    """Import ``MODULE:ATTRIBUTE`` (attribute may be dotted) and check it is callable."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"application must be given as MODULE:APP, not {reference!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from None
        raise ConfigurationError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    except Exception as exc:
        raise ConfigurationError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigurationError(f"{reference!r} is not callable (got {type(target).__name__})")
    app: AMGIApplication = target
    return app


def _server_from_argv(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--server" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--server="):
            return arg.split("=", 1)[1]
    return os.environ.get(env_name("--server"), DEFAULT_SERVER)


def _servers_epilog() -> str:
    lines = ["servers (choose with --server; options of each):"]
    for name, transport in installed().items():
        missing = missing_requirements(transport)
        status = f"  [not installed: pip install 'amgi[{transport.extra}]']" if missing else ""
        default = "  (default)" if name == DEFAULT_SERVER else ""
        lines.append(f"  {name}{default}{status}")
        for f in dataclasses.fields(transport.options):
            lines.append(f"      {flag_name(f.name):<28} {f.metadata.get('help', '')}")
    return "\n".join(lines)


_SERVERS_EPILOG = "\0servers"
"""Epilog placeholder: the list of servers imports every server module, so it is built
only when help is shown, not at each ``amgi run`` start."""


class _Parser(argparse.ArgumentParser):
    server = DEFAULT_SERVER

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog == "amgi":  # the top parser reports them, without values
            self.error(f"unrecognized arguments: {unrecognized_flags(extras)}{self._guess(extras)}")
        return parsed, extras

    def _guess(self, extras: Sequence[str]) -> str:
        """``; did you mean --max-attempts?`` for an unknown flag close to a known one."""
        known: set[str] = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    known.update(s for s in parser._option_string_actions if s.startswith("--"))
        flags = [word.split("=", 1)[0] for word in extras if word.startswith("--")]
        guesses = [g for f in flags for g in difflib.get_close_matches(f, known, n=1, cutoff=0.8)]
        return f"; did you mean {' or '.join(guesses)}?" if guesses else ""

    def format_help(self) -> str:
        if self.epilog == _SERVERS_EPILOG:
            self.epilog = _servers_epilog()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        # A usage error quotes command-line words, and a word may be a password: flags
        # are shown, values are not (amgi.secrets).
        message = hide_flag_values(message)
        if message.startswith("unrecognized arguments"):
            message += f" (not options of the {self.server!r} server)"
        self.exit(2, f"amgi: error: {message} (see '{self.prog} --help')\n")


def _port(text: str) -> int:
    """A TCP port number (0: any free port), for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def _log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level`` and ``--log-format``, before the command (``top``) or after it."""
    parser.add_argument(
        "--log-level",
        default="info" if top else argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="text" if top else argparse.SUPPRESS,
        choices=LOG_FORMATS,
        help="log lines as text or one JSON object per line (default: text)",
    )


def _parser(
    server: str, send_targets: Sequence[str] = ()
) -> tuple[argparse.ArgumentParser, type[Transport] | None]:
    try:
        transport: type[Transport] | None = load(server)
    except ConfigurationError:
        transport = None
    _Parser.server = server
    parser = _Parser(
        prog="amgi",
        description="Run AMGI applications on message brokers, or send them messages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_SERVERS_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"amgi {__version__}")
    _log_options(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", metavar="{run,send,dead-letters,asyncapi,docs}"
    )

    def common(sub: argparse.ArgumentParser) -> None:
        _log_options(sub, top=False)  # also accepted after the command
        sub.add_argument(
            "--server",
            default=DEFAULT_SERVER,
            metavar="NAME",
            help=f"protocol server: {', '.join(SERVERS)} (default: {DEFAULT_SERVER})",
        )
        if transport is not None:
            group = sub.add_argument_group(f"options of the {server!r} server")
            add_flags(group, transport.options, dest_prefix=_SERVER_PREFIX)

    run = commands.add_parser(
        "run",
        help="serve an application",
        description="Serve the AMGI application MODULE:APP, consuming ADDRESS... "
        "(queue, topic or topic filter names, as the server understands them)." + _ENV_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_SERVERS_EPILOG,
    )
    run.add_argument("app", metavar="MODULE:APP", help="the application, e.g. myapp:app")
    run.add_argument("addresses", metavar="ADDRESS", nargs="*", help="addresses to consume")
    common(run)
    runtime_group = run.add_argument_group("runtime options (every server)")
    add_flags(runtime_group, RuntimeConfig, dest_prefix=_RUNTIME_PREFIX)
    ops_group = run.add_argument_group("operations (metrics, probes, tracing, workers)")
    add_flags(ops_group, OpsConfig, dest_prefix=_OPS_PREFIX)
    _add_send_routing(run, send_targets)

    send = commands.add_parser(
        "send",
        help="send one message",
        description="Send one message to ADDRESS." + _ENV_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_SERVERS_EPILOG,
    )
    send.add_argument("address", metavar="ADDRESS")
    send.add_argument(
        "payload",
        metavar="PAYLOAD",
        nargs="?",
        help="payload text (UTF-8); without it and --file the message has no payload "
        "(None: on Kafka a tombstone, which deletes its key from a compacted topic)",
    )
    send.add_argument("--file", metavar="F", help="read the payload from file F ('-': stdin)")
    send.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a header (repeatable)",
    )
    send.add_argument(
        "--binding",
        action="append",
        default=[],
        metavar="PROTOCOL.KEY=VALUE",
        help="a binding value, e.g. kafka.key=k1 or amqp.priority=5 (repeatable; a text "
        "or bytes key such as amqp.messageId or kafka.key takes the text as written, "
        "unquoted if it is a JSON string, bytes UTF-8 encoded; other keys take JSON if it "
        "parses, else text); the keys are listed in docs/spec.md",
    )
    common(send)
    add_dead_letter_commands(commands, common, _ENV_NOTE, _SERVERS_EPILOG)

    asyncapi = commands.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of an amgi.app App",
        description="Print the AsyncAPI 3.0 document of MODULE:APP (an amgi.app.App) as JSON.",
    )
    asyncapi.add_argument("app", metavar="MODULE:APP", help="the application, e.g. myapp:app")
    asyncapi.add_argument("--yaml", action="store_true", help="print YAML instead of JSON")
    _log_options(asyncapi, top=False)
    docs = commands.add_parser(
        "docs",
        help="serve the documentation page of an amgi.app App",
        description="Serve an HTML page of the AsyncAPI document of MODULE:APP (an amgi.app.App).",
    )
    docs.add_argument("app", metavar="MODULE:APP", help="the application, e.g. myapp:app")
    docs.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    docs.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    _log_options(docs, top=False)
    annotate_help(parser)
    return parser, transport


# -- send routing (--send-to PATTERN=SERVER plus --SERVER-OPTION flags) ----------------

_SEND_PREFIX = "send__"


def _route_texts(values: Sequence[str]) -> list[str]:
    """``--send-to`` values, each may hold several comma-separated routes."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _send_targets(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The servers named by ``--send-to`` (or ``AMGI_SEND_TO``), in order, each once."""
    given: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--send-to" and i + 1 < len(argv):
            given.append(argv[i + 1])
        elif arg.startswith("--send-to="):
            given.append(arg.split("=", 1)[1])
    if not given and env_name("--send-to") in environ:
        given.append(environ[env_name("--send-to")])
    targets: list[str] = []
    for text in _route_texts(given):
        if "=" in text:
            name = text.rpartition("=")[2].strip()
            if name and name not in targets:
                targets.append(name)
    return targets


def _add_send_routing(run: argparse.ArgumentParser, targets: Sequence[str]) -> None:
    group = run.add_argument_group("send routing")
    group.add_argument(
        "--send-to",
        action="append",
        default=[],
        metavar="PATTERN=SERVER",
        help="send messages whose address matches PATTERN (shell-style, e.g. 'invoices.*') "
        "through SERVER instead; that server's options follow as --SERVER-OPTION, e.g. "
        "--kafka-bootstrap-servers (repeatable or comma-separated; first match wins)",
    )
    for name in targets:
        try:
            cls = load(name)
        except ConfigurationError:
            continue  # reported when the routes are built
        add_flags(
            run.add_argument_group(f"options of the {name!r} send target"),
            cls.options,
            dest_prefix=f"{_SEND_PREFIX}{name}__",
            flag_prefix=f"{name}-",
        )


def _send_routes(values: dict[str, Any], env: dict[str, str]) -> Router | None:
    routes = [parse_route(text) for text in _route_texts(values.get("send_to", []))]
    if not routes:
        return None
    transports: dict[str, Transport] = {}
    for _, name in routes:
        if name not in transports:
            cls = load(name)
            missing = missing_requirements(cls)
            if missing:
                raise ConfigurationError(
                    f"send target {name!r} needs {', '.join(missing)}: "
                    f"pip install 'amgi[{cls.extra}]'"
                )
            options = _options(cls.options, values, f"{_SEND_PREFIX}{name}__", env, name)
            transports[name] = cls([], options)
    return Router((pattern, transports[name]) for pattern, name in routes)


def _app_document(reference: str) -> dict[str, Any]:
    """The AsyncAPI document of the amgi.app App at ``reference``."""
    try:
        from amgi.app import App
    except ImportError as exc:
        raise ConfigurationError(
            f"this command needs amgi.app: pip install 'amgi[app]' ({exc})"
        ) from None
    app = import_app(reference)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"{reference!r} is not an amgi.app.App (got {type(app).__name__}); "
            "AsyncAPI documents come from the typed layer"
        )
    from amgi.app import AppDefinitionError

    try:
        return app.asyncapi()
    except AppDefinitionError as exc:
        raise ConfigurationError(str(exc)) from None


def _app_command(args: argparse.Namespace) -> int:
    document = _app_document(args.app)
    if args.command == "asyncapi":
        if args.yaml:
            from amgi.app._yaml import to_yaml

            text = to_yaml(document)
        else:
            text = json.dumps(document, indent=2) + "\n"
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `amgi asyncapi app:app | head`: the reader had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from amgi.app._docs import DocsServer

    try:
        server = DocsServer(document, args.host, args.port)
    except OSError as exc:
        raise ConfigurationError(
            f"amgi docs cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    print(f"amgi docs: serving {server.url} (Ctrl-C to stop)", flush=True)
    server.serve_forever()
    return 0


def _options(
    cls: type[Any],
    values: dict[str, Any],
    prefix: str,
    env: dict[str, str],
    target: str | None = None,
) -> Any:
    """``build`` of ``cls``; a bad value is a :class:`UsageError` naming its flag (and the
    environment variable that set it, if one did). For the options of send ``target``
    the flag is its prefixed one (``--redis-connect-timeout``)."""
    try:
        return build(cls, values, dest_prefix=prefix)
    except ConfigurationError as exc:
        text = str(exc)
        flag, space, rest = text.partition(" ")
        if target is not None:
            if flag.startswith("--"):
                flag = f"--{target}-{flag[2:]}"
                text = f"{flag}{space}{rest}"
            else:
                text = f"send target {target!r}: {text}"
        if flag in env:
            text += f" (set by {env[flag]})"
        raise UsageError(text) from None


def _fail(text: str, code: int, log_format: str) -> int:
    """Print the one ``amgi: error:`` line (a JSON record under ``--log-format json``, the
    line a log pipeline gets); return ``code``."""
    line = f"amgi: error: {text}"
    if log_format == "json":
        line = JsonFormatter().format(
            logging.LogRecord("amgi", logging.ERROR, "", 0, line, None, None)
        )
    print(line, file=sys.stderr)
    return code


def _transport(
    name: str,
    transport_cls: type[Transport],
    values: dict[str, Any],
    addresses: Sequence[str],
    env: dict[str, str],
) -> Transport:
    missing = missing_requirements(transport_cls)
    if missing:
        raise ConfigurationError(
            f"server {name!r} needs {', '.join(missing)}: pip install 'amgi[{transport_cls.extra}]'"
        )
    return transport_cls(addresses, _options(transport_cls.options, values, _SERVER_PREFIX, env))


def _parse_headers(items: Sequence[str]) -> list[tuple[bytes, bytes]]:
    headers = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--header takes NAME=VALUE, got {item!r}")
        headers.append((os.fsencode(name), os.fsencode(value)))  # the bytes as given
    return headers


def _parse_bindings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    bindings: dict[str, dict[str, Any]] = {}
    for item in items:
        path, sep, raw = item.partition("=")
        protocol, dot, key = path.partition(".")
        if not sep or not dot or not protocol or not key:
            raise UsageError(f"--binding takes PROTOCOL.KEY=VALUE, got {item!r}")
        try:
            value = parse_binding(protocol, key, raw)
        except (UnknownBinding, BadBinding) as exc:
            raise UsageError(f"--binding {path}: {exc}") from None
        bindings.setdefault(protocol, {})[key] = value
    return bindings


async def _send(transport: Transport, args: argparse.Namespace) -> None:
    if args.file is not None and args.payload is not None:
        raise UsageError("give PAYLOAD or --file, not both")
    if args.file == "-":
        payload: bytes | None = sys.stdin.buffer.read()
    elif args.file is not None:
        try:
            payload = Path(args.file).read_bytes()  # noqa: ASYNC240 - before any I/O starts
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file!r}: {exc.strerror}") from None
    elif args.payload is not None:
        payload = os.fsencode(args.payload)  # the bytes as given, whatever their encoding
    else:
        payload = None
    try:
        args.address.encode()
    except UnicodeEncodeError:
        raise UsageError(f"ADDRESS must be UTF-8 text, got {args.address!r:.100}") from None
    event = {
        "type": "message.send",
        "address": args.address,
        "headers": _parse_headers(args.header),
        "payload": payload,
        "bindings": _parse_bindings(args.binding),
    }
    try:  # the rules an app's message.send follows (no amgi-attempt header, say)
        address, headers, payload, bindings = validate_send(event)
    except InvalidEvent as exc:
        raise UsageError(f"cannot send: {exc}") from None
    await transport.connect()
    try:
        await transport.publish(address, headers, payload, bindings)
    finally:
        await transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``amgi`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    server = _server_from_argv(argv)
    parser, transport_cls = _parser(server, _send_targets(argv, os.environ))
    try:
        full_argv = apply_environment(parser, argv, os.environ)
    except ConfigurationError as exc:
        print(f"amgi: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(full_argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    unread = unread_variables(parser, os.environ)
    if unread:
        logger.warning(
            "environment: %s set(s) no option of amgi --server %s: ignored",
            ", ".join(unread),
            server,
        )
    values = vars(args)
    env = {  # the flags an AMGI_* variable set, for error messages
        flag: env_name(flag)
        for flag in (t.partition("=")[0] for t in full_argv if t not in argv)
        if flag.startswith("--")
    }

    def fail(text: str, code: int) -> int:
        return _fail(text, code, args.log_format)

    try:
        if args.command in ("asyncapi", "docs"):
            return _app_command(args)
        if transport_cls is None:
            transport_cls = load(server)  # raises the one-line error of an unknown server
        if args.command == "run":
            app = import_app(args.app)
            if not args.addresses and not getattr(transport_cls, "addresses_optional", False):
                raise UsageError("amgi run needs at least one ADDRESS to consume")
            config = _options(RuntimeConfig, values, _RUNTIME_PREFIX, env)
            ops_config: OpsConfig = _options(OpsConfig, values, _OPS_PREFIX, env)
            transport = _transport(server, transport_cls, values, args.addresses, env)
            routes = _send_routes(values, env)
            worker = worker_index()
            if ops_config.workers > 1 and worker is None:
                check_workers(transport, ops_config, app, server)
                return Supervisor(argv, ops_config.workers).run()
            if worker is not None:
                follow_supervisor()
            ops = prepare(ops_config, app, server, worker)
            runtime = Runtime(
                ops.app,
                transport,
                config,
                metrics=ops.metrics,
                handle_signals=True,
                routes=routes,
            )
            tune_for_server()
            return runtime.run(serve(runtime, ops))
        if args.command == "dead-letters":
            transport = _transport(server, transport_cls, values, [], env)
            return asyncio.run(run_dead_letters(transport, args))
        transport = _transport(server, transport_cls, values, [], env)
        asyncio.run(_send(transport, args))
        empty = " without payload" if args.payload is None and args.file is None else ""
        print(f"sent 1 message{empty} to {args.address!r} ({server})")
        return 0
    except UsageError as exc:
        return fail(str(exc), 2)
    except StartupFailed as exc:
        return fail(f"application startup failed: {exc}", 1)
    except (AMGIError, OSError) as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logger.debug("unexpected error", exc_info=True)
        return fail(
            f"unexpected {type(exc).__name__}: {exc} "
            "(run with --log-level debug for the traceback)",
            1,
        )
