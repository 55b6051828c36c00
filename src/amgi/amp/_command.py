"""Command declarations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from ._arguments import (
    Argument,
    DecodePlan,
    Descriptor,
    Spec,
    compile_arguments,
    decode_arguments,
    decode_planned,
    encode_arguments,
    make_decode_plan,
)
from ._box import Box, Plan, make_plan
from ._errors import TLS_ERROR_CODE, TLSNotAvailable

__all__ = ["Command", "ProtocolSwitchCommand", "StartTLS"]

F = TypeVar("F", bound=Callable[..., Any])

RESPONDER_ATTRIBUTE = "__amp_command__"


def _code(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


def _plan(specs: tuple[Spec, ...], specials: tuple[bytes, ...]) -> Plan | None:
    if any(not argument.single_key for _, _, argument in specs):
        return None
    return make_plan([(key, name, argument.to_bytes) for key, name, argument in specs], specials)


def _descriptors(specs: tuple[Spec, ...]) -> tuple[str, ...]:
    return tuple(name for _, name, argument in specs if isinstance(argument, Descriptor))


class Command:
    """Declare a remote call: subclass and set the class attributes.

    ``arguments`` and ``response`` are lists of ``(name, Argument)`` pairs
    (names as ``bytes`` or ``str``); ``errors`` and ``fatal_errors`` map
    exception classes to error codes; ``requires_answer = False`` sends the
    call without an ``_ask`` tag; ``command_name`` defaults to the class name.

    Call it with ``await conn.call_remote(Cmd, **kwargs)`` (or ``Cmd(**kwargs)``)
    and answer it with a method decorated by ``@Cmd.responder``.
    """

    arguments: ClassVar[Iterable[tuple[bytes | str, Argument[Any]]]] = ()
    response: ClassVar[Iterable[tuple[bytes | str, Argument[Any]]]] = ()
    errors: ClassVar[Mapping[type[BaseException], bytes | str]] = {}
    fatal_errors: ClassVar[Mapping[type[BaseException], bytes | str]] = {}
    requires_answer: ClassVar[bool] = True
    command_name: ClassVar[bytes | str | None] = None
    switches_protocol: ClassVar[bool] = False

    # Compiled by __init_subclass__.
    name: ClassVar[bytes] = b"Command"
    argument_specs: ClassVar[tuple[Spec, ...]] = ()
    response_specs: ClassVar[tuple[Spec, ...]] = ()
    error_codes: ClassVar[dict[type[BaseException], tuple[bytes, bool]]] = {}
    error_types: ClassVar[dict[bytes, type[BaseException]]] = {}
    call_plan: ClassVar[Plan | None] = None
    answer_plan: ClassVar[Plan | None] = None
    argument_decoder: ClassVar[DecodePlan | None] = None
    response_decoder: ClassVar[DecodePlan | None] = None
    argument_descriptors: ClassVar[tuple[str, ...]] = ()
    response_descriptors: ClassVar[tuple[str, ...]] = ()
    # Whether the connection must look twice at this command's boxes (StartTLS, a
    # protocol switch); ``plain``: neither that nor descriptors.
    special: ClassVar[bool] = False
    plain: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_name = cls.__dict__.get("command_name")
        cls.name = _code(own_name) if own_name is not None else cls.__name__.encode("ascii")
        cls.argument_specs = compile_arguments(cls.arguments)
        cls.response_specs = compile_arguments(cls.response)
        codes: dict[type[BaseException], tuple[bytes, bool]] = {}
        for exc_type, code in cls.errors.items():
            codes[exc_type] = (_code(code), False)
        for exc_type, code in cls.fatal_errors.items():
            codes[exc_type] = (_code(code), True)
        cls.error_codes = codes
        cls.error_types = {code: exc_type for exc_type, (code, _) in codes.items()}
        call_specials = (b"_command", b"_ask") if cls.requires_answer else (b"_command",)
        cls.call_plan = _plan(cls.argument_specs, call_specials)
        cls.answer_plan = _plan(cls.response_specs, (b"_answer",))
        cls.argument_decoder = make_decode_plan(cls.argument_specs)
        cls.response_decoder = make_decode_plan(cls.response_specs)
        cls.argument_descriptors = _descriptors(cls.argument_specs)
        cls.response_descriptors = _descriptors(cls.response_specs)
        # Set on each class itself, so the lookups on the hot path stop at once.
        cls.switches_protocol = cls.switches_protocol
        cls.special = cls.switches_protocol or cls.__dict__.get("special", False)
        cls.plain = not (cls.special or cls.argument_descriptors or cls.response_descriptors)
        if cls.switches_protocol and (cls.response_specs or not cls.requires_answer):
            raise TypeError(
                f"{cls.__name__}: a protocol switch needs an answer and has no response"
            )

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(**{self.kwargs!r})"

    @classmethod
    def responder(cls, func: F) -> F:
        """Mark a method (sync or async) as the responder for this command."""
        setattr(func, RESPONDER_ATTRIBUTE, cls)
        return func

    @classmethod
    def encode_arguments(cls, values: Mapping[str, Any]) -> Box:
        """Encode call arguments into a box (without the special keys)."""
        return encode_arguments(cls.argument_specs, values)

    @classmethod
    def decode_arguments(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        """Decode call arguments from a received box."""
        plan = cls.argument_decoder
        if plan is not None:
            return decode_planned(plan, box)
        return decode_arguments(cls.argument_specs, box)

    @classmethod
    def encode_response(cls, values: Mapping[str, Any]) -> Box:
        """Encode a responder's result into a box (without the special keys)."""
        return encode_arguments(cls.response_specs, values)

    @classmethod
    def decode_response(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        """Decode an answer box into the result dict."""
        plan = cls.response_decoder
        if plan is not None:
            return decode_planned(plan, box)
        return decode_arguments(cls.response_specs, box)

    @classmethod
    def code_for(cls, exc: BaseException) -> tuple[bytes, bool] | None:
        """The declared ``(code, fatal)`` for an exception (subclasses match), or None."""
        codes = cls.error_codes
        if not codes:
            return None
        for klass in type(exc).__mro__:
            found = codes.get(klass)
            if found is not None:
                return found
        return None


class StartTLS(Command):
    """Twisted's ``StartTLS`` command: TLS begins right after the (empty) answer."""

    command_name = b"StartTLS"
    special = True
    errors: ClassVar[Mapping[type[BaseException], bytes | str]] = {TLSNotAvailable: TLS_ERROR_CODE}


class ProtocolSwitchCommand(Command):
    """Twisted's ``ProtocolSwitchCommand``: once answered, the connection carries another protocol.

    Subclass it with ``arguments`` (and ``errors``). The responder returns the
    :class:`asyncio.Protocol` that takes the connection over right after the (empty)
    answer; the caller uses :meth:`AMP.switch_protocol`. Until the answer, the caller
    sends nothing else and the responder reads nothing else; an error answer leaves
    the connection speaking AMP.
    """

    switches_protocol = True
