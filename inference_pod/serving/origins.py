"""Which web pages may drive the pod from a browser (``--allowed-origins``).

A browser attaches an ``Origin`` header to cross-origin calls and to every WebSocket handshake, and it lets a
page read an HTTP answer only when the answer names the page's origin in ``Access-Control-Allow-Origin``.
Without API keys (the default) any site a user visits could otherwise make a pod on their machine or network
generate frames or download models. So by default only the pod's own pages (the live page) are allowed; a
web app's origin is allowed by naming it, and every page only with ``*``. Requests without an ``Origin``
(curl, the CLI, other servers) are not a browser's and are never refused here.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable


def _normal(origin: str) -> str | None:
    """scheme://host[:port] in lower case, without a default port; None for anything else (``null``)."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _host_of(origin: str) -> str:
    """host[:port] of a normalised origin."""
    return origin.split("://", 1)[1]


def _own_hosts(host: str) -> set[str]:
    """The host[:port] forms a page of the pod addressed as ``host`` has, whichever scheme it was loaded with
    (``x:443`` is ``x`` to an https page)."""
    forms = (_normal(f"{scheme}://{host}") for scheme in ("http", "https"))
    return {_host_of(form) for form in forms if form is not None}


class OriginPolicy:
    def __init__(self, allowed: Iterable[str]):
        allowed = list(allowed)
        self.any = "*" in allowed
        self.allowed = frozenset(o for o in (_normal(a) for a in allowed if a != "*") if o is not None)

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request carrying ``Origin: origin`` to the pod addressed as ``host`` (its Host header) may
        be served. The pod's own pages compare by host and port only: behind a TLS-terminating proxy the page
        is https while the pod sees http."""
        if origin is None or self.any:
            return True
        normal = _normal(origin)
        if normal is None:
            return False  # "null" (sandboxed frames, file:// pages) and anything unparseable
        if normal in self.allowed:
            return True
        return host is not None and _host_of(normal) in _own_hosts(host)

    def cors_origin(self, origin: str | None, host: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` an answer carries, or None for none: ``*`` when any page is
        allowed, the page's own origin when it is allowed, nothing when it is not (the browser then keeps
        the answer from the page)."""
        if self.any:
            return "*"
        if origin is None or not self.allows(origin, host):
            return None
        return origin
