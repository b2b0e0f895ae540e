"""Which registry URLs the operator may fetch from, and the one way it opens them.

The operator runs inside the cluster network with cluster-wide rights, so a URL a namespace user writes into
a LipSyncModel must not make it request anything else (SSRF: cloud metadata, the API server's neighbours,
its own loopback). Two checks, both from the operator's own configuration (``operator.allowedRegistries``):

- the URL: http(s) only, no credentials in it, and its host (and port, and path for URL-prefix entries)
  matched by an allow-list entry;
- the addresses it connects to: resolved by the operator itself and checked at connect time (a name that
  resolves elsewhere later changes nothing), redirects checked like the first URL, no proxy in between.

Loopback, link-local and cloud metadata addresses are reached only through an entry that names the host
exactly (``127.0.0.1:8000``, ``http://localhost:5000/models/``); ``*`` and ``*.domain`` entries never reach
them. Private ranges (10/8, 172.16/12, 192.168/16) are ordinary addresses: in-cluster registries live there.

Entries: ``host``, ``host:port``, ``*.domain`` (its subdomains), ``*`` (any host), or a URL prefix
``https://host[:port]/path/`` (scheme, host, port and path prefix must all match). Hosts without a port
match any port.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Where cloud providers serve instance credentials (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                                  "100.100.100.200"))
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
LOOPBACK_HOSTS = frozenset({"localhost", "localhost.localdomain"})


class RefusedURL(Exception):
    """The operator's configuration does not let it fetch this URL; the message says why, in one line."""


class RefusedConnection(OSError):
    """Raised at connect time: the host resolved to an address the operator does not connect to."""


def internal_kind(address: IPAddress) -> str | None:
    """'loopback', 'link-local' or 'cloud metadata' for an address the operator keeps away from; else None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback or address.is_unspecified:   # 0.0.0.0 and :: reach the local host too
        return "loopback"
    if address.is_link_local:
        return "link-local"
    return None


def _host_kind(host: str) -> str | None:
    """What a URL's host is when it needs no resolving: an address literal or a well-known name."""
    try:
        return internal_kind(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host in METADATA_HOSTS:
        return "cloud metadata"
    if host in LOOPBACK_HOSTS or host.endswith(".localhost"):
        return "loopback"
    return None


@dataclass(frozen=True)
class AllowedRegistry:
    """One allow-list entry (see the module docstring for the forms)."""

    text: str
    host: str                  # lowercase; "*" or "*.domain" for wildcards
    port: int | None = None    # None: any port
    scheme: str | None = None  # URL-prefix entries only
    path: str = "/"

    @classmethod
    def parse(cls, text: str) -> AllowedRegistry:
        entry = text.strip()
        if "://" in entry:
            parts = urllib.parse.urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
                    or parts.query or parts.fragment:
                raise ValueError(f"allowed registry {text!r}: a URL prefix is http(s)://host[:port]/path/")
            path = parts.path or "/"
            port = _port(parts, text) or (443 if parts.scheme == "https" else 80)   # a URL's port is its own
            return cls(entry, parts.hostname.lower(), port, parts.scheme,
                       path if path.endswith("/") else path + "/")
        parts = urllib.parse.urlsplit("//" + entry)
        host = (parts.hostname or "").lower()
        wildcard = host == "*" or host.startswith("*.") and "*" not in host[2:]
        if not host or parts.path or parts.username is not None or ("*" in host and not wildcard):
            raise ValueError(f"allowed registry {text!r}: expected host, host:port, *.domain, * or a URL prefix")
        return cls(entry, host, _port(parts, text))

    @property
    def exact(self) -> bool:
        """Names one host: only such an entry reaches loopback, link-local and metadata addresses."""
        return not self.host.startswith("*")

    def matches_host(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        return self.matches_host(scheme, host, port) and (path if path.endswith("/") else path + "/") \
            .startswith(self.path)


def _port(parts: urllib.parse.SplitResult, text: str) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise ValueError(f"{text!r}: invalid port") from None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _target(url: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedURL(f"{url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise RefusedURL(f"{url!r}: only http and https registries are fetched")
    if parts.username is not None or parts.password is not None:
        raise RefusedURL(f"{url!r}: credentials in a registry URL are refused (use package.pullSecret)")
    if not parts.hostname:
        raise RefusedURL(f"{url!r} names no host")
    default = 443 if parts.scheme == "https" else 80
    return _Target(parts.scheme, parts.hostname.lower().rstrip("."), port or default, parts.path or "/")


class RegistryPolicy:
    """The allow-list, and an opener that keeps to it. Built from the operator's configuration."""

    def __init__(self, entries: Iterable[str | AllowedRegistry]):
        self.entries = tuple(e if isinstance(e, AllowedRegistry) else AllowedRegistry.parse(e)
                             for e in entries if not isinstance(e, str) or e.strip())

    def describe(self) -> str:
        return ", ".join(e.text for e in self.entries) or "none"

    def _entry(self, url: str, target: _Target) -> AllowedRegistry:
        for entry in self.entries:
            if entry.matches(target.scheme, target.host, target.port, target.path):
                return entry
        if not self.entries:
            raise RefusedURL(f"{url} is refused: the operator is configured to fetch from no registry "
                             "(set operator.allowedRegistries or registry.url)")
        raise RefusedURL(f"{url} is refused: it is not under an allowed registry "
                         f"(the operator's allowed registries: {self.describe()})")

    def _reaches_internal(self, scheme: str, host: str, port: int) -> bool:
        return any(e.exact and e.matches_host(scheme, host, port) for e in self.entries)

    def check(self, url: str, *, resolve: bool = False) -> None:
        """Raises RefusedURL unless the operator may fetch ``url``. With ``resolve``, the host's current
        addresses are checked too (a name that does not resolve passes: fetching it fails on its own)."""
        target = _target(url)
        entry = self._entry(url, target)
        if entry.exact:
            return
        kind = _host_kind(target.host)
        if kind:
            raise RefusedURL(_internal_message(url, target.host, kind))
        if resolve:
            for address in _resolve(target.host, target.port):
                kind = internal_kind(address)
                if kind:
                    raise RefusedURL(_internal_message(url, f"{target.host} ({address})", kind))

    # ---------------------------------------------------------------------------------------- opening

    def open(self, url: str, *, method: str, headers: dict[str, str], timeout: float) -> Any:
        """urllib.request.urlopen for one request, kept to this policy (raises RefusedURL, or what urlopen
        raises; a refused address at connect time comes as a URLError whose reason is RefusedConnection)."""
        self.check(url)
        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPErrorProcessor(), _CheckedRedirects(self),
                        _GuardedHTTPHandler(self), _GuardedHTTPSHandler(self)):
            opener.add_handler(handler)   # no ProxyHandler: the operator connects to what it checked
        return opener.open(urllib.request.Request(url, method=method, headers=headers), timeout=timeout)

    def connect(self, scheme: str, address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                source_address: tuple[str, int] | None = None) -> socket.socket:
        """socket.create_connection, to addresses this policy allows only (all of the host's, or none)."""
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not self._reaches_internal(scheme, host.lower().rstrip("."), port):
            for *_, sockaddr in infos:
                kind = internal_kind(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
                if kind:
                    raise RefusedConnection(_internal_message(f"{scheme}://{host}:{port}/",
                                                              f"{host} ({sockaddr[0]})", kind))
        error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError(f"{host} resolved to no address")


def _internal_message(url: str, host: str, kind: str) -> str:
    return (f"{url} is refused: {host} is a {kind} address, which the operator fetches from only when "
            "operator.allowedRegistries names that host exactly")


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: RegistryPolicy, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # http.client's own seam for opening the socket (HTTPSConnection wraps what it returns in TLS,
        # still verified against the URL's host name).
        self._create_connection = functools.partial(policy.connect, "http")


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: RegistryPolicy, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(policy.connect, "https")


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: RegistryPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: RegistryPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self.policy), req,
                            context=self._context)  # type: ignore[attr-defined]


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a new URL: checked like the first; the token goes to the same host only."""

    def __init__(self, policy: RegistryPolicy):
        self.policy = policy

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        self.policy.check(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.headers.pop("Authorization", None)
            new.unredirected_hdrs.pop("Authorization", None)
        return new


def refusal(exc: BaseException) -> str | None:
    """The policy's message when ``exc`` (from ``RegistryPolicy.open``) is a refusal, else None."""
    if isinstance(exc, RefusedURL):
        return str(exc)
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib.error.URLError) and isinstance(reason, RefusedConnection):
        return str(reason)
    if isinstance(exc, RefusedConnection):
        return str(exc)
    return None
