"""``/docs``: the OpenAPI document as one plain server-side HTML page.

No script, no stylesheet or font from anywhere, so it works offline (and a strict
Content-Security-Policy says so). Descriptions are CommonMark, rendered by markdown-it-py with raw
HTML off: whatever a description holds is escaped, never markup.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from markdown_it import MarkdownIt

__all__ = ["CSP", "render_docs"]

# "commonmark" without raw HTML: text is escaped, links keep markdown-it's scheme check.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'"

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 2rem;color:#222}
h1{margin-bottom:0} h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
h3{margin:2rem 0 .25rem;font-family:ui-monospace,monospace;font-size:1.05rem}
.m{display:inline-block;min-width:4.2rem;padding:0 .4rem;border-radius:3px;color:#fff;
text-align:center}
.get{background:#2b7de9}.post{background:#2a9d55}.patch{background:#c7881d}
.delete{background:#c0392b}
table{border-collapse:collapse;margin:.5rem 0 1rem;width:100%}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}code{background:#f3f3f3;padding:0 .2rem;border-radius:3px}
.req{color:#c0392b}.muted{color:#666}nav ul{columns:2}
"""


def _md(text: str) -> str:
    """A description's Markdown as HTML blocks (paragraphs, lists, `code`)."""
    return str(_MARKDOWN.render(text.strip()))


def _inline(text: str) -> str:
    """One line of Markdown (a summary, a field's description) as inline HTML."""
    return str(_MARKDOWN.renderInline(text))


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type(s) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind is None:
        return "any"
    text = html.escape(str(kind))
    bounds = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤")):
        if key in schema:
            bounds.append(f"{sign} {schema[key]}")
    if "maxLength" in schema:
        bounds.append(f"{schema.get('minLength', 0)}–{schema['maxLength']} chars")
    return text + (f" <span class=muted>({', '.join(bounds)})</span>" if bounds else "")


def _schema_table(schema: dict[str, Any]) -> str:
    props = schema.get("properties")
    if not props:
        return f"<p>{_type(schema)}</p>"
    required = set(schema.get("required", []))
    rows = []
    for name, prop in props.items():
        mark = " <span class=req>required</span>" if name in required else ""
        desc = _inline(prop.get("description", ""))
        default = prop.get("default", None)
        if "default" in prop:
            shown = html.escape(json.dumps(default))
            desc += f" <span class=muted>Default: <code>{shown}</code></span>"
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code>{mark}</td><td>{_type(prop)}</td>"
            f"<td>{desc}</td></tr>"
        )
    return (
        "<table><tr><th>field</th><th>type</th><th>description</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    anchor = f"op-{method}-{re.sub(r'[^a-z0-9]+', '-', path.lower()).strip('-')}"
    parts = [
        f'<h3 id="{anchor}"><span class="m {method}">{method.upper()}</span> '
        f"{html.escape(path)}</h3>",
        f"<p><b>{_inline(op.get('summary', ''))}</b></p>",
        _md(op.get("description", "")),
    ]
    sec = op.get("security")
    if sec == []:
        parts.append("<p class=muted>No authentication.</p>")
    elif sec:
        names = " or ".join("+".join(req) for req in sec)
        parts.append(f"<p class=muted>Authentication: {html.escape(names)}.</p>")
    params = op.get("parameters", [])
    if params:
        param_rows = "".join(
            f"<tr><td><code>{html.escape(p['name'])}</code>"
            f"{' <span class=req>required</span>' if p.get('required') else ''}</td>"
            f"<td>{html.escape(p['in'])}</td><td>{_type(p.get('schema', {}))}</td>"
            f"<td>{_inline(p.get('description', ''))}</td></tr>"
            for p in params
        )
        parts.append(
            "<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>"
            f"{param_rows}</table>"
        )
    body = op.get("requestBody")
    if body:
        for ctype, media in body.get("content", {}).items():
            parts.append(f"<p>Request body (<code>{html.escape(ctype)}</code>):</p>")
            parts.append(_schema_table(media.get("schema", {})))
    rows = []
    for status, resp in op.get("responses", {}).items():
        content = resp.get("content", {})
        shape = []
        for ctype, media in content.items():
            schema = media.get("schema", {})
            shape.append(f"<code>{html.escape(ctype)}</code> {_type(schema)}")
            events = media.get("x-sse-events")
            if events:
                shape.append(
                    "<ul>"
                    + "".join(
                        f"<li><code>event: {html.escape(name)}</code>, data "
                        f"{_type(ev['data'])}: {_inline(ev.get('description', ''))}</li>"
                        for name, ev in events.items()
                    )
                    + "</ul>"
                )
        headers = ", ".join(f"<code>{html.escape(h)}</code>" for h in resp.get("headers", {}))
        if headers:
            shape.append(f"headers: {headers}")
        rows.append(
            f"<tr><td>{html.escape(str(status))}</td><td>{_inline(resp.get('description', ''))}"
            f"</td><td>{'<br>'.join(shape)}</td></tr>"
        )
    parts.append(
        "<table><tr><th>status</th><th>meaning</th><th>body</th></tr>" + "".join(rows) + "</table>"
    )
    return "".join(parts)


def render_docs(spec: dict[str, Any]) -> str:
    """The whole page for an OpenAPI document: routes in document order, then the schemas."""
    info = spec.get("info", {})
    title = html.escape(str(info.get("title", "API")))
    ops = []
    toc = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            ops.append(_operation(path, method, op))
            anchor = f"op-{method}-{re.sub(r'[^a-z0-9]+', '-', path.lower()).strip('-')}"
            toc.append(f'<li><a href="#{anchor}">{method.upper()} {html.escape(path)}</a></li>')
    schemas = "".join(
        f'<h3 id="schema-{html.escape(name)}">{html.escape(name)}</h3>'
        f"{_md(schema.get('description', ''))}{_schema_table(schema)}"
        for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items())
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{title} API</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title} API <span class=muted>{html.escape(str(info.get('version', '')))}</span>"
        f"</h1>{_md(str(info.get('description', '')))}"
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI '
        f"{html.escape(str(spec.get('openapi', '')))}). Interactive: "
        '<a href="/docs/swagger">/docs/swagger</a> (Swagger UI, loaded from a CDN).</p>'
        f"<nav><ul>{''.join(toc)}</ul></nav><h2>Routes</h2>{''.join(ops)}"
        f"<h2>Schemas</h2>{schemas}</body></html>"
    )
