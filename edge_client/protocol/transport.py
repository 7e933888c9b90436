"""How a request reaches the server: the answer every transport returns, and the direct transport.

A transport turns ``(method, path, body)`` into an :class:`Answer`. The client
holds exactly one: :class:`DirectTransport` to the server itself, or
:class:`~edge_client.protocol.oblivious.ObliviousTransport` through a relay
(never a fallback from one to the other). Both send through the client's one
HTTP function, so retries, timeouts and byte counts are the same for each.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Protocol


class Answer(NamedTuple):
    """One HTTP answer as the client reads it, with the bytes it cost on the wire."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    reason: str
    sent: int
    received: int


#: (method, url, body, headers) -> Answer; the client's direct HTTP exchange.
Send = Callable[[str, str, "bytes | None", dict[str, str]], Answer]


class Transport(Protocol):
    """Anything that carries one request to the server and brings its answer back."""

    def exchange(self, method: str, path: str, data: bytes | None) -> Answer: ...


class DirectTransport:
    """Straight to the server: the device's address is visible to it (see the relay for the alternative)."""

    def __init__(self, server: str, send: Send):
        self.base, self.send = server.rstrip("/"), send

    def exchange(self, method: str, path: str, data: bytes | None) -> Answer:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self.send(method, self.base + path, data, headers)
