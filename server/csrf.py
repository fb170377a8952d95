"""Cross-site request forgery defence for cookie authentication (``TASKSTREAM_JWT_COOKIE``).

A browser attaches a cookie to any request to its site, whoever's page starts it, so a cookie
alone does not show that the user meant the request. A bearer token in the Authorization header
(or a ticket or token in the URL) must be put there by the caller, so only cookie-authenticated
requests are checked, and only state-changing ones (anything but GET, HEAD and OPTIONS).

Such a request must prove where it comes from:

1. ``Origin`` (sent by every current browser on every POST, PATCH, PUT and DELETE) must be the
   server's own origin or one of ``TASKSTREAM_CORS_ORIGINS``. ``null`` (sandboxed frames,
   ``file:`` pages, some redirects) and two ``Origin`` headers are refused.
2. Without ``Origin``, ``Sec-Fetch-Site`` must be ``same-origin``. ``same-site`` is refused: a
   sibling subdomain may serve someone else's pages, and the header does not say which one.
3. With neither header the request is refused. Browsers without either are over five years old,
   and a client that is not a browser is not a CSRF victim but has no reason to use the cookie:
   it can send ``Authorization: Bearer`` and skip this check entirely. Failing closed costs
   such a client one header; failing open would make the defence depend on the browser.

Then the body must be declared JSON (``Content-Type: application/json``, also on a POST without
a body): an HTML form cannot send that type, and ``fetch()`` from another origin cannot send it
without a CORS preflight, which only ``TASKSTREAM_CORS_ORIGINS`` pass.

The server's own origin is ``scheme://Host`` as this process sees it, and also ``https://Host``:
behind a proxy that ends TLS the process sees ``http``, while the browser's origin is ``https``.
"""

from __future__ import annotations

from collections.abc import Collection

from quart import request

__all__ = ["SAFE_METHODS", "CrossSiteRequestRefused", "check_cookie_request"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CrossSiteRequestRefused(Exception):
    """A cookie-authenticated request did not prove it is same-site (403) or is not JSON (415)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def _own_origins() -> set[str]:
    # request.host is "" when the Host header has characters a host cannot have.
    host = request.host.lower()
    if not host:
        return set()
    return {f"{request.scheme}://{host}", f"https://{host}"}


def _refuse(detail: str) -> CrossSiteRequestRefused:
    return CrossSiteRequestRefused(
        403,
        "Cross-site request refused",
        f"{detail}; a cookie-authenticated request that changes something must come from this "
        "site or an allowed origin (or send Authorization: Bearer instead of the cookie)",
    )


def check_cookie_request(allowed_origins: Collection[str]) -> None:
    """Raise :class:`CrossSiteRequestRefused` unless this cookie-authenticated request may act.

    A safe method (GET, HEAD, OPTIONS) always may.
    """
    if request.method in SAFE_METHODS:
        return
    origins = request.headers.getlist("Origin")
    if len(origins) > 1:
        raise _refuse("more than one Origin header")
    if origins:
        origin = origins[0].strip().lower()
        allowed = {o.lower() for o in allowed_origins}
        if origin not in _own_origins() and origin not in allowed:
            raise _refuse("the Origin is not this server or an allowed origin")
    else:
        site = request.headers.get("Sec-Fetch-Site")
        if site is None:
            raise _refuse("neither Origin nor Sec-Fetch-Site shows where the request comes from")
        if site.strip().lower() != "same-origin":
            raise _refuse("Sec-Fetch-Site is not same-origin")
    # is_json: application/json or application/*+json; neither is a type a form can send.
    if not request.is_json:
        raise CrossSiteRequestRefused(
            415,
            "Unsupported media type",
            "a cookie-authenticated request that changes something must send "
            "Content-Type: application/json, even without a body",
        )
