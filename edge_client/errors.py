"""EnfPire's exceptions: one root and a flat, well-named family.

Callers catch :class:`EnfPireError` for everything the library raises on
purpose; the subclasses say which part of the world was wrong (the model,
the photo, the configuration, the network or the server). The whole tree,
with the modules that define the classes not listed here::

    EnfPireError
    +-- ConfigError                  (also ValueError)
    +-- ModelError
    |   +-- ModelNotFoundError       (also FileNotFoundError)
    |   +-- ChecksumError
    |   +-- InterpreterNotFoundError (also ImportError)
    |   +-- CutError                 tools.model.cut (also ValueError)
    +-- PhotoError                   (also ValueError)
    +-- CameraError                  edge_client.vision.camera
    +-- FeatureError                 (also ValueError)
    +-- ServerUnreachableError       (also ConnectionError)
    +-- ServerError                  an HTTP error answer: status, code, message
    +-- BadResponseError
    |   +-- PublicError              edge_client.protocol.public
    +-- IncompatibleServerError
    +-- EncapsulationError           (also ValueError)
    +-- GatewayKeyError
    |   +-- IdentityError
    +-- ConsistencyError             not the key or document every other phone sees
    +-- PrivacyFloorError            a public document below the phone's own floors
    +-- WireError                    edge_client.protocol.wire (also ValueError)
    +-- BadIndexError                lite_server.index.store
    +-- UpdateError                  lite_server.api.updates
    +-- RayMissingError              lite_server.fleet.cluster (also ImportError)
    +-- FleetError                   lite_server.fleet.serve
    +-- ConvertError, QuantizeError  tools.model.convert, tools.model.quantize

The server's JSON error answers are not exceptions of this tree:
``lite_server.errors.ApiError`` carries an HTTP status and a code.
"""
from __future__ import annotations


class EnfPireError(Exception):
    """Root of every error EnfPire raises deliberately."""


class ConfigError(EnfPireError, ValueError):
    """A configuration file, variable or flag has a bad value."""


class ModelError(EnfPireError):
    """The model file is missing, corrupt or unusable."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model file where one was expected."""


class ChecksumError(ModelError):
    """A file's sha256 differs from the one it must have."""


class InterpreterNotFoundError(ModelError, ImportError):
    """No TFLite interpreter package is installed."""


class PhotoError(EnfPireError, ValueError):
    """A photo cannot be decoded or is out of bounds; the message names it."""


class FeatureError(EnfPireError, ValueError):
    """A feature handed in by the app is not a finite vector of the model's dimension."""


class ServerUnreachableError(EnfPireError, ConnectionError):
    """The server could not be reached (refused, timed out, DNS)."""


class ServerError(EnfPireError):
    """The server answered with an error status.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the
    server's JSON error body when it had one.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"server answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadResponseError(EnfPireError):
    """The server's answer is not what the protocol promises (bad JSON, bad features)."""


class IncompatibleServerError(EnfPireError):
    """The server runs another model or protocol than this device."""


class EncapsulationError(EnfPireError, ValueError):
    """An Oblivious HTTP message, key configuration or binary HTTP message is malformed or does not decrypt.

    ``code`` names the kind for the gateway's JSON error (``ohttp_key`` when
    the key identifier or algorithms are unknown, else ``bad_ohttp_message``).
    """

    def __init__(self, message: str, code: str = "bad_ohttp_message"):
        super().__init__(message)
        self.code = code


class GatewayKeyError(EnfPireError):
    """The gateway's key configuration differs from the one pinned (or configured) for this server."""


class IdentityError(GatewayKeyError):
    """A key configuration (or public-document digest) is not signed by the server's pinned identity:
    a relay or another server substituting its key. Nothing is sent."""
class ConsistencyError(EnfPireError):
    """The key configuration or public document this phone got differs from the shared copy every
    phone sees (the relay's): the server (or relay) may be singling this phone out. Nothing was sent
    that depends on it. ``retry_after`` (seconds) is set when the shared copy is due for a refresh,
    so the two may agree again by then (an index update or key rotation in between); else None."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
class PrivacyFloorError(EnfPireError):
    """The server's public document is below one of this phone's privacy floors: refused, and
    nothing that depends on it is sent (``edge_client.privacy.floors``).

    ``floor`` names the :class:`~edge_client.config.ClientConfig` setting (``min_cell_spots``,
    ``min_cells``), ``value`` is what the document gives and ``required`` the floor.
    """

    def __init__(self, floor: str, value: float, required: float, detail: str = ""):
        what = f" ({detail})" if detail else ""
        super().__init__(f"refused the server's public document: {floor} {value} is below this phone's "
                         f"floor {required}{what}; nothing was sent")
        self.floor = floor
        self.value = value
        self.required = required
