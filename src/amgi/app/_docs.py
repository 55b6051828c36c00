"""The documentation page of an AsyncAPI document: one self-contained HTML page, and a server.

The page is rendered here, in Python, from the document: no script, no CDN, no bundle, so
it works offline and shows everything without JavaScript. ``amgi docs MODULE:APP`` serves
it at ``/``, with the document at ``/asyncapi.json`` and ``/asyncapi.yaml``.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from amgi.app._yaml import to_yaml

__all__ = ["DocsServer", "render_page"]

_MAX_DEPTH = 6

_CSS = """
:root { --fg: #1d2330; --muted: #5d6b82; --line: #dfe4ec; --bg: #f6f8fb; --accent: #2454d6;
        --recv: #0f7b5f; --send: #a4560b; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #17213a; color: #fff; padding: 24px 32px; }
header h1 { margin: 0; font-size: 26px; }
header .version { opacity: .75; margin-left: 8px; font-size: 15px; }
header p { margin: 8px 0 0; opacity: .9; }
header a { color: #b9ccff; }
main { display: grid; grid-template-columns: 260px 1fr; gap: 24px; padding: 24px 32px;
       max-width: 1300px; }
nav { position: sticky; top: 16px; align-self: start; font-size: 14px; }
nav h2 { font-size: 12px; text-transform: uppercase; color: var(--muted); margin: 16px 0 6px; }
nav a { display: block; color: var(--fg); text-decoration: none; padding: 2px 0; }
nav a:hover { color: var(--accent); }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
               padding: 18px 22px; margin-bottom: 18px; }
h2.section { font-size: 18px; margin: 4px 0 12px; }
h3 { margin: 0 0 6px; font-size: 17px; }
h4 { margin: 16px 0 6px; font-size: 14px; color: var(--muted); text-transform: uppercase; }
code, pre { font: 13px/1.45 ui-monospace, "DejaVu Sans Mono", monospace; }
pre { background: #f1f4f9; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      overflow: auto; }
.badge { display: inline-block; font-size: 12px; font-weight: 600; border-radius: 4px;
         padding: 1px 8px; color: #fff; margin-right: 8px; vertical-align: 2px; }
.receive { background: var(--recv); } .send { background: var(--send); }
.address { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 16px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; }
td.field { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: nowrap; }
td.type { color: var(--accent); font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.req { color: #b3261e; font-size: 12px; margin-left: 4px; }
.muted { color: var(--muted); }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _Renderer:
    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc
        components = doc.get("components", {})
        self.schemas: Mapping[str, Any] = components.get("schemas", {})
        self.messages: Mapping[str, Any] = components.get("messages", {})

    def deref(self, node: Any) -> Any:
        seen = 0
        while isinstance(node, Mapping) and "$ref" in node and seen < 20:
            node = self.lookup(node["$ref"])
            seen += 1
        return node

    def lookup(self, ref: str) -> Any:
        node: Any = self.doc
        for part in ref.lstrip("#/").split("/"):
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        return node

    def type_of(self, schema: Any) -> str:
        if not isinstance(schema, Mapping):
            return "any"
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                sep = " &amp; " if key == "allOf" else " | "
                return sep.join(self.type_of(s) for s in schema[key])
        kind = schema.get("type")
        if "const" in schema:
            return _e(json.dumps(schema["const"]))
        if "enum" in schema:
            return " | ".join(_e(json.dumps(v)) for v in schema["enum"])
        if kind == "array":
            return f"array of {self.type_of(schema.get('items', {}))}"
        if kind == "object" and "additionalProperties" in schema and "properties" not in schema:
            return f"map of {self.type_of(schema['additionalProperties'])}"
        if isinstance(kind, list):
            return " | ".join(_e(k) for k in kind)
        text = _e(kind or "any")
        if "format" in schema:
            text += f" <span class=muted>({_e(schema['format'])})</span>"
        return text

    @staticmethod
    def constraints(schema: Mapping[str, Any]) -> str:
        names = {
            "minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<",
            "minLength": "min length", "maxLength": "max length", "minItems": "min items",
            "maxItems": "max items", "pattern": "pattern", "default": "default",
        }  # fmt: skip
        parts = [
            f"{label} {json.dumps(schema[key])}" for key, label in names.items() if key in schema
        ]
        return _e(", ".join(parts))

    def fields(self, schema: Any, prefix: str = "", depth: int = 0) -> list[str]:
        schema = self.deref(schema)
        rows: list[str] = []
        if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
            return rows
        required = set(schema.get("required", ()))
        for name, sub in (schema.get("properties") or {}).items():
            described = sub if isinstance(sub, Mapping) else {}
            flag = "<span class=req>required</span>" if name in required else ""
            rows.append(
                f"<tr><td class=field>{_e(prefix + name)}{flag}</td>"
                f"<td class=type>{self.type_of(sub)}</td>"
                f"<td>{_e(described.get('description', ''))}</td>"
                f"<td class=muted>{self.constraints(described)}</td></tr>"
            )
            target = self.deref(sub)
            if isinstance(target, Mapping) and target.get("type") == "array":
                target = self.deref(target.get("items", {}))
                child = f"{prefix}{name}[]."
            else:
                child = f"{prefix}{name}."
            if isinstance(target, Mapping) and "properties" in target:
                rows.extend(self.fields(target, child, depth + 1))
        return rows

    def schema_block(self, schema: Any) -> str:
        rows = self.fields(schema)
        if not rows:
            return f"<p>type <code>{self.type_of(schema)}</code></p>"
        return (
            f"<p class=muted>type <code>{self.type_of(schema)}</code></p>"
            "<table><tr><th>field</th><th>type</th><th>description</th><th>constraints</th></tr>"
            + "".join(rows)
            + "</table>"
        )

    def examples(self, message: Mapping[str, Any]) -> str:
        examples = [e.get("payload") for e in message.get("examples", []) if "payload" in e]
        payload = self.deref(message.get("payload", {}))
        if isinstance(payload, Mapping):
            examples.extend(payload.get("examples", []))
        if not examples:
            return ""
        blocks = "".join(f"<pre>{_e(json.dumps(e, indent=2))}</pre>" for e in examples)
        return f"<h4>Examples</h4>{blocks}"

    def message(self, ref: Mapping[str, Any]) -> str:
        message = self.deref(ref)
        if not isinstance(message, Mapping):
            return ""
        out = [
            f"<h4>Message {_e(message.get('title') or message.get('name', ''))}</h4>"
            f"<p class=muted>content type "
            f"<code>{_e(message.get('contentType', self.doc.get('defaultContentType', '')))}"
            "</code></p>"
        ]
        if "summary" in message:
            out.append(f"<p>{_e(message['summary'])}</p>")
        if "headers" in message:
            out.append("<h4>Headers</h4>" + self.schema_block(message["headers"]))
        bindings = message.get("bindings", {})
        for protocol, binding in bindings.items():
            if isinstance(binding, Mapping) and "key" in binding:
                out.append(
                    f"<h4>{_e(protocol)} key</h4><p><code>{self.type_of(binding['key'])}</code></p>"
                )
        if "payload" in message:
            out.append("<h4>Payload</h4>" + self.schema_block(message["payload"]))
        out.append(self.examples(message))
        return "".join(out)

    def operation(self, op_id: str, op: Mapping[str, Any]) -> str:
        channel = self.deref(op.get("channel", {}))
        address = channel.get("address", "") if isinstance(channel, Mapping) else ""
        action = op.get("action", "")
        out = [
            f'<section class=card id="op-{_e(op_id)}">'
            f"<h3><span class='badge {_e(action)}'>{_e(action.upper())}</span>"
            f"<span class=address>{_e(address)}</span></h3>"
            f"<p class=muted>operation <code>{_e(op_id)}</code></p>"
        ]
        for key in ("summary", "description"):
            if key in op:
                out.append(f"<p>{_e(op[key])}</p>")
        params = channel.get("parameters", {}) if isinstance(channel, Mapping) else {}
        if params:
            rows = "".join(
                f"<tr><td class=field>{_e(name)}</td><td>{_e(p.get('description', ''))}</td></tr>"
                for name, p in params.items()
            )
            out.append(f"<h4>Address parameters</h4><table>{rows}</table>")
        for ref in op.get("messages", []):
            out.append(self.message(ref))
        out.append("</section>")
        return "".join(out)

    def page(self) -> str:
        info = self.doc.get("info", {})
        title = info.get("title", "AsyncAPI")
        operations = self.doc.get("operations", {})
        channels = self.doc.get("channels", {})
        nav = ["<nav><h2>Channels</h2>"]
        for cid, channel in channels.items():
            nav.append(f'<a href="#channel-{_e(cid)}">{_e(channel.get("address", cid))}</a>')
        nav.append("<h2>Operations</h2>")
        for op_id, op in operations.items():
            nav.append(f'<a href="#op-{_e(op_id)}">{_e(op.get("action", ""))} {_e(op_id)}</a>')
        nav.append("<h2>Schemas</h2>")
        for name in self.schemas:
            nav.append(f'<a href="#schema-{_e(name)}">{_e(name)}</a>')
        nav.append("</nav>")
        body = ["<div>", "<h2 class=section>Channels</h2>"]
        for cid, channel in channels.items():
            used = [
                f"{_e(op.get('action', ''))} <a href='#op-{_e(op_id)}'>{_e(op_id)}</a>"
                for op_id, op in operations.items()
                if op.get("channel", {}).get("$ref") == f"#/channels/{cid}"
            ]
            body.append(
                f'<section class=card id="channel-{_e(cid)}"><h3 class=address>'
                f"{_e(channel.get('address', cid))}</h3>"
                f"<p class=muted>{', '.join(used) or 'no operations'}</p></section>"
            )
        body.append("<h2 class=section>Operations</h2>")
        body.extend(self.operation(op_id, op) for op_id, op in operations.items())
        body.append("<h2 class=section>Schemas</h2>")
        for name, schema in self.schemas.items():
            body.append(
                f'<section class=card id="schema-{_e(name)}"><h3>{_e(name)}</h3>'
                f"<p>{_e(schema.get('description', ''))}</p>{self.schema_block(schema)}</section>"
            )
        body.append("</div>")
        description = info.get("description", "")
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}: AsyncAPI</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}<span class=version>{_e(info.get('version', ''))}</span></h1>"
            f"<p>{_e(description)}</p>"
            f"<p class=muted>AsyncAPI {_e(self.doc.get('asyncapi', ''))} · "
            "<a href='asyncapi.json'>asyncapi.json</a> · <a href='asyncapi.yaml'>asyncapi.yaml</a>"
            "</p></header>"
            f"<main>{''.join(nav)}{''.join(body)}</main></body></html>"
        )


def render_page(document: Mapping[str, Any]) -> str:
    """The HTML page showing ``document`` (an AsyncAPI 3.0 document)."""
    return _Renderer(document).page()


class DocsServer:
    """Serves the page and the document over HTTP: ``/``, ``/asyncapi.json``, ``/asyncapi.yaml``."""

    def __init__(self, document: Mapping[str, Any], host: str = "127.0.0.1", port: int = 8000):
        files = {
            "/": (render_page(document).encode(), "text/html; charset=utf-8"),
            "/asyncapi.json": (json.dumps(document, indent=2).encode(), "application/json"),
            "/asyncapi.yaml": (to_yaml(document).encode(), "application/yaml; charset=utf-8"),
        }
        files["/index.html"] = files["/"]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = files.get(self.path.split("?", 1)[0])
                if found is None:
                    self.send_error(404)
                    return
                body, kind = found
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the page is served."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def serve_forever(self) -> None:
        """Serve until interrupted (KeyboardInterrupt)."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def start(self) -> None:
        """Serve in a background thread (stopped by :meth:`stop`)."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop a server started with :meth:`start` and wait for its thread."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
