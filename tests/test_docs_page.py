"""The /docs page's rendering of descriptions (CommonMark by markdown-it-py, raw HTML off)."""

from __future__ import annotations

from typing import Any

from server.docs_page import render_docs


def _page(description: str, summary: str = "Do it.") -> str:
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1", "description": description},
        "paths": {"/x": {"get": {"summary": summary, "description": "", "responses": {}}}},
    }
    return render_docs(spec)


def test_markup_in_a_description_is_shown_as_text_never_run() -> None:
    page = _page(
        'Hi <script>alert(1)</script> <img src=x onerror="alert(2)"> [a](javascript:alert(3))',
        summary="<b>bold</b> `<i>`",
    )
    assert "<script" not in page and "<img" not in page and 'href="javascript:' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; <code>&lt;i&gt;</code>" in page


def test_a_list_right_after_a_line_renders_as_a_list() -> None:
    # How the SSE descriptions list their events: a line, then one item per event.
    page = _page("Events:\n- `progress`: the state\n- `timeout`: the end\n\nMore.")
    assert (
        "<p>Events:</p>\n<ul>\n<li><code>progress</code>: the state</li>\n"
        "<li><code>timeout</code>: the end</li>\n</ul>\n<p>More.</p>" in page
    )
