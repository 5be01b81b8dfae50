"""Fetching http(s) image URLs without server-side request forgery.

A URL that names (or resolves to) the server's own network would let any API user probe internal
services, so every hop, the first request and each redirect alike, is checked before it connects:
- the scheme is http or https, and the host is on the allow-list when there is one;
- the host is resolved once, every address it resolves to is checked (loopback, private, link-local,
  carrier-grade NAT and IPv6 unique-local ranges only with the opt-in; cloud metadata, multicast,
  unspecified and reserved addresses never), and the request goes to a checked address itself, with
  the URL's host in the Host header and as the TLS server name, so a DNS answer that changes between
  the check and the connection (DNS rebinding) is never used;
- redirects are followed by hand, up to a bound, and the body is streamed against a byte limit.
Proxies from the environment are not used: a proxy would resolve and connect on its own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import httpx

from observe_r1_serve.config import RequestError, ServerConfig

IPAddress = IPv4Address | IPv6Address
Refusal = Callable[[str], RequestError]  # the error for this URL, given why

# The instance-metadata endpoints of AWS (EC2 over IPv4 and IPv6, ECS tasks), GCP and Azure (all on
# 169.254.169.254) and Alibaba Cloud: refused even where private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
# The server's own networks: fetched only with `image_fetch_allow_private`.
PRIVATE_NETWORKS = tuple(
    (ip_network(net), kind)
    for net, kind in (
        ("127.0.0.0/8", "a loopback address"),
        ("::1/128", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT address"),
        ("169.254.0.0/16", "a link-local address"),
        ("fe80::/10", "a link-local address"),
        ("fc00::/7", "a unique-local (private) IPv6 address"),
        ("fec0::/10", "a site-local (private) IPv6 address"),
    )
)
_NAT64 = ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ip_network("::/96")
_REDIRECTS = (301, 302, 303, 307, 308)


def _embedded_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries and reaches (mapped, 6to4, NAT64, IPv4-compatible)."""
    if not isinstance(address, IPv6Address):
        return None
    embedded = address.ipv4_mapped or address.sixtofour
    # `int(address) > 1`: :: and ::1 are IPv6's own unspecified and loopback addresses.
    if embedded is None and (address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1)):
        embedded = IPv4Address(int(address) & 0xFFFFFFFF)
    return embedded


def address_problem(address: IPAddress, allow_private: bool = False) -> str | None:
    """Why an image must not be fetched from `address` (as "a loopback address"), or None.

    IPv6 addresses that carry an IPv4 address are judged by the IPv4 address they reach."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return address_problem(embedded, allow_private)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    for network, kind in PRIVATE_NETWORKS:
        if address in network:
            return None if allow_private else kind
    if not address.is_global or address.is_reserved:
        return "a reserved address"
    return None


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host` is on the allow-list: a name matches itself, `*.example.com` its subdomains;
    an empty list allows every host."""
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return not allowed


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


async def _resolve(url: httpx.URL, config: ServerConfig, refused: Refusal) -> list[IPAddress]:
    """The checked addresses of `url`'s host, in resolver order."""
    host = url.raw_host.decode("ascii")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, url.port or (443 if url.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except socket.gaierror as e:
        raise refused(f"its host {url.host} does not resolve ({e.strerror})") from e
    addresses = list(dict.fromkeys(ip_address(info[4][0]) for info in infos))
    for address in addresses:
        if problem := address_problem(address, config.image_fetch_allow_private):
            private = address_problem(address, allow_private=True) is None
            hint = " (start the server with --image-fetch-allow-private to fetch from private networks)"
            named = f"{url.host} is" if str(address) == url.host else f"{url.host} resolves to {address},"
            raise refused(f"refused, {named} {problem}{hint if private else ''}")
    return addresses


async def _send(client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
    """GET `url` from one of its checked addresses, the first that accepts the connection."""
    # Uncompressed, so that the byte limit bounds what arrives as well as what is kept.
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as e:
            error = e
    raise error


async def _read(response: httpx.Response, limit: int, refused: Refusal) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise refused(f"refused, the image is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch(url: str, param: str, config: ServerConfig) -> bytes:
    hop = url

    def refused(reason: str) -> RequestError:
        via = f" (redirected to {_shown(hop)})" if hop != url else ""
        return RequestError(f"image URL {_shown(url)}{via}: {reason}", param=param)

    async with httpx.AsyncClient(trust_env=False, timeout=None) as client:
        for _ in range(config.image_fetch_max_redirects + 1):
            try:
                target = httpx.URL(hop)
                host = target.host  # decodes IDNA, which can fail
            except (httpx.InvalidURL, UnicodeError) as e:
                raise refused(f"not a valid URL ({e})") from e
            if target.scheme not in ("http", "https"):
                raise refused("refused, only http and https URLs are fetched")
            if not host or not 0 < (target.port or 80) < 65536:
                raise refused("not a valid URL (it needs a host, and a port below 65536)")
            if not host_allowed(host, config.image_fetch_allowed_domains):
                raise refused(f"refused, {host} is not on this server's allowed image domains")
            addresses = await _resolve(target, config, refused)
            try:
                response = await _send(client, target, addresses)
            except httpx.HTTPError as e:
                raise refused(f"cannot fetch it ({type(e).__name__}: {e})") from e
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    # Parsed and checked at the top of the loop, as the next hop.
                    hop = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise refused(f"the server answered HTTP {response.status_code}")
                return await _read(response, config.image_fetch_max_bytes, refused)
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
                raise refused(f"reading the response failed ({type(e).__name__}: {e})") from e
            finally:
                await response.aclose()
    raise refused(f"refused, more than {config.image_fetch_max_redirects} redirects")


async def fetch_image(url: str, param: str, config: ServerConfig) -> bytes:
    """The body behind an http(s) image URL, fetched under the server's rules (module docstring);
    every refusal and failure is a `RequestError` naming the URL and why."""
    try:
        return await asyncio.wait_for(_fetch(url, param, config), config.image_fetch_timeout_s)
    except asyncio.TimeoutError as e:
        raise RequestError(
            f"image URL {_shown(url)}: fetching it took longer than {config.image_fetch_timeout_s} s",
            param=param,
        ) from e
