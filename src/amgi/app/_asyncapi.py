"""The AsyncAPI 3.0 document of an App, built from its handlers' type hints."""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from amgi.app._codec import content_type_of, describe_validation_error, raw_type, strip_none
from amgi.app._errors import AppDefinitionError, first_line
from amgi.app._handler import Handler
from amgi.app._inject import Parameter, type_name

__all__ = ["ASYNCAPI_VERSION", "document"]

ASYNCAPI_VERSION = "3.0.0"
_KAFKA_BINDING_VERSION = "0.5.0"
_REF = "#/components/schemas/{model}"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def _key(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


Mode = Literal["validation", "serialization"]


# Keywords whose value maps names to schemas (the names are not keywords).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def _asyncapi_schema(node: Any, names: bool = False) -> Any:
    """A pydantic JSON Schema as an AsyncAPI 3.0 Schema Object.

    The one difference that matters: AsyncAPI's ``discriminator`` is the property name
    (a string), where pydantic writes OpenAPI's ``{"propertyName": ..., "mapping": ...}``.
    """
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if names:
            converted[key] = _asyncapi_schema(value)
        elif key == "discriminator" and isinstance(value, dict) and "propertyName" in value:
            converted[key] = value["propertyName"]
        else:
            converted[key] = _asyncapi_schema(value, key in _SCHEMA_MAPS)
    return converted


class _Builder:
    def __init__(self, types: list[tuple[Any, Mode, str]]) -> None:
        # One pydantic pass over every type, so a model used both ways gets two names
        # (Invoice-Input, Invoice-Output) and shared models are defined once.
        self._index: dict[tuple[int, Mode], int] = {}
        inputs: list[tuple[int, Mode, TypeAdapter[Any]]] = []
        for annotation, mode, _ in types:
            if (id(annotation), mode) not in self._index:
                self._index[(id(annotation), mode)] = len(inputs)
                inputs.append((len(inputs), mode, TypeAdapter(annotation)))
        try:
            mapping, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
        except Exception:
            _name_the_culprit(types)
            raise
        self._mapping = _asyncapi_schema(mapping)
        self.schemas: dict[str, Any] = _asyncapi_schema(definitions.get("$defs", {}), True)
        self.messages: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self._channel_ids: dict[str, str] = {}

    def unique(self, table: Mapping[str, Any], wanted: str) -> str:
        key = _key(wanted)
        n = 2
        candidate = key
        while candidate in table:
            candidate = f"{key}_{n}"
            n += 1
        return candidate

    def schema(self, annotation: Any, mode: Mode = "validation") -> dict[str, Any]:
        """The JSON Schema of ``annotation`` (serialization mode: what the app publishes)."""
        return dict(self._mapping[(self._index[(id(annotation), mode)], mode)])

    def channel(self, address: str, parameters: Mapping[str, Any]) -> str:
        found = self._channel_ids.get(address)
        if found is not None:
            return found
        cid = self.unique(self.channels, address.replace("{", "").replace("}", ""))
        channel: dict[str, Any] = {"address": address, "messages": {}}
        if parameters:
            channel["parameters"] = {
                name: _parameter(name, annotation) for name, annotation in parameters.items()
            }
        self.channels[cid] = channel
        self._channel_ids[address] = cid
        return cid

    def message(
        self,
        cid: str,
        wanted: str,
        title: str,
        content_type: str,
        payload: dict[str, Any] | None,
        headers: list[Parameter],
        bindings: list[Parameter],
        examples: list[Any],
        summary: str | None,
    ) -> str:
        mid = self.unique(self.messages, wanted)
        message: dict[str, Any] = {"name": title, "title": title, "contentType": content_type}
        if summary:
            message["summary"] = summary
        if payload is not None:
            message["payload"] = payload
        if headers:
            properties = {}
            required = []
            for p in headers:
                name = p.source.name
                sub = self.schema(p.annotation)
                if p.source.description:
                    sub = {**sub, "description": p.source.description}
                properties[name] = sub
                if p.default is inspect.Parameter.empty:
                    required.append(name)
            header_schema: dict[str, Any] = {"type": "object", "properties": properties}
            if required:
                header_schema["required"] = required
            message["headers"] = header_schema
        kafka_key = _kafka_key(bindings)
        if kafka_key is not None:
            message["bindings"] = {
                "kafka": {
                    "key": self.schema(strip_none(kafka_key.annotation)),
                    "bindingVersion": _KAFKA_BINDING_VERSION,
                }
            }
        if examples:
            message["examples"] = examples
        self.messages[mid] = message
        self.channels[cid]["messages"][mid] = {"$ref": f"#/components/messages/{mid}"}
        return mid


_GIVEN = object()
"""The type of a ``publish_to`` parameter each result gives (``Outgoing(params=...)``)."""


def _parameter(name: str, annotation: Any) -> dict[str, Any]:
    if annotation is _GIVEN:
        return {"description": f"address parameter {name} (given by the result's Outgoing params)"}
    parameter: dict[str, Any] = {
        "description": f"address parameter {name} ({type_name(annotation)})"
    }
    if typing.get_origin(annotation) is typing.Literal:
        parameter["enum"] = [str(v) for v in typing.get_args(annotation)]
    return parameter


def _name_the_culprit(types: list[tuple[Any, Mode, str]]) -> None:
    """Raise one AppDefinitionError naming the first type pydantic cannot describe."""
    for annotation, mode, where in types:
        try:
            TypeAdapter(annotation).json_schema(mode=mode)
        except Exception as exc:
            raise AppDefinitionError(
                f"{where}: {type_name(annotation)} has no JSON Schema for the AsyncAPI "
                f"document ({type(exc).__name__}: {first_line(exc)}); describe it with "
                "pydantic's WithJsonSchema"
            ) from None


def _example(handler: Handler, index: int, value: Any) -> Any:
    """Example ``index`` of ``handler`` as JSON, checked against its payload type: an
    example the app would refuse misleads whoever sends what the document shows."""
    where = f"{handler.name}, examples[{index}]"
    typed = handler.payload is not None
    kind = handler.payload_type if typed else type(value)
    try:
        adapter = TypeAdapter(kind)
        return adapter.dump_python(adapter.validate_python(value) if typed else value, mode="json")
    except ValidationError as exc:
        raise AppDefinitionError(
            f"{where}: not a valid {type_name(kind)} (the app would refuse it): "
            f"{describe_validation_error(exc)}"
        ) from None
    except Exception as exc:
        raise AppDefinitionError(
            f"{where}: cannot be written as JSON ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def _operation_name(handler: Handler) -> str:
    return getattr(handler.func, "__name__", None) or handler.name


def _kafka_key(params: list[Parameter]) -> Parameter | None:
    return next(
        (
            p
            for p in params
            if p.kind == "binding" and p.source.protocol == "kafka" and p.source.key == "key"
        ),
        None,
    )


def _output_type(handler: Handler) -> Any:
    # bytearray and memoryview results travel as bytes (pydantic describes only bytes).
    return bytes if raw_type(handler.output_type) is bytes else handler.output_type


def _types(handlers: Sequence[Handler]) -> list[tuple[Any, Mode, str]]:
    """Every type the document describes, with the direction it travels and its owner."""
    found: list[tuple[Any, Mode, str]] = []
    for handler in handlers:
        assert handler.plan is not None
        params = handler.plan.all_parameters()
        if handler.payload is not None:
            where = f"{handler.name}, parameter {handler.payload.name!r}"
            found.append((handler.payload_type, "validation", where))
        found.extend(
            (p.annotation, "validation", f"{p.owner or handler.name}, parameter {p.name!r}")
            for p in params
            if p.kind == "header"
        )
        key = _kafka_key(params)
        if key is not None:
            where = f"{key.owner or handler.name}, parameter {key.name!r}"
            found.append((strip_none(key.annotation), "validation", where))
        if handler.publish_to is not None:
            found.append((_output_type(handler), "serialization", f"{handler.name}, return"))
    return found


def document(
    handlers: Sequence[Handler], *, title: str, version: str, description: str | None
) -> dict[str, Any]:
    """Build the AsyncAPI 3.0 document of an application (its handlers must be prepared)."""
    b = _Builder(_types(handlers))
    for handler in handlers:
        plan = handler.plan
        assert plan is not None
        params = plan.all_parameters()
        cid = b.channel(handler.pattern.text, handler.address_types)
        payload = None
        message_title = "Message"
        content_type = "application/json"
        if handler.payload is not None:
            payload = b.schema(handler.payload_type)
            message_title = type_name(handler.payload_type)
            content_type = content_type_of(handler.payload_type)
        examples = [{"payload": _example(handler, i, e)} for i, e in enumerate(handler.examples)]
        op = b.unique(b.operations, _operation_name(handler))
        mid = b.message(
            cid,
            f"{op}.message",
            message_title,
            content_type,
            payload,
            [p for p in params if p.kind == "header"],
            [p for p in params if p.kind == "binding"],
            examples,
            handler.summary,
        )
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cid}"},
            "messages": [{"$ref": f"#/channels/{cid}/messages/{mid}"}],
        }
        if handler.summary:
            operation["summary"] = handler.summary
        if handler.description:
            operation["description"] = handler.description.strip()
        if handler.batch:
            operation["x-amgi-batch"] = True
        b.operations[op] = operation
        if handler.publish_to is not None:
            assert handler.output_pattern is not None
            out_params = {
                n: handler.address_types.get(n, _GIVEN) for n in handler.output_pattern.params
            }
            out_cid = b.channel(handler.publish_to, out_params)
            out_payload = b.schema(_output_type(handler), "serialization")
            out_mid = b.message(
                out_cid,
                f"{op}.result",
                type_name(handler.output_type),
                content_type_of(handler.output_type),
                out_payload,
                [],
                [],
                [],
                f"published by {op}",
            )
            send_op = b.unique(b.operations, f"{op}.publish")
            b.operations[send_op] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{out_cid}"},
                "summary": f"the result of {op}",
                "messages": [{"$ref": f"#/channels/{out_cid}/messages/{out_mid}"}],
            }
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    built = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": "application/json",
        "channels": b.channels,
        "operations": b.operations,
        "components": {"schemas": b.schemas, "messages": b.messages},
    }
    safe: dict[str, Any] = _json_safe(built)
    return safe


def _json_safe(node: Any) -> Any:
    """``node`` with each infinite or NaN number (a default, an example) as a string.

    JSON has no such numbers. The strings are those pydantic writes and reads back as
    floats (``ser_json_inf_nan="strings"``): "Infinity", "-Infinity", "NaN".
    """
    if isinstance(node, dict):
        return {key: _json_safe(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_json_safe(item) for item in node]
    if isinstance(node, float) and not math.isfinite(node):
        return "NaN" if math.isnan(node) else "Infinity" if node > 0 else "-Infinity"
    return node
