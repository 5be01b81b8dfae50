"""Remote image URLs without server-side request forgery: the address and allow-list rules, then the
real server against loopback HTTP servers (one serving images, one redirecting to them), refused
with the defaults and fetched with the opt-in, with the redirect bound, the byte limit and the
allow-list."""

import base64
import http.server
import io
import threading
import urllib.parse
from ipaddress import ip_address

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve import data_url, image_message

from observe_r1_serve.fetch import address_problem, host_allowed

CHAT = "/v1/chat/completions"
PARAM = "messages[0].content[0].image_url.url"
MAX_BYTES = 4096

# (address, what it is by default, what it is where private addresses are allowed)
ADDRESSES = [
    ("127.0.0.1", "a loopback address", None),
    ("127.255.0.9", "a loopback address", None),
    ("::1", "a loopback address", None),
    ("10.1.2.3", "a private address", None),
    ("172.16.0.1", "a private address", None),
    ("172.31.255.255", "a private address", None),
    ("192.168.1.1", "a private address", None),
    ("100.64.0.1", "a carrier-grade NAT address", None),
    ("169.254.1.1", "a link-local address", None),
    ("fe80::1", "a link-local address", None),
    ("fd12:3456::1", "a unique-local (private) IPv6 address", None),
    ("::ffff:127.0.0.1", "a loopback address", None),  # IPv4-mapped
    ("::ffff:10.0.0.1", "a private address", None),
    ("2002:7f00:1::", "a loopback address", None),  # 6to4 of 127.0.0.1
    ("64:ff9b::a00:1", "a private address", None),  # NAT64 of 10.0.0.1
    ("::7f00:1", "a loopback address", None),  # IPv4-compatible
    ("169.254.169.254", "a cloud metadata address", "a cloud metadata address"),
    ("::ffff:169.254.169.254", "a cloud metadata address", "a cloud metadata address"),
    ("fd00:ec2::254", "a cloud metadata address", "a cloud metadata address"),
    ("100.100.100.200", "a cloud metadata address", "a cloud metadata address"),
    ("0.0.0.0", "the unspecified address", "the unspecified address"),
    ("::", "the unspecified address", "the unspecified address"),
    ("224.0.0.1", "a multicast address", "a multicast address"),
    ("ff02::1", "a multicast address", "a multicast address"),
    ("240.0.0.1", "a reserved address", "a reserved address"),
    ("255.255.255.255", "a reserved address", "a reserved address"),
    ("192.0.2.7", "a reserved address", "a reserved address"),  # documentation
    ("2001:db8::1", "a reserved address", "a reserved address"),
    ("8.8.8.8", None, None),
    ("172.32.0.1", None, None),
    ("2606:4700::1111", None, None),
    ("64:ff9b::808:808", None, None),  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("address, default, private_allowed", ADDRESSES)
def test_address_rules(address, default, private_allowed):
    assert address_problem(ip_address(address)) == default
    assert address_problem(ip_address(address), allow_private=True) == private_allowed


def test_allowed_domains_match_names_and_wildcard_subdomains():
    allowed = ("images.example.com", "*.cdn.example.org")
    assert host_allowed("images.example.com", allowed)
    assert host_allowed("IMAGES.example.com.", allowed)
    assert host_allowed("a.b.cdn.example.org", allowed)
    assert not host_allowed("cdn.example.org", allowed)
    assert not host_allowed("evilcdn.example.org", allowed)
    assert not host_allowed("images.example.com.evil.net", allowed)
    assert host_allowed("anything.net", ())


def png(noise: bool = False) -> bytes:
    if not noise:
        return base64.b64decode(data_url().split(",", 1)[1])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Sites:
    """Two loopback HTTP servers: `images` serves /img.png, /big.png (no Content-Length: the
    client must stream it) and 404s; `redirects` answers /to?u=URL and /chain/N (N+1 redirects,
    ending at /img.png) with 302s. `hosts` records the Host header of every image request."""

    def __init__(self):
        self.hosts: list[str] = []
        sites = self
        small, big = png(), png(noise=True)
        assert len(small) < MAX_BYTES < len(big)

        class Images(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                sites.hosts.append(self.headers["Host"])
                body = {"/img.png": small, "/big.png": big}.get(self.path)
                self.send_response(200 if body else 404)
                if self.path != "/big.png":
                    self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        class Redirects(Images):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/chain/"):
                    left = int(url.path.removeprefix("/chain/"))
                    target = f"/chain/{left - 1}" if left else sites.image("127.0.0.1")
                else:
                    target = urllib.parse.parse_qs(url.query)["u"][0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Images, Redirects)]
        for s in self.servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.image_port, self.redirect_port = (s.server_address[1] for s in self.servers)

    def image(self, host: str, path: str = "/img.png") -> str:
        return f"http://{host}:{self.image_port}{path}"

    def redirect(self, host: str, to: str) -> str:
        return f"http://{host}:{self.redirect_port}/to?u={urllib.parse.quote(to, safe='')}"

    def chain(self, redirects: int) -> str:
        return f"http://127.0.0.1:{self.redirect_port}/chain/{redirects - 1}"

    def close(self):
        for s in self.servers:
            s.shutdown()


@pytest.fixture(scope="module")
def sites():
    s = Sites()
    yield s
    s.close()


@pytest.fixture(scope="module")
def fetching(tiny_model_dir, tmp_path_factory):
    """Servers with the opt-in for private addresses: `private` with a redirect bound of 2 and a
    byte limit, `listed` with an allow-list of one domain. Started together, then awaited."""
    from conftest import Server

    log_dir = tmp_path_factory.mktemp("fetching")
    opt_in = ["--image-fetch-allow-private"]
    servers = {
        "private": Server(
            tiny_model_dir,
            *opt_in,
            *("--image-fetch-max-redirects", "2", "--image-fetch-max-bytes", str(MAX_BYTES)),
            log_dir=log_dir,
        ),
        "listed": Server(
            tiny_model_dir, *opt_in, "--image-fetch-allowed-domains", "localhost", log_dir=log_dir
        ),
    }
    yield {name: s.wait_ready() for name, s in servers.items()}
    for s in servers.values():
        s.stop()


def ask(server, url: str) -> httpx.Response:
    body = {"model": "tiny", "messages": image_message(url), "max_tokens": 2}
    return httpx.post(f"{server.base_url}{CHAT}", json=body, timeout=60)


def refusal(server, url: str) -> str:
    """The message of the 400 that refuses `url` (asserting that it is one, naming the image)."""
    r = ask(server, url)
    assert r.status_code == 400, (url, r.text)
    error = r.json()["error"]
    assert error["param"] == PARAM and url in error["message"], error
    return error["message"]


def test_the_default_server_fetches_nothing_from_its_own_networks(server, sites):
    hint = "--image-fetch-allow-private"
    cases = {
        sites.image("127.0.0.1"): ("127.0.0.1 is a loopback address", hint),
        sites.image("localhost"): ("localhost resolves to", "a loopback address", hint),
        sites.redirect("127.0.0.1", sites.image("127.0.0.1")): ("127.0.0.1 is a loopback address", hint),
        sites.image("[::ffff:127.0.0.1]"): ("a loopback address", hint),
        sites.image("0.0.0.0"): ("0.0.0.0 is the unspecified address",),
        "http://169.254.169.254/latest/meta-data/": ("169.254.169.254 is a cloud metadata address",),
        "http://[fd00:ec2::254]/latest/meta-data/": ("a cloud metadata address",),
    }
    for url, parts in cases.items():
        message = refusal(server, url)
        assert all(part in message for part in parts), message
        assert (hint in message) == (hint in parts), message
    assert sites.hosts == []  # nothing was even connected to


def test_with_the_opt_in_images_are_fetched_directly_and_through_redirects(fetching, sites):
    private = fetching["private"]
    sites.hosts.clear()
    for url in (
        sites.image("127.0.0.1"),
        sites.image("localhost"),
        sites.redirect("127.0.0.1", sites.image("localhost")),
        sites.chain(2),
    ):
        r = ask(private, url)
        assert r.status_code == 200, (url, r.text)
    # The request went to the checked address, but with the URL's own Host.
    port = sites.image_port
    assert sites.hosts == [f"127.0.0.1:{port}", f"localhost:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]


def test_redirects_are_bounded_and_every_hop_is_checked(fetching, sites):
    private = fetching["private"]
    assert "more than 2 redirects" in refusal(private, sites.chain(3))
    for to, why in (
        (sites.image("0.0.0.0"), "0.0.0.0 is the unspecified address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("file:///etc/passwd", "only http and https"),
    ):
        message = refusal(private, sites.redirect("127.0.0.1", to))
        assert "(redirected to " in message and why in message, message


def test_the_body_is_streamed_against_the_byte_limit(fetching, sites):
    message = refusal(fetching["private"], sites.image("127.0.0.1", "/big.png"))
    assert f"larger than the limit of {MAX_BYTES} bytes" in message
    assert "HTTP 404" in refusal(fetching["private"], sites.image("127.0.0.1", "/missing.png"))


def test_the_allow_list_admits_only_its_domains_on_every_hop(fetching, sites):
    listed = fetching["listed"]
    assert ask(listed, sites.image("localhost")).status_code == 200
    assert "127.0.0.1 is not on this server's allowed image domains" in refusal(
        listed, sites.image("127.0.0.1")
    )
    message = refusal(listed, sites.redirect("localhost", sites.image("127.0.0.1")))
    assert "(redirected to" in message and "not on this server's allowed image domains" in message
