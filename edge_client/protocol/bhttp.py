"""Binary HTTP messages (RFC 9292): the plaintext inside Oblivious HTTP.

Only what EnfPire needs: known-length requests and responses are produced
(with empty trailing sections truncated, as RFC 9292 section 3.8 allows, so
the RFC 9458 examples come out byte for byte); known-length and
indeterminate-length messages are parsed, with trailing zero padding.
Field names are lower-cased; informational (1xx) responses are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EncapsulationError

KNOWN_REQUEST, KNOWN_RESPONSE, INDETERMINATE_REQUEST, INDETERMINATE_RESPONSE = 0, 1, 2, 3


@dataclass(frozen=True)
class Request:
    """One HTTP request: control data, header fields and content."""

    method: str
    path: str
    scheme: str = "https"
    authority: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    content: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        return next((v for k, v in self.headers if k == name.lower()), default)


@dataclass(frozen=True)
class Response:
    """One final HTTP response: status, header fields and content."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    content: bytes = b""
    trailers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def header(self, name: str, default: str = "") -> str:
        return next((v for k, v in self.headers if k == name.lower()), default)


# ---------------------------------------------------------------- variable-length integers (RFC 9000 16)

def encode_varint(value: int) -> bytes:
    """The shortest QUIC variable-length encoding of ``value``."""
    for length, prefix in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * length - 2):
            raw = bytearray(value.to_bytes(length, "big"))
            raw[0] |= prefix
            return bytes(raw)
    raise ValueError(f"{value} does not fit a variable-length integer")


class _Reader:
    """A cursor over a message that raises :class:`EncapsulationError` when it runs short."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise EncapsulationError("the binary HTTP message is truncated")
        chunk = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return chunk

    def varint(self) -> int:
        first = self.take(1)[0]
        length = 1 << (first >> 6)
        value = first & 0x3F
        for byte in self.take(length - 1):
            value = (value << 8) | byte
        return value

    def vbytes(self) -> bytes:
        return self.take(self.varint())

    def rest_is_padding(self) -> None:
        if any(self.data[self.pos:]):
            raise EncapsulationError("the binary HTTP message has data after its end")


def _vbytes(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _fields(headers: tuple[tuple[str, str], ...]) -> bytes:
    body = b"".join(_vbytes(k.lower().encode()) + _vbytes(v.encode()) for k, v in headers)
    return _vbytes(body)


def _truncated(sections: list[bytes]) -> bytes:
    """Empty trailing sections (a single zero length) may be left out."""
    while sections and sections[-1] == b"\x00":
        sections.pop()
    return b"".join(sections)


def encode_request(request: Request) -> bytes:
    """A known-length request."""
    control = b"".join(_vbytes(s.encode()) for s in (request.method, request.scheme, request.authority, request.path))
    return encode_varint(KNOWN_REQUEST) + control + _truncated(
        [_fields(request.headers), _vbytes(request.content), _fields(())])


def encode_response(response: Response) -> bytes:
    """A known-length final response (no informational responses)."""
    return encode_varint(KNOWN_RESPONSE) + encode_varint(response.status) + _truncated(
        [_fields(response.headers), _vbytes(response.content), _fields(response.trailers)])


# ---------------------------------------------------------------- parsing

def _known_fields(reader: _Reader) -> tuple[tuple[str, str], ...]:
    if reader.at_end():
        return ()
    section = _Reader(reader.vbytes())
    out = []
    while not section.at_end():
        out.append((_text(section.vbytes()).lower(), _text(section.vbytes())))
    return tuple(out)


def _indeterminate_fields(reader: _Reader) -> tuple[tuple[str, str], ...]:
    out = []
    while not reader.at_end():
        name = reader.vbytes()
        if not name:
            break
        out.append((_text(name).lower(), _text(reader.vbytes())))
    return tuple(out)


def _content(reader: _Reader, indeterminate: bool) -> bytes:
    if reader.at_end():
        return b""
    if not indeterminate:
        return reader.vbytes()
    chunks = []
    while not reader.at_end():
        chunk = reader.vbytes()
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise EncapsulationError("a binary HTTP field is not ASCII") from None


def _framing(reader: _Reader, known: int, indeterminate: int) -> bool:
    framing = reader.varint()
    if framing not in (known, indeterminate):
        raise EncapsulationError(f"unexpected binary HTTP framing indicator {framing}")
    return framing == indeterminate


def decode_request(data: bytes) -> Request:
    """A request in either framing; absent trailing sections are empty."""
    reader = _Reader(data)
    indeterminate = _framing(reader, KNOWN_REQUEST, INDETERMINATE_REQUEST)
    method, scheme, authority, path = (_text(reader.vbytes()) for _ in range(4))
    fields = _indeterminate_fields if indeterminate else _known_fields
    headers = fields(reader)
    content = _content(reader, indeterminate)
    fields(reader)  # trailers: read past, unused
    reader.rest_is_padding()
    return Request(method, path, scheme, authority, headers, content)


def decode_response(data: bytes) -> Response:
    """The final response in either framing, informational responses skipped."""
    reader = _Reader(data)
    indeterminate = _framing(reader, KNOWN_RESPONSE, INDETERMINATE_RESPONSE)
    fields = _indeterminate_fields if indeterminate else _known_fields
    status = reader.varint()
    while 100 <= status < 200:
        fields(reader)
        status = reader.varint()
    if not 200 <= status < 600:
        raise EncapsulationError(f"binary HTTP status {status} is out of range")
    headers = fields(reader)
    content = _content(reader, indeterminate)
    trailers = fields(reader)
    reader.rest_is_padding()
    return Response(status, headers, content, trailers)
