"""Upload limits of the service: ``?top=``, the bytes in flight, uploads per client, and
sizing from memory.

One request's decode is bounded by ``--max-pixels`` (the pixels decoded, see
:func:`fruitdask.features.featurize.open_image`) and the strip conversions of
:func:`fruitdask.features.featurize.decode_image`; ``--decode-threads`` bounds how many run
at once (``--decode-timeout`` how long a request waits for one); :class:`ByteBudget` bounds
the request bodies held across all requests, counted as they arrive; :class:`ClientLimiter`
bounds the uploads of one client (:func:`client_key`: its address, or the first hop of
``X-Forwarded-For`` that ``--trusted-proxies`` does not name); and :func:`plan_for_memory`
sizes the budget and ``--max-connections`` from the container's memory limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fruitdask.errors import ConfigError

#: ``?top=``: one to four ASCII digits (``str.isdigit`` also takes ``²`` and ``٣``).
TOP_PATTERN = re.compile(r"[0-9]{1,4}")

#: Memory the model needs besides requests: TensorFlow, VGG16's weights and the activations
#: of a ``--max-batch`` 32 call at 224 px (its first block alone is 32 x 224 x 224 x 64 floats).
MODEL_BYTES = 2 * 2**30
#: Peak bytes per decoded pixel of one decode (measured: a 16 MP RGBA PNG, +139 MiB; the
#: RGBA pixels and PIL's RGB output are 4 bytes each, plus strips and the resize).
DECODE_BYTES_PER_PIXEL = 10
#: What one open connection can hold before uvicorn stops reading it (its 64 KiB high-water
#: mark, the parser's buffers and the coroutine), with a margin.
CONNECTION_BYTES = 256 * 2**10
#: ``--max-connections`` derived from memory stays within these.
MIN_CONNECTIONS, MAX_CONNECTIONS = 64, 4096


def parse_top(raw: str | None, default: int, n_labels: int) -> int | None:
    """``?top=`` as a label count capped at ``n_labels``; ``None`` if it is not 1 to 4 ASCII digits
    from 1 up (the caller answers 400 ``bad_top``)."""
    if raw is None:
        return min(default, n_labels)
    if not TOP_PATTERN.fullmatch(raw) or int(raw) < 1:
        return None
    return min(int(raw), n_labels)


class BudgetTimeout(Exception):
    """The bytes in flight stayed over the budget for the whole wait."""


class ByteBudget:
    """Bytes of request bodies held at once, across all requests (``--max-inflight-bytes``).

    A request takes bytes as its body arrives and gives them back when it is done with
    them (after decoding); a request that would pass the budget waits for others to finish.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed: asyncio.Condition | None = None

    async def take(self, n: int, timeout: float) -> None:
        if self.used + n <= self.capacity:  # room now: no wait, whatever the timeout left
            self.used += n
            return
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + n <= self.capacity), timeout)
            except asyncio.TimeoutError:
                raise BudgetTimeout(f"{self.used:,} bytes of uploads are in flight (--max-inflight-bytes "
                                    f"{self.capacity:,})") from None
            self.used += n

    async def give(self, n: int) -> None:
        if n == 0:
            return
        self.used -= n
        if self._changed is not None:  # someone may be waiting
            async with self._changed:
                self._changed.notify_all()

    @asynccontextmanager
    async def reservation(self) -> AsyncIterator[Reservation]:
        """A request's share: whatever it took is given back when the block ends."""
        held = Reservation(self)
        try:
            yield held
        finally:
            await self.give(held.bytes)


@dataclass
class Reservation:
    budget: ByteBudget
    bytes: int = 0

    async def take(self, n: int, timeout: float) -> None:
        await self.budget.take(n, timeout)
        self.bytes += n


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, flag: str = "--trusted-proxies") -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128) as networks; empty: none."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as e:
            raise ConfigError(f"{flag} {item!r} is not an address or CIDR: pass e.g. 10.0.0.0/8,192.168.0.0/16") from e
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 from a dual-stack socket
    return mapped or address


def _trusted(text: str, trusted: tuple[Network, ...]) -> bool:
    address = _address(text)
    return address is not None and any(address.version == n.version and address in n for n in trusted)


def client_key(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """Who a request counts against: its peer address, unless the peer is a trusted proxy
    (``--trusted-proxies``); then the first hop of ``X-Forwarded-For``, read from the right
    (each proxy appends the address it saw), that is not itself a trusted proxy.

    The hops left of it were written by the client and prove nothing: a client that sends
    ``X-Forwarded-For: 1.2.3.4`` through the ingress still counts as the address the
    ingress saw. With every hop trusted, the leftmost is the client.
    """
    peer = peer or "unknown"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


class TooManyUploads(Exception):
    """One client already has ``--max-uploads-per-client`` uploads in flight."""


class ClientLimiter:
    """Uploads in flight per client (``--max-uploads-per-client``): one address cannot take
    the whole byte budget, the decode slots or the model's queue for itself."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.active: dict[str, int] = {}

    def claim(self, key: str) -> None:
        """One more upload of ``key``; :class:`TooManyUploads` at once if it has its share.
        Every claim that returned is given back with :meth:`release`."""
        # No await between the check and the count: one event loop, nothing interleaves.
        if self.active.get(key, 0) >= self.per_client:
            raise TooManyUploads(f"{self.per_client} uploads from this client are in flight (--max-uploads-per-client)")
        self.active[key] = self.active.get(key, 0) + 1

    def release(self, key: str) -> None:
        self.active[key] -= 1
        if not self.active[key]:
            del self.active[key]


@dataclass(frozen=True)
class MemoryPlan:
    max_connections: int
    max_inflight_bytes: int


def plan_for_memory(memory_limit: int, *, max_pixels: int, max_body_bytes: int, decode_threads: int) -> MemoryPlan:
    """``--max-connections`` and ``--max-inflight-bytes`` that fit ``memory_limit`` bytes.

    What is left after the model (:data:`MODEL_BYTES`) and ``decode_threads`` worst-case
    decodes goes a quarter to request bodies (at most 256 MiB, at least two
    ``--max-body-bytes``: a multipart body counts twice) and the rest to connections at
    :data:`CONNECTION_BYTES` each.
    """
    decodes = decode_threads * DECODE_BYTES_PER_PIXEL * max_pixels
    left = memory_limit - MODEL_BYTES - decodes
    inflight = max(min(left // 4, 256 * 2**20), 2 * max_body_bytes)
    connections = (left - inflight) // CONNECTION_BYTES
    if connections < MIN_CONNECTIONS:
        need = MODEL_BYTES + decodes + inflight + MIN_CONNECTIONS * CONNECTION_BYTES
        raise ConfigError(f"--memory-limit {memory_limit:,} bytes is too small for the model, {decode_threads} decodes of "
                          f"--max-pixels {max_pixels:,} and {MIN_CONNECTIONS} connections: give the pod at least "
                          f"{-(-need // 2**20):,} MiB, or lower --max-pixels / --decode-threads")
    return MemoryPlan(min(connections, MAX_CONNECTIONS), inflight)
