"""The AsyncAPI 3.0 document of an App, built from its handlers' type hints."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter

from amgi.app._codec import strip_none
from amgi.app._handler import Handler
from amgi.app._inject import Parameter

if TYPE_CHECKING:
    from amgi.app._app import App

__all__ = ["ASYNCAPI_VERSION", "document"]

ASYNCAPI_VERSION = "3.0.0"
_KAFKA_BINDING_VERSION = "0.5.0"
_REF = "#/components/schemas/{model}"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def _key(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


Mode = Literal["validation", "serialization"]


class _Builder:
    def __init__(self, types: list[tuple[Any, Mode]]) -> None:
        # One pydantic pass over every type, so a model used both ways gets two names
        # (Invoice-Input, Invoice-Output) and shared models are defined once.
        self._index: dict[tuple[int, Mode], int] = {}
        inputs: list[tuple[int, Mode, TypeAdapter[Any]]] = []
        for annotation, mode in types:
            if (id(annotation), mode) not in self._index:
                self._index[(id(annotation), mode)] = len(inputs)
                inputs.append((len(inputs), mode, TypeAdapter(annotation)))
        mapping, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
        self._mapping = mapping
        self.schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
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
        payload: dict[str, Any] | None,
        headers: list[Parameter],
        bindings: list[Parameter],
        examples: list[Any],
        summary: str | None,
    ) -> str:
        mid = self.unique(self.messages, wanted)
        message: dict[str, Any] = {"name": title, "title": title, "contentType": "application/json"}
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


def _parameter(name: str, annotation: Any) -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "description": f"address parameter {name} ({_type_name(annotation)})"
    }
    if typing.get_origin(annotation) is typing.Literal:
        parameter["enum"] = [str(v) for v in typing.get_args(annotation)]
    return parameter


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _example(value: Any) -> Any:
    return TypeAdapter(type(value)).dump_python(value, mode="json")


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


def _types(handlers: list[Handler]) -> list[tuple[Any, Mode]]:
    """Every type the document describes, with the direction it travels."""
    found: list[tuple[Any, Mode]] = []
    for handler in handlers:
        assert handler.plan is not None
        params = handler.plan.all_parameters()
        if handler.payload is not None:
            found.append((handler.payload_type, "validation"))
        found.extend((p.annotation, "validation") for p in params if p.kind == "header")
        key = _kafka_key(params)
        if key is not None:
            found.append((strip_none(key.annotation), "validation"))
        if handler.publish_to is not None:
            found.append((handler.output_type, "serialization"))
    return found


def document(app: App) -> dict[str, Any]:
    """Build the AsyncAPI 3.0 document of ``app`` (its handlers must be prepared)."""
    b = _Builder(_types(app.handlers))
    for handler in app.handlers:
        plan = handler.plan
        assert plan is not None
        params = plan.all_parameters()
        cid = b.channel(handler.pattern.text, handler.address_types)
        payload = None
        title = "Message"
        if handler.payload is not None:
            payload = b.schema(handler.payload_type)
            title = _type_name(handler.payload_type)
        examples = [{"payload": _example(e)} for e in handler.examples]
        op = b.unique(b.operations, _operation_name(handler))
        mid = b.message(
            cid,
            f"{op}.message",
            title,
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
            out_cid = b.channel(handler.publish_to, {})
            out_payload = b.schema(handler.output_type, "serialization")
            out_mid = b.message(
                out_cid,
                f"{op}.result",
                _type_name(handler.output_type),
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
    info: dict[str, Any] = {"title": app.title, "version": app.version}
    if app.description:
        info["description"] = app.description
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": "application/json",
        "channels": b.channels,
        "operations": b.operations,
        "components": {"schemas": b.schemas, "messages": b.messages},
    }
