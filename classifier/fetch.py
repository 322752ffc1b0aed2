"""Fetch an image from a user-supplied http(s) URL without opening an SSRF hole.

A URL typed by a user makes *our server* send a request, so every fetch is checked before any byte leaves
the machine, and again at every redirect:

1. Only ``http``/``https`` URLs with a host and without ``user:password@`` are accepted.
2. The host is resolved once (``socket.getaddrinfo``, or an injected ``resolver``; literal IPs are used as
   they are). Every resolved address must be a public internet address: loopback, private, link-local
   (169.254.169.254, the cloud metadata service, included), multicast, reserved, unspecified and other
   non-global addresses are refused, for IPv4 and IPv6 alike, including IPv6 forms that embed an IPv4
   address (``::ffff:127.0.0.1``, 6to4, NAT64). Decimal/octal/hex spellings such as ``2130706433`` are
   normalised by ``getaddrinfo`` first, so the check always runs on the address that will be used.
3. **IP pinning (no DNS rebinding).** The request is sent to the very address that was checked: the URL
   handed to requests has the checked IP as its host, the original ``Host`` header is sent explicitly, and
   for https the adapter's connection pools get ``server_hostname`` (SNI) and ``assert_hostname`` set to
   the real host name, so the certificate is still verified against the name, not the IP. Nothing is
   resolved a second time. The session ignores the environment (``trust_env=False``): no proxy, no .netrc.
4. Redirects are followed by hand (``allow_redirects=False``), at most ``max_redirects`` of them, and each
   new location goes through steps 1-3 again.
5. Connect and read time-outs apply to every socket operation, and an overall ``total_timeout`` bounds a
   server that drips bytes. The body is streamed; a ``Content-Length`` above ``max_bytes`` is refused
   before reading, and the download stops as soon as more than ``max_bytes`` have arrived.

Every failure raises :class:`UrlRefused` whose message is one sentence naming the URL and the reason.
``allowed_private_hosts`` exists for tests only: host *names* listed there may resolve to non-public
addresses (tests map ``cdn.test`` to 127.0.0.1 with a ``resolver``); any other host, including a redirect
to a literal ``127.0.0.1``, is still checked.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

__all__ = [
    "TooManyFetches",
    "UrlRefused",
    "check_url_form",
    "fetch_image_bytes",
    "fetch_url",
    "url_file_name",
    "url_without_credentials",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Iterable[str]]

ALLOWED_SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_SIZE = 64 * 1024
USER_AGENT = "wbc-platform image fetcher"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_SHOWN_URL = 200
_CREDENTIALS = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/?#]*@")  # scheme://user:password@


class UrlRefused(ValueError):
    """The URL was not fetched (or the download was abandoned); ``str()`` says which URL and why."""

    def __init__(self, url: str, reason: str, *, redirected_from: str | None = None) -> None:
        self.url = url
        self.reason = reason
        self.redirected_from = redirected_from
        shown = _shown(url)
        if redirected_from is not None:
            shown = f"{shown} (redirected from {_shown(redirected_from)})"
        super().__init__(f"{shown}: {reason}")


def fetch_image_bytes(
    url: str,
    *,
    max_bytes: int = 20 * 1024 * 1024,
    max_redirects: int = 3,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    total_timeout: float = 60.0,
    allowed_private_hosts: frozenset[str] = frozenset(),
    resolver: Resolver | None = None,
    ca_bundle: str | None = None,
) -> tuple[str, bytes]:
    """Download ``url`` and return ``(file name, body)``; raise :class:`UrlRefused` on anything unsafe or failed.

    The file name is the last segment of the final URL's path, made filesystem-safe ('cell.jpg'), or
    'image' when there is none. ``resolver`` maps a host name to IP strings (default: getaddrinfo).
    ``allowed_private_hosts`` (tests only) lists host names allowed to resolve to non-public addresses.
    ``ca_bundle`` is a CA file to verify https against instead of certifi's bundle.
    """
    if max_bytes <= 0 or max_redirects < 0:
        raise ValueError("max_bytes must be positive and max_redirects must not be negative")
    allowed = frozenset(_normalise_host(name) for name in allowed_private_hosts)
    deadline = time.monotonic() + total_timeout
    current = url
    for hop in range(max_redirects + 1):
        origin = url if hop else None

        def refuse(reason: str, *, at: str = current, origin: str | None = origin) -> UrlRefused:
            return UrlRefused(at, reason, redirected_from=origin)

        target = _check_url(current, allowed, resolver, refuse)
        if time.monotonic() > deadline:
            raise refuse(f"timed out: the download took longer than {total_timeout:g} seconds.")
        with _pinned_session(target) as session:
            response = _send(session, target, connect_timeout, read_timeout, ca_bundle, refuse)
            with response:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise refuse(f"the server answered {response.status_code} without a Location to redirect to.")
                    current = urljoin(current, _header_text(location))
                    continue
                if not 200 <= response.status_code < 300:
                    raise refuse(f"the server answered {response.status_code}.")
                body = _read_body(response, max_bytes, deadline, total_timeout, refuse)
        return url_file_name(current), body
    raise UrlRefused(url, f"refused: more than {max_redirects} redirect{'s' if max_redirects != 1 else ''}.")


# --- checking a URL ------------------------------------------------------------------------------------------


class _Target:
    """A checked URL, ready to send: the pinned IP and what the server must still see (Host, SNI name)."""

    def __init__(self, pinned_url: str, host_header: str, tls_hostname: str) -> None:
        self.pinned_url = pinned_url
        self.host_header = host_header
        self.tls_hostname = tls_hostname


def check_url_form(url: str, *, allowed_private_hosts: frozenset[str] = frozenset()) -> None:
    """Refuse (:class:`UrlRefused`) a URL that can never be fetched, by its form alone: no DNS, no network.

    Scheme, credentials, host and port are checked, and a literal IP address must be public; host names are
    resolved (and checked again) only when the URL is fetched.
    """

    def refuse(reason: str) -> UrlRefused:
        return UrlRefused(url, reason)

    _scheme, host, _port, _path, _query = _parse(url, refuse)
    literal = _literal_ip(host)
    if literal is not None:
        _check_addresses(host, [literal], frozenset(_normalise_host(n) for n in allowed_private_hosts), refuse)


def _parse(url: str, refuse: Callable[..., UrlRefused]) -> tuple[str, str, int, str, str]:
    """(scheme, normalised host, port, path, query) of an acceptable URL, checked by its form."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise refuse("refused: the URL contains spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse("refused: the URL is not valid.") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise refuse("refused: only http and https URLs are allowed.")
    if parts.username is not None or parts.password is not None:
        raise refuse("refused: URLs with a user name or password are not allowed.")
    if not parts.hostname:
        raise refuse("refused: the URL has no host name.")
    try:
        host = _normalise_host(parts.hostname)
    except UnicodeError:
        raise refuse("refused: the host name is not valid.") from None
    if not host:
        raise refuse("refused: the URL has no host name.")
    port = port if port is not None else DEFAULT_PORTS[scheme]
    if port == 0:
        raise refuse("refused: the port is not valid.")
    return scheme, host, port, parts.path, parts.query


def _check_url(
    url: str, allowed: frozenset[str], resolver: Resolver | None, refuse: Callable[..., UrlRefused]
) -> _Target:
    scheme, host, port, path, query = _parse(url, refuse)
    addresses = _resolve(host, resolver, refuse)
    _check_addresses(host, addresses, allowed, refuse)
    pinned = addresses[0]
    pinned_host = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    pinned_url = urlunsplit((scheme, f"{pinned_host}:{port}", path or "/", query, ""))
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    return _Target(pinned_url, host_header, host)


def _check_addresses(
    host: str, addresses: list[IPAddress], allowed: frozenset[str], refuse: Callable[..., UrlRefused]
) -> None:
    """Every address must be public, unless the host name is one of the ``allowed`` private hosts."""
    if host in allowed:
        return
    for address in addresses:
        kind = _not_public(address)
        if kind is not None:
            if _literal_ip(host) == address:
                raise refuse(f"refused: the address {address} is {kind}, not a public internet address.")
            raise refuse(
                f"refused: the host {host} resolves to {address}, which is {kind}, not a public internet address."
            )


def _normalise_host(host: str) -> str:
    """Lower-case ASCII (IDNA) form without a trailing dot; IP literals are returned as they are."""
    host = host.strip().lower().rstrip(".")
    if host.isascii():
        return host
    return host.encode("idna").decode("ascii")


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _default_resolver(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _resolve(host: str, resolver: Resolver | None, refuse: Callable[..., UrlRefused]) -> list[IPAddress]:
    literal = _literal_ip(host)
    if literal is not None:
        return [literal]
    try:
        texts = list((resolver or _default_resolver)(host))
    except (OSError, UnicodeError):
        texts = []
    addresses: list[IPAddress] = []
    for text in texts:
        address = _literal_ip(str(text))
        if address is None:
            raise refuse(f"refused: the host {host} resolves to {text!r}, which is not an IP address.")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise refuse(f"could not resolve the host name {host}.")
    return addresses


def _not_public(address: IPAddress) -> str | None:
    """Why ``address`` is not a public internet address (a short phrase), or None when it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            kind = _not_public(embedded)
            if kind is not None:
                return f"{kind} (it embeds the IPv4 address {embedded})"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (where cloud metadata services live)"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


# --- sending and reading -------------------------------------------------------------------------------------


class _PinnedAdapter(HTTPAdapter):
    """Connection pools whose TLS layer uses ``hostname`` for SNI and certificate checks, whatever IP they dial."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs) -> None:
        pool_kwargs["server_hostname"] = self._hostname
        pool_kwargs["assert_hostname"] = self._hostname
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def _pinned_session(target: _Target) -> requests.Session:
    """A fresh session per hop: no cookies carried over, nothing taken from the environment (proxies, .netrc)."""
    session = requests.Session()
    session.trust_env = False
    adapter = _PinnedAdapter(target.tls_hostname)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _send(
    session: requests.Session,
    target: _Target,
    connect_timeout: float,
    read_timeout: float,
    ca_bundle: str | None,
    refuse: Callable[..., UrlRefused],
) -> requests.Response:
    headers = {
        "Host": target.host_header,
        "User-Agent": USER_AGENT,
        "Accept": "image/*, */*;q=0.5",
        "Accept-Encoding": "identity",
    }
    try:
        return session.get(
            target.pinned_url,
            headers=headers,
            timeout=(connect_timeout, read_timeout),
            allow_redirects=False,
            stream=True,
            verify=ca_bundle or True,
        )
    except requests.exceptions.SSLError:
        raise refuse("the secure (TLS) connection failed: the server's certificate could not be verified.") from None
    except requests.exceptions.ConnectTimeout:
        raise refuse("timed out while connecting.") from None
    except requests.exceptions.ReadTimeout:
        raise refuse("timed out while reading.") from None
    except requests.exceptions.ConnectionError:
        raise refuse("could not connect to the server.") from None
    except requests.exceptions.RequestException:
        raise refuse("the server sent an invalid response.") from None


def _read_body(
    response: requests.Response,
    max_bytes: int,
    deadline: float,
    total_timeout: float,
    refuse: Callable[..., UrlRefused],
) -> bytes:
    too_large = f"refused: the image is larger than {_human_size(max_bytes)}."
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise refuse(too_large)
    body = bytearray()
    raw = response.raw
    try:
        while True:
            # read1 returns what has arrived (up to CHUNK_SIZE), so the deadline is checked at least once per
            # read_timeout even against a server that drips one byte at a time.
            chunk = raw.read1(CHUNK_SIZE, decode_content=True)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise refuse(too_large)
            if time.monotonic() > deadline:
                raise refuse(f"timed out: the download took longer than {total_timeout:g} seconds.")
    except urllib3.exceptions.ReadTimeoutError:
        raise refuse("timed out while reading.") from None
    except (urllib3.exceptions.HTTPError, OSError):
        raise refuse("the connection broke while downloading the image.") from None
    if not body:
        raise refuse("the server sent an empty body, not an image.")
    return bytes(body)


# --- small helpers ---------------------------------------------------------------------------------------------


def _header_text(value: str) -> str:
    """http.client decodes headers as latin-1; servers usually mean UTF-8 (as requests assumes for Location)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def url_file_name(url: str) -> str:
    """The last segment of the URL's path, made filesystem-safe ('cell.jpg'), or 'image' when there is none."""
    try:
        path = urlsplit(url).path
    except ValueError:
        path = ""
    name = posixpath.basename(unquote(path))
    name = _UNSAFE_FILENAME_CHARS.sub("_", name).lstrip("._")[-100:]
    return name or "image"


def url_without_credentials(url: str) -> str:
    """The URL without any ``user:password@`` (what may be stored, shown and echoed back)."""
    return _CREDENTIALS.sub(r"\1", url, count=1)  # a regex, not urlsplit: URLs urlsplit refuses are cleaned too


def _human_size(n: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _shown(url: str) -> str:
    """The URL as it may appear in a message: no user or password, no control characters, not absurdly long."""
    text = url_without_credentials("".join(ch if ch.isprintable() else "?" for ch in url.strip()))
    if len(text) > _MAX_SHOWN_URL:
        text = text[: _MAX_SHOWN_URL - 1] + "…"
    return text or "(empty URL)"


class TooManyFetches(UrlRefused):
    """The user already has as many downloads running as allowed (``WBC_URL_FETCHES_PER_USER``)."""


_slots: dict[object, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextmanager
def _fetch_slot(url: str, owner: object, limit: int):
    """Hold one of ``owner``'s ``limit`` download slots (in this process) or refuse at once."""
    with _slots_lock:
        slot = _slots.setdefault(owner, threading.BoundedSemaphore(limit))
    if not slot.acquire(blocking=False):
        raise TooManyFetches(
            url,
            f"refused: you already have {limit} image download{'s' if limit != 1 else ''} running; "
            "try again when one has finished.",
        )
    try:
        yield
    finally:
        slot.release()


def fetch_url(url: str, *, user_id: object = None, total_timeout: float | None = None) -> tuple[str, bytes]:
    """The safe fetcher with this installation's limits (Django settings).

    The whole download must finish within ``WBC_URL_FETCH_SECONDS`` (or ``total_timeout``). With a ``user_id``
    (a request on behalf of a user) at most ``WBC_URL_FETCHES_PER_USER`` downloads of that user run at once in
    this process; one more is refused with :class:`TooManyFetches` without waiting.
    """
    from django.conf import settings

    def fetch() -> tuple[str, bytes]:
        return fetch_image_bytes(
            url,
            max_bytes=settings.WBC_MAX_IMAGE_BYTES,
            total_timeout=settings.WBC_URL_FETCH_SECONDS if total_timeout is None else total_timeout,
            allowed_private_hosts=frozenset(settings.WBC_URL_ALLOWED_PRIVATE_HOSTS),
        )

    if user_id is None:
        return fetch()
    with _fetch_slot(url, user_id, settings.WBC_URL_FETCHES_PER_USER):
        return fetch()
