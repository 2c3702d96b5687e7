"""Remote image URLs (``allow_remote_images``): the gateway fetches only what the rules allow.

A real HTTP image server on 127.0.0.1 (Python's ``http.server`` in a thread) serves an image,
redirects, a slow answer, an oversized one; the gateway runs for real (uvicorn) in front of the
small real upstream of fake_upstream.py, which records the bodies that reach it (no vLLM engine is
needed to check what the gateway fetches and forwards). 127.0.0.2 is loopback too on Linux, so a
redirect from the allowed 127.0.0.1 to 127.0.0.2 checks the re-check after redirects.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import threading
import time

import httpx
import pytest

from server.config import GatewaySettings
from server.remote_images import address_problem, host_allowed
from tests.server.conftest import image_data_url, image_message, running_gateway

PNG = base64.b64decode(image_data_url(64, 48).partition(",")[2])
LOCAL = ["127.0.0.1/32"]


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """``/a.png`` an image; ``/to?url=U`` a 302 to U; ``/slow`` 3 s late; ``/big`` 2 MB; ``/loop``."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        ImageHandler.hits.append(f"{self.server.server_address[0]}{self.path}")
        path, _, query = self.path.partition("?")
        if path == "/a.png":
            self._send(200, PNG)
        elif path == "/to":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("url="))
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PNG)
        elif path == "/big":
            self._send(200, b"\0" * (2 * 1024 * 1024))
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def image_server(host: str):
    server = http.server.ThreadingHTTPServer((host, 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def images():
    with image_server("127.0.0.1") as first, image_server("127.0.0.2") as second:
        yield first, second


@contextlib.contextmanager
def gateway(tiny_llava_dir, upstream, **remote):
    settings = GatewaySettings(upstreams=[upstream.url], model_dir=str(tiny_llava_dir), allow_remote_images=True,
                               health_interval_s=0.2, **remote)
    with running_gateway(settings) as url:
        yield url


def ask(url: str, image_url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": "fake", "messages": image_message(url=image_url), "max_tokens": 2})


def assert_refused(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("remote image refused: "), error
    for word in words:
        assert word in error["message"], error["message"]


def test_loopback_refused_by_default_after_dns(tiny_llava_dir, fake_upstream, images):
    """Remote images on, no networks listed: 127.0.0.1 and ``localhost`` (resolved) are refused
    and the image server is never contacted."""
    first, _ = images
    port = first.rsplit(":", 1)[1]
    ImageHandler.hits.clear()
    with gateway(tiny_llava_dir, fake_upstream) as url:
        assert_refused(ask(url, first + "/a.png"), "127.0.0.1 is a loopback address")
        assert_refused(ask(url, f"http://localhost:{port}/a.png"), "host 'localhost' resolves to", "loopback")
        assert_refused(ask(url, f"http://[::ffff:127.0.0.1]:{port}/a.png"), "127.0.0.1 is a loopback")
    assert ImageHandler.hits == [] and fake_upstream.bodies == []


def test_listed_network_is_fetched_and_forwarded_as_data_url(tiny_llava_dir, fake_upstream, images):
    """With 127.0.0.1/32 listed the image is fetched once and the upstream receives it as a data URL."""
    first, _ = images
    ImageHandler.hits.clear()
    with gateway(tiny_llava_dir, fake_upstream, remote_image_allowed_networks=LOCAL) as url:
        r = ask(url, first + "/a.png")
        assert r.status_code == 200, r.text
    sent = fake_upstream.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
    assert sent == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert ImageHandler.hits == ["127.0.0.1/a.png"]


def test_redirects_rechecked_every_hop(tiny_llava_dir, fake_upstream, images):
    """A redirect is followed only to addresses the rules allow, each hop checked again; loops end."""
    first, second = images
    ImageHandler.hits.clear()
    with gateway(tiny_llava_dir, fake_upstream, remote_image_allowed_networks=LOCAL) as url:
        assert ask(url, f"{first}/to?url={first}/a.png").status_code == 200  # allowed -> allowed
        assert_refused(ask(url, f"{first}/to?url={second}/a.png"), "127.0.0.2 is a loopback address")
        assert_refused(ask(url, f"{first}/to?url=http://169.254.169.254/latest/meta-data/"),
                       "169.254.169.254 is a link-local (cloud metadata) address")
        assert_refused(ask(url, f"{first}/to?url=http://10.0.0.1/a.png"), "10.0.0.1 is a private address")
        assert_refused(ask(url, f"{first}/to?url=file:///etc/passwd"), "not an http(s) URL")
        assert_refused(ask(url, f"{first}/loop"), "more than 3 redirects")
    assert not any(hit.startswith("127.0.0.2") for hit in ImageHandler.hits)


def test_size_time_and_status_caps(tiny_llava_dir, fake_upstream, images):
    """Over max bytes, over the time budget, or a non-200 answer: a 400 saying which."""
    first, _ = images
    with gateway(tiny_llava_dir, fake_upstream, remote_image_allowed_networks=LOCAL,
                 remote_image_max_bytes=1024 * 1024, remote_image_timeout_s=1.0) as url:
        assert_refused(ask(url, first + "/big"), "2097152 bytes, over the limit of 1048576")
        started = time.monotonic()
        assert_refused(ask(url, first + "/slow"), "longer than 1 s")
        assert time.monotonic() - started < 2.5
        assert_refused(ask(url, first + "/missing.png"), "HTTP 404")
        assert_refused(ask(url, "http://user:pw@127.0.0.1/a.png"), "credentials")
        assert ask(url, first + "/a.png").status_code == 200  # still serving


def test_host_allow_list(tiny_llava_dir, fake_upstream, images):
    """With allowed hosts set, any other host is refused before it is resolved."""
    first, _ = images
    with gateway(tiny_llava_dir, fake_upstream, remote_image_allowed_networks=LOCAL,
                 remote_image_allowed_hosts=["images.example.com"]) as url:
        assert_refused(ask(url, first + "/a.png"), "not in the gateway's allowed image hosts")


def test_disabled_by_default(tiny_llava_dir, fake_upstream, images):
    """Without allow_remote_images, any http(s) URL is a 400 that says to send a data URL."""
    settings = GatewaySettings(upstreams=[fake_upstream.url], model_dir=str(tiny_llava_dir))
    with running_gateway(settings) as url:
        r = ask(url, images[0] + "/a.png")
    assert r.status_code == 400 and "disabled" in r.json()["error"]["message"]


@pytest.mark.parametrize(("address", "problem"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.0.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("fd00:ec2::254", "private"), ("100.64.0.1", "not a public"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("::ffff:10.0.0.1", "private"),
    ("93.184.215.14", None), ("2606:4700::1111", None),
])
def test_address_rules(address, problem):
    """Every non-public range is named; public addresses pass."""
    import ipaddress

    found = address_problem(ipaddress.ip_address(address), [])
    assert (found is None) if problem is None else (problem in found), found


def test_allowed_networks_and_host_patterns():
    """Listed networks exempt their addresses only; ``*.domain`` matches subdomains, not the apex."""
    import ipaddress

    nets = [ipaddress.ip_network("10.1.0.0/16")]
    assert address_problem(ipaddress.ip_address("10.1.2.3"), nets) is None
    assert "private" in address_problem(ipaddress.ip_address("10.2.0.1"), nets)
    assert host_allowed("a.img.example.com", ["*.img.example.com"])
    assert not host_allowed("img.example.com.evil.org", ["*.img.example.com"])
    assert host_allowed("IMG.example.com.", ["img.example.com"])
