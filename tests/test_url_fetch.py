"""classifier.fetch against a real local HTTP(S) server: the success path and every refusal.

Nothing here needs the database, and nothing sends traffic beyond 127.0.0.1: an autouse guard wraps urllib3's
``create_connection`` and fails the test on any other destination, and records what was dialled so refusals
can prove they happened before connecting. A "public" host name (``cdn.test``) is simulated with an injected
resolver plus ``allowed_private_hosts``; redirects to literal private addresses are still checked.
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3.util.connection
from PIL import Image

from classifier.fetch import UrlRefused, fetch_image_bytes
from tests.conftest import unavailable

HUGE = 5 * 1024 * 1024
SMALL_CAP = 64 * 1024


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 120, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        self.server.hits.append(path)
        name = path.strip("/").replace("-", "_").replace(".", "_") or "root"
        route = getattr(self, f"route_{name}", None)
        try:
            if route is None:
                self._send(404, b"not found", "text/plain")
            else:
                route()
        except OSError:  # the client gave up (refusals close the connection early): expected here
            self.close_connection = True

    def _send(self, status: int, body: bytes, content_type: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", "text/plain", Location=location)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def route_root(self):
        self._send(200, PNG)

    def route_img_png(self):
        self._send(200, PNG)

    def route_redirect_relative(self):
        self._redirect("/img.png", 301)

    def route_redirect_loopback(self):
        self._redirect(f"http://127.0.0.1:{self.port}/img.png")

    def route_redirect_metadata(self):
        self._redirect("http://169.254.169.254/latest/meta-data/")

    def route_redirect_ftp(self):
        self._redirect(f"ftp://127.0.0.1:{self.port}/img.png")

    def route_redirect_nowhere(self):
        self._send(302, b"", "text/plain")

    def route_loop(self):
        self._redirect("/loop", 307)

    def _stream(self, total: int) -> None:
        block = b"\0" * 65536
        for _ in range(total // len(block)):
            self.wfile.write(block)

    def route_huge_length(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(HUGE))
        self.end_headers()
        self._stream(HUGE)

    def route_huge_nolength(self):  # body delimited by closing the connection
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._stream(HUGE)

    def route_huge_chunked(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\0" * 65536
        for _ in range(HUGE // len(block)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
        self.wfile.write(b"0\r\n\r\n")

    def route_giant_declared(self):  # claims 21 MB, sends a little, then hangs up
        self.send_response(200)
        self.send_header("Content-Length", str(21 * 1024 * 1024))
        self.end_headers()
        self.wfile.write(PNG)
        self.close_connection = True

    def route_slow_headers(self):
        time.sleep(3.0)
        self._send(200, PNG)

    def route_slow_body(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        time.sleep(1.0)
        self.wfile.write(b"x" * 990)

    def route_drip(self):
        self.send_response(200)
        self.send_header("Content-Length", "200")
        self.end_headers()
        for _ in range(200):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.02)

    def route_empty(self):
        self._send(200, b"")

    def route_error(self):
        self._send(500, b"boom", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for the deliberately slow handlers at shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: list[str] = []

    def handle_error(self, request, client_address):  # failed TLS handshakes etc. are part of the tests
        pass


def _serve(server: _Server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def http_server():
    yield from _serve(_Server())


@pytest.fixture
def server(http_server):
    http_server.hits.clear()
    return http_server


@pytest.fixture(autouse=True)
def dialled(monkeypatch) -> list[tuple[str, int]]:
    """Every address the fetcher connects to; anything other than loopback fails the test on the spot."""
    calls: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def guarded(address, *args, **kwargs):
        host, port = address[0], address[1]
        calls.append((host, port))
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: the fetcher must only ever dial the IP it checked
            loopback = False
        if not loopback:
            pytest.fail(f"the fetcher tried to connect to {host}:{port}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", guarded)
    return calls


class FakeDns:
    """Test resolver: a fixed table; records every lookup; unknown names do not resolve (no real DNS)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


def via_cdn(**kwargs):
    """Options that make 'cdn.test' a host that resolves to 127.0.0.1 and is allowed to."""
    dns = FakeDns({"cdn.test": ["127.0.0.1"]})
    return {"resolver": dns, "allowed_private_hosts": frozenset({"cdn.test"}), **kwargs}


def cdn(server, path: str) -> str:
    return f"http://cdn.test:{server.server_address[1]}{path}"


# --- success ---------------------------------------------------------------------------------------------------


def test_fetches_png_from_the_checked_ip_with_one_lookup(server, dialled):
    options = via_cdn()
    name, body = fetch_image_bytes(cdn(server, "/img.png?size=big#frag"), **options)
    assert (name, body) == ("img.png", PNG)
    assert server.hits == ["/img.png"]
    # 'cdn.test' exists nowhere but in the fake resolver, so the request went to the pinned, checked IP,
    # and the name was resolved exactly once (no second lookup a rebinding DNS server could answer).
    assert options["resolver"].lookups == ["cdn.test"]
    assert dialled == [("127.0.0.1", server.server_address[1])]
    assert Image.open(io.BytesIO(body)).size == (8, 6)


def test_follows_a_relative_redirect_and_names_the_file_after_the_final_url(server):
    name, body = fetch_image_bytes(cdn(server, "/redirect-relative"), **via_cdn())
    assert (name, body) == ("img.png", PNG)
    assert server.hits == ["/redirect-relative", "/img.png"]


def test_file_name_defaults_to_image_when_the_path_has_none(server):
    assert fetch_image_bytes(cdn(server, "/"), **via_cdn()) == ("image", PNG)


# --- refused before any connection -----------------------------------------------------------------------------


def test_direct_loopback_url_is_refused_and_nothing_is_downloaded(server, dialled):
    url = f"http://127.0.0.1:{server.server_address[1]}/img.png"
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url)
    assert str(caught.value) == f"{url}: refused: the address 127.0.0.1 is loopback, not a public internet address."
    assert server.hits == []
    assert dialled == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.1/x.png", "the address 10.0.0.1 is private"),
        ("http://192.168.1.1/x.png", "the address 192.168.1.1 is private"),
        ("http://172.16.0.1/x.png", "the address 172.16.0.1 is private"),
        ("http://169.254.169.254/latest/meta-data/", "the address 169.254.169.254 is link-local"),
        ("http://100.64.0.1/x.png", "the address 100.64.0.1 is not globally routable"),
        ("http://0.0.0.0/x.png", "the address 0.0.0.0 is unspecified"),
        ("http://224.0.0.1/x.png", "the address 224.0.0.1 is multicast"),
        ("http://255.255.255.255/x.png", "the address 255.255.255.255 is reserved"),
        ("http://[::1]/x.png", "the address ::1 is loopback"),
        ("http://[::]/x.png", "the address :: is unspecified"),
        ("http://[fe80::1]/x.png", "the address fe80::1 is link-local"),
        ("http://[fd00::1]/x.png", "the address fd00::1 is private"),
        ("http://[::ffff:127.0.0.1]/x.png", "is loopback (it embeds the IPv4 address 127.0.0.1)"),
        ("http://[::ffff:a9fe:a9fe]/x.png", "is link-local (where cloud metadata services live) (it embeds the IPv4"),
        ("http://[64:ff9b::a00:1]/x.png", "is private (it embeds the IPv4 address 10.0.0.1)"),
        ("http://2130706433/x.png", "the host 2130706433 resolves to 127.0.0.1, which is loopback"),
        ("http://0177.0.0.1/x.png", "the host 0177.0.0.1 resolves to 127.0.0.1, which is loopback"),
        ("http://0x7f000001/x.png", "the host 0x7f000001 resolves to 127.0.0.1, which is loopback"),
        ("http://127.1:8000/x.png", "the host 127.1 resolves to 127.0.0.1, which is loopback"),
    ],
)
def test_non_public_addresses_are_refused_before_connecting(url, expected, dialled):
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url)
    message = str(caught.value)
    assert message.startswith(f"{url}: refused: ")
    assert expected in message
    assert message.endswith("not a public internet address.")
    assert dialled == []


def test_a_name_is_refused_if_any_of_its_addresses_is_not_public(dialled):
    dns = FakeDns({"mixed.example": ["93.184.216.34", "10.1.2.3"], "inner.example": ["127.0.0.1"]})
    with pytest.raises(UrlRefused, match=r"the host mixed\.example resolves to 10\.1\.2\.3, which is private"):
        fetch_image_bytes("https://mixed.example/cell.jpg", resolver=dns)
    with pytest.raises(UrlRefused, match=r"the host inner\.example resolves to 127\.0\.0\.1, which is loopback"):
        fetch_image_bytes("https://INNER.example./cell.jpg", resolver=dns)
    assert dns.lookups == ["mixed.example", "inner.example"]
    assert dialled == []


def test_allowlist_is_by_host_name_not_by_address(server, dialled):
    # cdn.test may resolve to 127.0.0.1, but that does not let the literal 127.0.0.1 (or another name) through.
    with pytest.raises(UrlRefused, match=r"the address 127\.0\.0\.1 is loopback"):
        fetch_image_bytes(f"http://127.0.0.1:{server.server_address[1]}/img.png", **via_cdn())
    with pytest.raises(UrlRefused, match=r"could not resolve the host name other\.test\.$"):
        fetch_image_bytes(f"http://other.test:{server.server_address[1]}/img.png", **via_cdn())
    assert server.hits == []
    assert dialled == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/cell.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "example.com/cell.png",
        "//example.com/cell.png",
        "",
    ],
)
def test_only_http_and_https_are_allowed(url, dialled):
    with pytest.raises(UrlRefused, match=r": refused: only http and https URLs are allowed\.$"):
        fetch_image_bytes(url)
    assert dialled == []


def test_credentials_in_the_url_are_refused_and_not_echoed(dialled):
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes("https://alice:s3cret@example.com/cell.png")
    assert str(caught.value) == (
        "https://example.com/cell.png: refused: URLs with a user name or password are not allowed."
    )
    with pytest.raises(UrlRefused, match="user name or password") as caught:
        fetch_image_bytes("http://alice@example.com/cell.png")
    assert "alice" not in str(caught.value)
    assert dialled == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http:///cell.png", "refused: the URL has no host name."),
        ("https://:443/cell.png", "refused: the URL has no host name."),
        ("http://example.com:99999/cell.png", "refused: the URL is not valid."),
        ("http://exam ple.com/cell.png", "refused: the URL contains spaces or control characters."),
        ("http://example.com/\r\nX-Injected: 1", "refused: the URL contains spaces or control characters."),
    ],
)
def test_malformed_urls_are_refused(url, reason, dialled):
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url)
    assert str(caught.value).endswith(reason)
    assert dialled == []


def test_refusal_is_a_value_error_carrying_url_and_reason():
    with pytest.raises(ValueError) as caught:
        fetch_image_bytes("ftp://example.com/a.png")
    assert isinstance(caught.value, UrlRefused)
    assert caught.value.url == "ftp://example.com/a.png"
    assert caught.value.reason == "refused: only http and https URLs are allowed."


# --- redirects: every hop is checked again ---------------------------------------------------------------------


def test_redirect_to_loopback_literal_is_refused(server, dialled):
    url = cdn(server, "/redirect-loopback")
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url, **via_cdn())
    port = server.server_address[1]
    assert str(caught.value) == (
        f"http://127.0.0.1:{port}/img.png (redirected from {url}): "
        "refused: the address 127.0.0.1 is loopback, not a public internet address."
    )
    assert server.hits == ["/redirect-loopback"]  # the image itself was never requested
    assert dialled == [("127.0.0.1", port)]


def test_redirect_to_cloud_metadata_is_refused_before_connecting(server, dialled):
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(cdn(server, "/redirect-metadata"), **via_cdn())
    message = str(caught.value)
    assert message.startswith("http://169.254.169.254/latest/meta-data/ (redirected from http://cdn.test:")
    assert "refused: the address 169.254.169.254 is link-local" in message
    assert server.hits == ["/redirect-metadata"]
    assert dialled == [("127.0.0.1", server.server_address[1])]  # only the first hop connected


def test_redirect_to_another_scheme_is_refused(server):
    with pytest.raises(UrlRefused, match=r"ftp://127\.0\.0\.1:\d+/img\.png \(redirected from .*only http and https"):
        fetch_image_bytes(cdn(server, "/redirect-ftp"), **via_cdn())


def test_redirect_loop_stops_after_max_redirects(server):
    url = cdn(server, "/loop")
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url, **via_cdn())
    assert str(caught.value) == f"{url}: refused: more than 3 redirects."
    assert server.hits == ["/loop"] * 4  # the original request plus 3 redirects, then stop


def test_max_redirects_zero_refuses_any_redirect(server):
    with pytest.raises(UrlRefused, match=r"refused: more than 0 redirects\.$"):
        fetch_image_bytes(cdn(server, "/redirect-relative"), max_redirects=0, **via_cdn())
    assert server.hits == ["/redirect-relative"]


def test_redirect_without_location_is_refused(server):
    with pytest.raises(UrlRefused, match=r"the server answered 302 without a Location to redirect to\.$"):
        fetch_image_bytes(cdn(server, "/redirect-nowhere"), **via_cdn())


# --- size cap ----------------------------------------------------------------------------------------------------


def test_declared_content_length_over_the_cap_is_refused_before_reading(server):
    url = cdn(server, "/huge-length")
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url, max_bytes=SMALL_CAP, **via_cdn())
    assert str(caught.value) == f"{url}: refused: the image is larger than 64 KB."


@pytest.mark.parametrize("path", ["/huge-nolength", "/huge-chunked"])
def test_body_over_the_cap_is_refused_while_streaming(server, path, monkeypatch):
    import urllib3.response

    read = urllib3.response.HTTPResponse.read1
    received = []

    def counting_read1(self, *args, **kwargs):
        data = read(self, *args, **kwargs)
        received.append(len(data))
        return data

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read1", counting_read1)
    with pytest.raises(UrlRefused, match=r"refused: the image is larger than 64 KB\.$"):
        fetch_image_bytes(cdn(server, path), max_bytes=SMALL_CAP, **via_cdn())
    assert SMALL_CAP < sum(received) <= SMALL_CAP + 64 * 1024  # stopped right after crossing the cap


def test_default_cap_is_20_mb_in_the_message(server):
    with pytest.raises(UrlRefused, match=r"larger than 20 MB\.$"):
        fetch_image_bytes(cdn(server, "/giant-declared"), **via_cdn())


def test_body_exactly_at_the_cap_is_accepted(server):
    assert fetch_image_bytes(cdn(server, "/img.png"), max_bytes=len(PNG), **via_cdn())[1] == PNG


# --- time-outs, statuses, broken bodies ---------------------------------------------------------------------------


def test_slow_server_times_out_while_reading(server):
    started = time.monotonic()
    with pytest.raises(UrlRefused, match=r"/slow-headers: timed out while reading\.$"):
        fetch_image_bytes(cdn(server, "/slow-headers"), read_timeout=0.2, **via_cdn())
    assert time.monotonic() - started < 2.0  # the headers come after 3 s


def test_stalled_body_times_out_while_reading(server):
    with pytest.raises(UrlRefused, match=r"timed out while reading\.$"):
        fetch_image_bytes(cdn(server, "/slow-body"), read_timeout=0.2, **via_cdn())


def test_dripping_server_hits_the_total_deadline(server):
    started = time.monotonic()
    with pytest.raises(UrlRefused, match=r"timed out: the download took longer than 0\.3 seconds\.$"):
        fetch_image_bytes(cdn(server, "/drip"), total_timeout=0.3, read_timeout=1.0, **via_cdn())
    assert time.monotonic() - started < 3.0  # the drip takes 4 s


def test_connection_refused_is_reported(dialled):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UrlRefused, match=r"could not connect to the server\.$"):
        fetch_image_bytes(f"http://cdn.test:{port}/img.png", connect_timeout=0.5, **via_cdn())
    assert dialled == [("127.0.0.1", port)]


@pytest.mark.parametrize(("path", "status"), [("/missing.png", 404), ("/error", 500)])
def test_non_2xx_status_is_refused_with_the_status(server, path, status):
    url = cdn(server, path)
    with pytest.raises(UrlRefused) as caught:
        fetch_image_bytes(url, **via_cdn())
    assert str(caught.value) == f"{url}: the server answered {status}."


def test_empty_body_is_refused(server):
    with pytest.raises(UrlRefused, match=r"the server sent an empty body, not an image\.$"):
        fetch_image_bytes(cdn(server, "/empty"), **via_cdn())


# --- https: pinned IP, but SNI and certificate checked against the host name -------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("the openssl command is needed to make a throw-away certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    args = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=cdn.test"
    args += " -addext subjectAltName=DNS:cdn.test"
    subprocess.run(
        [openssl, *args.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server = _Server()
    server.sni_names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server.sni_names.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.cert_path = str(cert)
    yield from _serve(server)


def test_https_connects_to_the_pinned_ip_but_verifies_the_host_name(tls_server, dialled):
    tls_server.hits.clear()
    port = tls_server.server_address[1]
    name, body = fetch_image_bytes(
        f"https://cdn.test:{port}/img.png", ca_bundle=tls_server.cert_path, **via_cdn(read_timeout=2.0)
    )
    assert (name, body) == ("img.png", PNG)
    assert tls_server.sni_names[-1] == "cdn.test"  # SNI carries the name, not 127.0.0.1
    assert dialled == [("127.0.0.1", port)]


def test_https_certificate_for_another_name_is_refused(tls_server):
    port = tls_server.server_address[1]
    dns = FakeDns({"other.test": ["127.0.0.1"]})
    with pytest.raises(UrlRefused, match="certificate could not be verified"):
        fetch_image_bytes(
            f"https://other.test:{port}/img.png",
            resolver=dns,
            allowed_private_hosts=frozenset({"other.test"}),
            ca_bundle=tls_server.cert_path,
        )
    with pytest.raises(UrlRefused, match="certificate could not be verified"):  # not in the default CA bundle
        fetch_image_bytes(f"https://cdn.test:{port}/img.png", **via_cdn())
