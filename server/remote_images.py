"""Remote image URLs, fetched by the gateway only where the operator enabled them, safely.

A gateway that fetches URLs for its clients can be pointed at what only it can reach: its own
loopback, the cluster's private network, a cloud metadata service (169.254.169.254). So, per hop:

1. the URL must be ``http(s)``, without credentials, and its host in ``remote_image_allowed_hosts``
   when that list is set;
2. the host is resolved once and every address must be public (:func:`ipaddress` ``is_global``,
   not multicast), unless it lies in ``remote_image_allowed_networks``;
3. the connection goes to the address that was checked (``Host`` and TLS SNI carry the name), so a
   second DNS answer cannot swap in another address between the check and the connection;
4. redirects are followed by hand, at most ``remote_image_max_redirects``, each one checked again;
5. the body is capped at ``remote_image_max_bytes`` (the declared length first, then while reading)
   and the whole fetch, DNS and redirects included, at ``remote_image_timeout_s``.

Every refusal is a 400 that says which rule refused the URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx

from server.errors import GatewayError
from server.validation import shorten

if TYPE_CHECKING:
    from server.config import GatewaySettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _refuse(message: str) -> GatewayError:
    return GatewayError(400, f"remote image refused: {message}", param="messages")


def host_allowed(host: str, patterns: list[str]) -> bool:
    """``host`` matches an entry of the allow-list: exactly, or ``*.example.com`` for subdomains."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def address_problem(address: IPAddress, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why ``address`` must not be fetched, or None. The operator's networks are exempt."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(address.version == net.version and address in net for net in allowed):
        return None
    for kind, flag in (("loopback", address.is_loopback), ("link-local (cloud metadata)", address.is_link_local),
                       ("unspecified", address.is_unspecified), ("reserved", address.is_reserved),
                       ("multicast", address.is_multicast), ("private", address.is_private)):
        if flag:
            return f"{address} is a {kind} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refuse(f"host {shorten(host)} could not be resolved ({exc})") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


async def checked_target(url: str, settings: GatewaySettings) -> tuple[str, str, str]:
    """``(url to connect to, Host header, TLS name)`` for one hop, after every rule of steps 1-3."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _refuse(f"{shorten(url)} is not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise _refuse("URLs with credentials (user:password@) are not fetched")
    host = parts.hostname
    if not host:
        raise _refuse(f"{shorten(url)} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _refuse(f"{shorten(url)} has an invalid port") from None
    if settings.remote_image_allowed_hosts and not host_allowed(host, settings.remote_image_allowed_hosts):
        raise _refuse(f"host {shorten(host)} is not in the gateway's allowed image hosts")
    addresses = await resolve(host, port)
    for address in addresses:
        problem = address_problem(address, settings.remote_image_allowed_networks)
        if problem is not None:
            raise _refuse(f"host {shorten(host)} resolves to {problem}, which the gateway does not fetch from")
    pinned = f"[{addresses[0]}]" if addresses[0].version == 6 else str(addresses[0])
    netloc = f"{pinned}:{port}"
    target = parts._replace(netloc=netloc).geturl()
    host_header = parts.netloc.rpartition("@")[2]
    return target, host_header, host


async def _fetch(url: str, client: httpx.AsyncClient, settings: GatewaySettings) -> bytes:
    limit = settings.remote_image_max_bytes
    for _ in range(settings.remote_image_max_redirects + 1):
        target, host_header, tls_name = await checked_target(url, settings)
        request = client.build_request("GET", target, headers={"host": host_header, "accept": "image/*"},
                                       extensions={"sni_hostname": tls_name})
        resp = await client.send(request, stream=True, follow_redirects=False)
        try:
            if resp.status_code in _REDIRECTS:
                location = resp.headers.get("location")
                if not location:
                    raise _refuse(f"HTTP {resp.status_code} redirect without a Location header")
                url = urljoin(url, location)
                continue
            if resp.status_code != 200:
                raise _refuse(f"the image URL answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _refuse(f"the image is {declared} bytes, over the limit of {limit}")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise _refuse(f"the image is over the limit of {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            await resp.aclose()
    raise _refuse(f"more than {settings.remote_image_max_redirects} redirects")


async def fetch_remote(url: str, client: httpx.AsyncClient, settings: GatewaySettings) -> bytes:
    """The bytes of a remote image, fetched under every rule of the module docstring."""
    timeout = settings.remote_image_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(url, client, settings)
    except TimeoutError:
        raise _refuse(f"fetching the image took longer than {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise _refuse(f"the image could not be fetched ({type(exc).__name__})") from None
